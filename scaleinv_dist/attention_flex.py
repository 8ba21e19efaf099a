"""FlexAttention backend: the transform as a score_mod (the paper's implementation route).

Positions and document ids are captured tensors read by index inside score_mod / mask_mod, so
non-contiguous shards work the same as contiguous sequences. Autograd runs through FlexAttention;
there is no separate backward with an external lse, so it is a registry entry with
contract=False (attention_backend): single-device only.
"""
from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

try:
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # torch < 2.9 returns the lse with return_lse=True
    AuxRequest = None

_LN2 = 0.6931471805599453


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def supports(q, k, v, transform, **layout):
    """Why FlexAttention cannot run these validated inputs, or None."""
    if q.is_cuda and min(q.shape[-1], v.shape[-1]) < 16:  # its CUDA kernel's tl.dot minimum
        return f"FlexAttention on CUDA needs head dims >= 16; got {q.shape[-1]}"
    return None


def forward(q, k, v, q_pos, k_pos, q_seg, k_seg, *, scale, tau, causal, transform,
            alibi_slopes=None):
    """out (B, Hq, Nq, D), lse (B, Hq, Nq) natural log; positions (B, N) integer."""
    q_pos, k_pos = q_pos.long(), k_pos.long()

    def distance(b, q_idx, kv_idx):
        diff = q_pos[b, q_idx] - k_pos[b, kv_idx]
        return diff.clamp(min=0) if causal else diff.abs()

    def score_mod(score, b, h, q_idx, kv_idx):
        t = distance(b, q_idx, kv_idx).to(torch.float32)
        if transform == "scale_invariant":
            g = torch.log1p(t / tau)
            return torch.sqrt(1.0 + 2.0 * g) * score - 2.0 * g
        if transform == "alibi":
            return score - alibi_slopes[h] * t
        return score

    def mask_mod(b, h, q_idx, kv_idx):
        visible = q_pos[b, q_idx] >= k_pos[b, kv_idx] if causal else q_pos[b, q_idx] >= 0
        if q_seg is not None:
            visible = visible & (q_seg[b, q_idx] == k_seg[b, kv_idx])
        return visible

    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    mask = create_block_mask(mask_mod, b, None, nq, nk, device=q.device)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(device=q.device, dtype=torch.float32)
    kwargs = dict(score_mod=score_mod, block_mask=mask, scale=scale, enable_gqa=k.shape[1] != hq)
    if AuxRequest is None:  # torch < 2.9
        out, lse = fn(q, k, v, return_lse=True, **kwargs)
    else:
        out, aux = fn(q, k, v, return_aux=AuxRequest(lse=True), **kwargs)
        lse = aux.lse
    return out, lse.float()
