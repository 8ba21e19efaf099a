"""Public attention API: `scale_invariant_attention` and backend dispatch.

Backends (see README "Attention backends"; the contract, the validator and the registry are in
scaleinv_dist.attention_backend):
  triton     the fused kernel (scaleinv_dist.kernels.flash_si), CUDA only
  flex       torch FlexAttention with the transform as a score_mod, CUDA (the paper's route)
  reference  plain PyTorch, any float dtype, chunked over keys (scaleinv_dist.attention_reference)
  auto       the first of these that can run the inputs on their device (warns once per reason
             for each one it skips)
"""
from __future__ import annotations

import torch

from . import attention_backend as backends
from .attention_backend import check_name, resolve, validate
# Names used by context-parallel attention and the benchmarks:
from .attention_backend import contract_ops as backend_ops  # noqa: F401
from .attention_backend import resolve as resolve_backend  # noqa: F401


def prepare_inputs(q, k, v, q_pos, k_pos, q_seg, k_seg, *, transform: str, backend: str,
                   alibi_slopes):
    """Validate q/k/v, the options and the backend name; positions and document ids as (B, N)."""
    check_name(backend)
    return validate(q, k, v, q_pos, k_pos, q_seg, k_seg, transform=transform,
                    alibi_slopes=alibi_slopes)


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
    name, q_pos, k_pos, q_seg, k_seg = _plan(q, k, v, q_pos, k_pos, q_seg, k_seg, transform,
                                             backend, alibi_slopes, causal)
    opts = dict(scale=q.shape[-1] ** -0.5 if scale is None else float(scale), tau=float(tau),
                causal=bool(causal), transform=transform, alibi_slopes=alibi_slopes)
    ops = backends.load(name)
    if backends.REGISTRY[name].contract:
        out, lse = _ContractAttention.apply(q, k, v, q_pos, k_pos, q_seg, k_seg, ops, opts)
    else:  # differentiable through autograd (FlexAttention)
        out, lse = ops.forward(q, k, v, q_pos, k_pos, q_seg, k_seg, **opts)
    return (out, lse.float()) if return_lse else out


def attention_backend_for(q, k, v, q_pos, k_pos, *, tau: float = 10.0, causal: bool = True,
                          transform: str = "scale_invariant", backend: str = "auto",
                          q_seg=None, k_seg=None, alibi_slopes=None) -> str:
    """The backend ("hopper", "triton", ...) that scale_invariant_attention runs these inputs on,
    with the same arguments (tau does not matter); "auto" falls back with its warnings."""
    return _plan(q, k, v, q_pos, k_pos, q_seg, k_seg, transform, backend, alibi_slopes, causal)[0]


def _plan(q, k, v, q_pos, k_pos, q_seg, k_seg, transform, backend, alibi_slopes, causal):
    """(backend name, q_pos, k_pos, q_seg, k_seg as the backends take them) after validation."""
    q_pos, k_pos, q_seg, k_seg = prepare_inputs(q, k, v, q_pos, k_pos, q_seg, k_seg,
                                                transform=transform, backend=backend,
                                                alibi_slopes=alibi_slopes)
    name = resolve(backend, q, k, v, transform=transform, q_pos=q_pos, k_pos=k_pos, q_seg=q_seg,
                   k_seg=k_seg, causal=causal)
    return name, q_pos, k_pos, q_seg, k_seg
