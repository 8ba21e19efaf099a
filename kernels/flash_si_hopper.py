"""Scale-invariant attention on Hopper (sm90) through FlashAttention-4's warp-specialised kernels.

FlashAttention-4 (PyPI `flash-attn-4`, module `flash_attn.cute`, written in CUTLASS's CuTe DSL)
runs FlashAttention-3's design on Hopper: a TMA producer warp and two consumer warpgroups in
ping-pong, so that one warpgroup's softmax overlaps the other's wgmma. Its SM90 forward and
backward accept a `score_mod` (and its derivative `score_mod_bwd`) that is compiled into the
kernel. This module gives them the scale-invariant transform as CuTe DSL code:

    t = max(q_idx - kv_idx, 0),  m(t) = 2 ln(1 + t/tau),  a(t) = sqrt(1 + m(t))
    forward:  L = a(t) * S - m(t)            (S = scale * q.k, computed by the kernel)
    backward: dL/dS = a(t)

Per score element that is one log2 and one square root on the special-function unit beside the
softmax's exp2, and a few FMAs (docs/kernel.md gives the measured cost).

What runs here (everything else goes to the Triton kernel, see `unsupported_reason`): a CUDA
device of compute capability 9.x with `flash_attn.cute` importable; bf16 or fp16; head dim a
multiple of 8 up to 256; causal self-attention whose query and key positions are the same run of
consecutive integers (one GPU, or Ulysses after its all-to-all); no document ids; transform
"scale_invariant" or "none". q_idx - kv_idx is then the position difference t.

Contract (as every backend, scaleinv_dist.attention): forward(q, k, v, q_pos, k_pos, ...) ->
(out (B, Hq, N, D) in q's dtype, lse (B, Hq, N) float32, natural log); backward(dout, q, k, v,
out, lse, ...) -> (dq, dk, dv) given an external out and lse.
"""
from __future__ import annotations

import functools
import math

import torch

try:  # optional: flash-attn-4 and nvidia-cutlass-dsl (Hopper machines only)
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import interface as _fa4
except Exception as _err:  # noqa: BLE001 - any import failure means "not available here"
    _fa4 = None
    IMPORT_ERROR = f"{type(_err).__name__}: {_err}"
else:
    IMPORT_ERROR = None

TRANSFORMS = ("scale_invariant", "none")
_CONTIGUOUS_CACHE: dict = {}


# ----------------------------------------------------------------------------- the transform
@functools.lru_cache(maxsize=None)
def score_mods(tau: float):
    """(score_mod, score_mod_bwd) for FA4 with tau baked in as a compile-time constant.

    FA4 calls score_mod on vectors (TensorSSA) of scores already multiplied by softmax_scale, with
    the matching q_idx / kv_idx vectors (int32). score_mod_bwd gets dL (the gradient w.r.t. the
    modified score) and returns the gradient w.r.t. the scaled score: dL * a(t).
    """
    inv_tau = 1.0 / tau
    two_ln2 = 2.0 * math.log(2.0)

    @cute.jit
    def _m_and_a(like, q_idx, kv_idx):
        diff = q_idx - kv_idx
        t = cute.where(diff >= cute.full_like(diff, 0), diff, cute.full_like(diff, 0))
        x = t.to(cutlass.Float32) * cute.full_like(like, inv_tau) + cute.full_like(like, 1.0)
        m = cute.math.log2(x, fastmath=True) * cute.full_like(like, two_ln2)
        a = cute.math.sqrt(m + cute.full_like(like, 1.0), fastmath=True)
        return m, a

    @cute.jit
    def score_mod(scores, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
        s = scores.to(cutlass.Float32)
        m, a = _m_and_a(s, q_idx, kv_idx)
        return s * a - m

    @cute.jit
    def score_mod_bwd(grad, scores, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
        g = grad.to(cutlass.Float32)
        _, a = _m_and_a(g, q_idx, kv_idx)
        return g * a

    return score_mod, score_mod_bwd


# ----------------------------------------------------------------------------- eligibility
def _contiguous(pos: torch.Tensor) -> bool:
    """True when every row of pos (B, N) is the same run first, first + 1, ... (cached per tensor
    version: the model passes one positions tensor to every layer, so this syncs once a step)."""
    key = (pos.data_ptr(), pos._version, tuple(pos.shape), tuple(pos.stride()))
    hit = _CONTIGUOUS_CACHE.get(key)
    if hit is None:
        row = pos[0]
        ok = bool(((row[1:] - row[:-1]) == 1).all()) if row.numel() > 1 else True
        if ok and pos.shape[0] > 1 and pos.stride(0) != 0:
            ok = bool((pos == row).all())
        if len(_CONTIGUOUS_CACHE) > 64:
            _CONTIGUOUS_CACHE.clear()
        _CONTIGUOUS_CACHE[key] = hit = ok
    return hit


def unsupported_reason(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal, transform) -> str | None:
    """None when this backend runs these inputs, else why not (one short phrase)."""
    if _fa4 is None:
        return f"flash_attn.cute is not importable ({IMPORT_ERROR})"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "needs a Hopper (sm90) GPU"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"needs bf16 or fp16 inputs, got {q.dtype}"
    d = q.shape[-1]
    if d % 8 or d > 256:
        return f"head dim {d} is not a multiple of 8 up to 256"
    if transform not in TRANSFORMS:
        return f"transform {transform!r} is not one of {TRANSFORMS}"
    if not causal:
        return "only causal attention"
    if q_seg is not None:
        return "document ids (q_seg/k_seg) go to the Triton kernel"
    if q.shape[2] != k.shape[2]:
        return "needs as many queries as keys"
    if not (q_pos.data_ptr() == k_pos.data_ptr() and q_pos.stride() == k_pos.stride()
            or torch.equal(q_pos, k_pos)):
        return "query and key positions differ (a context-parallel shard)"
    if not _contiguous(q_pos):
        return "positions are not one run of consecutive integers"
    return None


# ----------------------------------------------------------------------------- contract
def _bnhd(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> FA4's (B, N, H, D) with a unit last stride (a view when possible)."""
    x = x.transpose(1, 2)
    return x if x.stride(-1) == 1 else x.contiguous()


def _mods(transform: str, tau: float):
    return score_mods(float(tau)) if transform == "scale_invariant" else (None, None)


def forward(q, k, v, q_pos=None, k_pos=None, q_seg=None, k_seg=None, *, scale, tau, causal,
            transform, alibi_slopes=None):
    """out (B, Hq, N, D), lse (B, Hq, N) float32 natural log. Inputs as in the module docstring."""
    score_mod, _ = _mods(transform, tau)
    out, lse, *_ = _fa4._flash_attn_fwd(_bnhd(q), _bnhd(k), _bnhd(v), softmax_scale=scale,
                                        causal=True, score_mod=score_mod, return_lse=True)
    return out.transpose(1, 2), lse


def backward(dout, q, k, v, out, lse, q_pos=None, k_pos=None, q_seg=None, k_seg=None, *, scale,
             tau, causal, transform, alibi_slopes=None):
    """(dq, dk, dv) in the inputs' layout, given an external out and lse (from any backend)."""
    score_mod, score_mod_bwd = _mods(transform, tau)
    dq, dk, dv = _fa4._flash_attn_bwd(_bnhd(q), _bnhd(k), _bnhd(v), _bnhd(out), _bnhd(dout),
                                      lse.float().contiguous(), scale, True,
                                      score_mod=score_mod, score_mod_bwd=score_mod_bwd)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
