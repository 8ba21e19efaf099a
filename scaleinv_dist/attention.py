"""Public attention API: `scale_invariant_attention` and backend dispatch.

Backends (see README "Attention backends"):
  reference  plain PyTorch, any float dtype, chunked over keys (scaleinv_dist.attention_reference)
  triton     the fused kernel (scaleinv_dist.kernels.flash_si), CUDA only
  flex       torch FlexAttention with the transform as a score_mod, CUDA (the paper's route)
  auto       triton on CUDA when it imports, else flex on CUDA, else reference

`reference` and `triton` implement the two-function backend contract of attention_reference
(forward -> out, lse; backward given an external out and lse), which ring attention builds on.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

import torch

from . import attention_reference
from .transform import TRANSFORMS

BACKENDS = ("auto", "reference", "triton", "hopper", "flex")


# ----------------------------------------------------------------------------- input checks
def normalize_positions(pos: torch.Tensor, batch: int, length: int, name: str) -> torch.Tensor:
    """(N,) or (B, N) integer positions -> (B, N) (a broadcast view where possible)."""
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer positions, got {type(pos).__name__}")
    if pos.is_floating_point() or pos.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (int32 or int64), got {pos.dtype}; "
                        f"pass e.g. torch.arange(N)")
    if pos.dim() == 1 and pos.shape[0] == length:
        return pos.unsqueeze(0).expand(batch, length)
    if pos.dim() == 2 and pos.shape == (batch, length):
        return pos
    raise ValueError(f"{name} has shape {tuple(pos.shape)}; expected ({length},) or ({batch}, {length})")


def check_inputs(q, k, v, transform: str, backend: str) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D (batch, heads, tokens, head_dim) like torch SDPA; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in batch, heads, tokens")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads "
                         f"({k.shape[1]}) for grouped-query attention")
    if not q.is_floating_point():
        raise TypeError(f"q, k, v must be floating point, got {q.dtype}")
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; choose one of {TRANSFORMS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def prepare_inputs(q, k, v, q_pos, k_pos, q_seg, k_seg, *, transform: str, backend: str, alibi_slopes):
    """Check q/k/v and the options; positions and document ids as (B, N) tensors (or None)."""
    check_inputs(q, k, v, transform, backend)
    b, nq, nk = q.shape[0], q.shape[2], k.shape[2]
    q_pos = normalize_positions(q_pos, b, nq, "q_pos")
    k_pos = normalize_positions(k_pos, b, nk, "k_pos")
    if (q_seg is None) != (k_seg is None):
        raise ValueError("pass both q_seg and k_seg (document ids) or neither")
    if q_seg is not None:
        q_seg = normalize_positions(q_seg, b, nq, "q_seg")
        k_seg = normalize_positions(k_seg, b, nk, "k_seg")
    if transform == "alibi" and (alibi_slopes is None or alibi_slopes.numel() != q.shape[1]):
        raise ValueError(f"transform='alibi' needs alibi_slopes with one slope per query head "
                         f"({q.shape[1]})")
    return q_pos, k_pos, q_seg, k_seg


# ----------------------------------------------------------------------------- backend choice
@functools.lru_cache(maxsize=None)
def _triton_module() -> ModuleType | None:
    try:
        return importlib.import_module("scaleinv_dist.kernels.flash_si")
    except Exception as err:  # triton missing or broken: auto falls back
        warnings.warn(f"Triton attention kernel unavailable ({err}); falling back", stacklevel=3)
        return None


@functools.lru_cache(maxsize=None)
def _hopper_module() -> ModuleType:
    return importlib.import_module("scaleinv_dist.kernels.flash_si_hopper")


def resolve_backend(backend: str, q: torch.Tensor, hopper_reason=None) -> str:
    """The concrete backend name for `backend` on q's device (auto picks the fastest that works)."""
    if backend == "hopper" and hopper_reason is not None:
        raise RuntimeError(f"attention.backend='hopper' cannot run these inputs: {hopper_reason}; "
                           "use backend='auto'")
    if backend == "auto" and hopper_reason is None:
        return "hopper"
    if backend == "auto":
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _triton_module() is not None:
            return "triton"
        return "flex" if q.is_cuda else "reference"
    if backend == "triton" and _triton_module() is None:
        raise RuntimeError("attention.backend='triton' needs the `triton` package and a CUDA GPU "
                           "(or TRITON_INTERPRET=1 on CPU); use backend='auto' or 'reference'")
    return backend


