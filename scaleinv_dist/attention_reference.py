"""Reference attention backend: plain PyTorch, any float dtype (float64 included), chunked over keys.

Implements the backend contract of scaleinv_dist.attention_backend.AttentionBackend for every
valid input. Scores are processed in key chunks of bounded size so that long sequences fit in
CPU memory.
"""
from __future__ import annotations

import torch

from .transform import apply_transform

_MAX_BLOCK_ELEMENTS = 1 << 25  # scores held at once: B * Hq * Nq * chunk


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_size(q: torch.Tensor, nk: int) -> int:
    b, h, nq, _ = q.shape
    return max(16, min(nk, _MAX_BLOCK_ELEMENTS // max(1, b * h * nq)))


def _block(qg, kc, q_pos, k_pos, q_seg, k_seg, *, scale, tau, causal, transform, slopes):
    """Logits, dL/dS and visibility for one key chunk; shapes (B, Hkv, G, Nq, C)."""
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, kc) * scale
    diff = q_pos[:, :, None].long() - k_pos[:, None, :].long()  # (B, Nq, C)
    visible = diff >= 0 if causal else torch.ones_like(diff, dtype=torch.bool)
    if q_seg is not None:
        visible = visible & (q_seg[:, :, None] == k_seg[:, None, :])
    t = diff.clamp_min(0) if causal else diff.abs()
    logits, gain = apply_transform(
        scores, t[:, None, None], transform=transform, tau=tau, alibi_slopes=slopes
    )
    visible = visible[:, None, None]
    return logits.masked_fill(~visible, float("-inf")), gain, visible


def _grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
    b, hq, n, d = q.shape
    return q.view(b, hkv, hq // hkv, n, d)


def _slopes(alibi_slopes, hkv, hq, dtype):
    if alibi_slopes is None:
        return None
    return alibi_slopes.to(dtype).view(hkv, hq // hkv, 1, 1)


def supports(q, k, v, transform, **layout):
    """Every input that attention_backend.validate accepts."""
    return None


def forward(q, k, v, q_pos, k_pos, q_seg=None, k_seg=None, *, scale, tau, causal, transform,
            alibi_slopes=None):
    acc = _acc_dtype(q)
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    qg = _grouped(q.to(acc), hkv)
    slopes = _slopes(alibi_slopes, hkv, hq, acc)
    row_max = torch.full(qg.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    row_sum = torch.zeros(qg.shape[:-1], dtype=acc, device=q.device)
    acc_out = torch.zeros(qg.shape[:-1] + (v.shape[-1],), dtype=acc, device=q.device)
    step = _chunk_size(q, nk)
    for s in range(0, nk, step):
        e = min(nk, s + step)
        logits, _, _ = _block(
            qg, k[:, :, s:e].to(acc), q_pos, k_pos[:, s:e], q_seg,
            None if k_seg is None else k_seg[:, s:e],
            scale=scale, tau=tau, causal=causal, transform=transform, slopes=slopes,
        )
        new_max = torch.maximum(row_max, logits.amax(-1))
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        p = torch.exp(logits - safe_max[..., None])
        correction = torch.exp(row_max - safe_max)
        row_sum = row_sum * correction + p.sum(-1)
        acc_out = acc_out * correction[..., None] + torch.einsum(
            "bhgqk,bhkd->bhgqd", p, v[:, :, s:e].to(acc)
        )
        row_max = new_max
    seen = row_sum > 0
    safe_max = torch.where(seen, row_max, torch.zeros_like(row_max))
    lse = torch.where(seen, safe_max + torch.log(row_sum.clamp_min(1e-300)),
                      torch.full_like(row_sum, float("-inf")))
    out = torch.where(seen[..., None], acc_out / row_sum.clamp_min(1e-300)[..., None],
                      torch.zeros_like(acc_out))
    lse_dtype = torch.float64 if acc == torch.float64 else torch.float32
    return out.reshape(b, hq, nq, -1).to(q.dtype), lse.reshape(b, hq, nq).to(lse_dtype)


def backward(do, q, k, v, out, lse, q_pos, k_pos, q_seg=None, k_seg=None, *, scale, tau, causal,
             transform, alibi_slopes=None):
    acc = _acc_dtype(q)
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    qg = _grouped(q.to(acc), hkv)
    dog = _grouped(do.to(acc), hkv)
    slopes = _slopes(alibi_slopes, hkv, hq, acc)
    delta = (dog * _grouped(out.to(acc), hkv)).sum(-1)  # (B, Hkv, G, Nq)
    lse_g = lse.to(acc).view(b, hkv, hq // hkv, nq)
    lse_safe = torch.where(torch.isinf(lse_g), torch.zeros_like(lse_g), lse_g)
    dq = torch.zeros_like(qg)
    dk = torch.empty(k.shape, dtype=acc, device=k.device)
    dv = torch.empty(v.shape, dtype=acc, device=v.device)
    step = _chunk_size(q, nk)
    for s in range(0, nk, step):
        e = min(nk, s + step)
        kc, vc = k[:, :, s:e].to(acc), v[:, :, s:e].to(acc)
        logits, gain, _ = _block(
            qg, kc, q_pos, k_pos[:, s:e], q_seg, None if k_seg is None else k_seg[:, s:e],
            scale=scale, tau=tau, causal=causal, transform=transform, slopes=slopes,
        )
        p = torch.exp(logits - lse_safe[..., None])
        dv[:, :, s:e] = torch.einsum("bhgqk,bhgqd->bhkd", p, dog)
        dp = torch.einsum("bhgqd,bhkd->bhgqk", dog, vc)
        ds = p * (dp - delta[..., None]) * gain * scale
        dq += torch.einsum("bhgqk,bhkd->bhgqd", ds, kc)
        dk[:, :, s:e] = torch.einsum("bhgqk,bhgqd->bhkd", ds, qg)
    return dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