def backend_ops(name: str) -> ModuleType:
    """The module implementing forward/backward for a contract backend ('reference' or 'triton')."""
    if name == "reference":
        return attention_reference
    if name == "triton":
        return _triton_module()
    if name == "hopper":
        return _hopper_module()
    raise ValueError(f"backend {name!r} has no forward/backward contract; use 'reference' or 'triton'")


# ----------------------------------------------------------------------------- autograd
class _ContractAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, q_seg, k_seg, ops, opts):
        out, lse = ops.forward(q, k, v, q_pos, k_pos, q_seg, k_seg, **opts)
        ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos,
                              *(() if q_seg is None else (q_seg, k_seg)))
        ctx.ops, ctx.opts = ops, opts
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, q_pos, k_pos, *seg = ctx.saved_tensors
        q_seg, k_seg = seg if seg else (None, None)
        dq, dk, dv = ctx.ops.backward(dout.contiguous(), q, k, v, out, lse, q_pos, k_pos,
                                      q_seg, k_seg, **ctx.opts)
        return dq, dk, dv, None, None, None, None, None, None


def _flex_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, scale, tau, causal, transform,
                    alibi_slopes):
    from .attention_flex import flex_attention_forward

    return flex_attention_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, scale=scale, tau=tau,
                                  causal=causal, transform=transform, alibi_slopes=alibi_slopes)


# ----------------------------------------------------------------------------- public API
def scale_invariant_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    tau: float = 10.0,
    causal: bool = True,
    scale: float | None = None,
    transform: str = "scale_invariant",
    backend: str = "auto",
    return_lse: bool = False,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
):
    """Attention with the scale-invariant logit transform, driven by absolute token positions.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D), Hq % Hkv == 0. q_pos / k_pos: integer (N,) or (B, N)
    absolute positions (any order, gaps allowed). With t = q_pos[i] - k_pos[j] and S = scale * q.k:
    "scale_invariant" gives L = sqrt(1 + 2 log(1 + t/tau)) S - 2 log(1 + t/tau); "none" gives
    L = S; "alibi" gives L = S - slope_h t (alibi_slopes (Hq,)). causal hides keys with
    k_pos > q_pos; otherwise t = |q_pos - k_pos|. q_seg / k_seg (document ids, same shapes as the
    positions) restrict each query to keys of its own document.

    Returns out (B, Hq, Nq, D) in q's dtype and, with return_lse, lse (B, Hq, Nq) float32, natural
    log. A query that sees no key gets out = 0 and lse = -inf.
    """
    q_pos, k_pos, q_seg, k_seg = prepare_inputs(q, k, v, q_pos, k_pos, q_seg, k_seg, transform=transform,
                                                backend=backend, alibi_slopes=alibi_slopes)
    opts = dict(scale=q.shape[-1] ** -0.5 if scale is None else float(scale), tau=float(tau),
                causal=bool(causal), transform=transform, alibi_slopes=alibi_slopes)
    hopper_reason = "not asked for"
    if backend in ("auto", "hopper") and q.is_cuda:
        hopper_reason = _hopper_module().unsupported_reason(
            q, k, v, q_pos, k_pos, q_seg, k_seg, causal=causal, transform=transform)
    name = resolve_backend(backend, q, hopper_reason)
    if name == "flex":
        out, lse = _flex_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, **opts)
    else:
        out, lse = _ContractAttention.apply(q, k, v, q_pos, k_pos, q_seg, k_seg,
                                            backend_ops(name), opts)
    return (out, lse.float()) if return_lse else out
