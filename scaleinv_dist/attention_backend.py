"""The attention backend contract, its one input validator, and the registry "auto" picks from.

A backend is a module that satisfies `AttentionBackend`. `validate` checks the inputs once for
every entry point (the public API, context-parallel attention); backends then trust their inputs
and only say, through `supports`, which valid inputs they cannot run. Adding a backend is one
entry in `REGISTRY` (fastest first) plus its name in config.CHOICES["attention.backend"].
"""
from __future__ import annotations

import functools
import importlib
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch

from .transform import TRANSFORMS


class AttentionBackend(Protocol):
    """The backend contract (ring attention builds on forward and backward).

    q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D), Hq % Hkv == 0; positions (B, N) integer (any order,
    gaps allowed); document ids (B, N) integer or None; alibi_slopes (Hq,) or None. The keywords
    are scale (float), tau (float), causal (bool), transform (one of transform.TRANSFORMS).

    forward  -> out (B, Hq, Nq, D) in q.dtype, lse (B, Hq, Nq) float32 (float64 for float64
                input), natural log. A row that sees no key gets out = 0, lse = -inf.
    backward -> dq, dk, dv in the dtypes of q, k, v, given an *external* out and lse: in ring
                attention the merged global ones, and the result is this key block's share.
                Rows with lse = -inf get zero gradients.
    supports -> None, or one line saying why this backend cannot run these (valid) inputs. The
                positions, document ids and causal flag are passed when known (a backend that
                needs them refuses when they are None).

    A registry entry with contract=False (FlexAttention) has no backward: its forward is
    differentiable through autograd, so it serves single-device attention but not the ring.
    """

    def supports(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, transform: str, *,
                 q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None,
                 q_seg: torch.Tensor | None = None, k_seg: torch.Tensor | None = None,
                 causal: bool = True) -> str | None: ...

    def forward(self, q, k, v, q_pos, k_pos, q_seg, k_seg, *, scale: float, tau: float,
                causal: bool, transform: str,
                alibi_slopes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(self, do, q, k, v, out, lse, q_pos, k_pos, q_seg, k_seg, *, scale: float,
                 tau: float, causal: bool, transform: str,
                 alibi_slopes: torch.Tensor | None) -> tuple[torch.Tensor, ...]: ...


@dataclass(frozen=True)
class Entry:
    module: str  # import path, imported on first use
    contract: bool  # has backward(do, ..., out, lse): usable by ring attention
    auto_devices: tuple[str, ...] | None  # device types on which "auto" tries it (None: all)
    auto_dtypes: tuple[torch.dtype, ...] | None = None  # input dtypes "auto" tries it for


# Fastest first: "auto" takes the first entry tried for q's device and dtype that imports and
# supports the inputs, warning once per reason for each one it skips.
REGISTRY: dict[str, Entry] = {
    # FlashAttention-4's Hopper kernels with the transform as a score_mod (the optional [hopper]
    # extra): 1.5x to 1.8x the Triton kernel on an H200 where it runs (docs/kernel.md).
    "hopper": Entry("scaleinv_dist.kernels.flash_si_hopper", True, ("cuda",),
                    (torch.float16, torch.bfloat16)),
    "triton": Entry("scaleinv_dist.kernels.flash_si", True, ("cuda",),
                    (torch.float16, torch.bfloat16)),
    "flex": Entry("scaleinv_dist.attention_flex", False, ("cuda",)),
    "reference": Entry("scaleinv_dist.attention_reference", True, None),
}


# ----------------------------------------------------------------------------- validation
def normalize_positions(pos: torch.Tensor, batch: int, length: int, name: str) -> torch.Tensor:
    """(N,) or (B, N) integer positions -> (B, N) (a broadcast view where possible)."""
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer positions, "
                        f"got {type(pos).__name__}")
    if pos.is_floating_point() or pos.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (int32 or int64), got {pos.dtype}; "
                        f"pass e.g. torch.arange(N)")
    if pos.dim() == 1 and pos.shape[0] == length:
        return pos.unsqueeze(0).expand(batch, length)
    if pos.dim() == 2 and pos.shape == (batch, length):
        return pos
    raise ValueError(f"{name} has shape {tuple(pos.shape)}; expected ({length},) or "
                     f"({batch}, {length})")


def validate(q, k, v, q_pos, k_pos, q_seg=None, k_seg=None, *, transform: str, alibi_slopes=None):
    """Check the inputs every backend accepts; returns (q_pos, k_pos, q_seg, k_seg) as (B, N)
    tensors (document ids None when not given). Raises ValueError / TypeError in one line."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D (batch, heads, tokens, head_dim) like torch SDPA; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in batch, heads, "
                         f"tokens")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and "
                         f"head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads "
                         f"({k.shape[1]}) for grouped-query attention")
    if not q.is_floating_point():
        raise TypeError(f"q, k, v must be floating point, got {q.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; choose one of {TRANSFORMS}")
    if transform == "alibi" and (alibi_slopes is None or alibi_slopes.numel() != q.shape[1]):
        raise ValueError(f"transform='alibi' needs alibi_slopes with one slope per query head "
                         f"({q.shape[1]})")
    b, nq, nk = q.shape[0], q.shape[2], k.shape[2]
    q_pos = normalize_positions(q_pos, b, nq, "q_pos")
    k_pos = normalize_positions(k_pos, b, nk, "k_pos")
    if (q_seg is None) != (k_seg is None):
        raise ValueError("pass both q_seg and k_seg (document ids) or neither")
    if q_seg is not None:
        q_seg = normalize_positions(q_seg, b, nq, "q_seg")
        k_seg = normalize_positions(k_seg, b, nk, "k_seg")
    return q_pos, k_pos, q_seg, k_seg


# ----------------------------------------------------------------------------- registry
def check_name(backend: str) -> None:
    if backend != "auto" and backend not in REGISTRY:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of "
                         f"{('auto', *REGISTRY)}")


@functools.lru_cache(maxsize=None)
def load(name: str) -> ModuleType | None:
    """The module of backend `name`, or None (with one warning) when it cannot be imported."""
    try:
        return importlib.import_module(REGISTRY[name].module)
    except Exception as err:  # e.g. triton missing or broken: auto falls back
        warnings.warn(f"attention backend {name!r} unavailable ({err}); falling back", stacklevel=3)
        return None


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def resolve(backend: str, q: torch.Tensor, k: torch.Tensor | None = None,
            v: torch.Tensor | None = None, *, transform: str = "scale_invariant",
            **layout) -> str:
    """The concrete backend name for `backend` and these inputs.

    "auto" gives the fastest registry entry that can run them (never fails: "reference" runs
    everything); a named backend that cannot run them raises one line saying why.
    """
    k = q if k is None else k
    v = k if v is None else v
    check_name(backend)
    if backend != "auto":
        module = load(backend)
        if module is None:
            raise RuntimeError(f"attention.backend={backend!r} cannot be imported (see the warning "
                               f"above); use backend='auto' or 'reference'")
        reason = module.supports(q, k, v, transform, **layout)
        if reason is not None:
            raise ValueError(f"attention.backend={backend!r}: {reason}; use backend='auto' "
                             f"(falls back) or 'reference'")
        return backend
    for name, entry in REGISTRY.items():
        if entry.auto_devices is not None and q.device.type not in entry.auto_devices:
            continue
        if entry.auto_dtypes is not None and q.dtype not in entry.auto_dtypes:
            continue
        module = load(name)
        if module is None:
            continue
        reason = module.supports(q, k, v, transform, **layout)
        if reason is None:
            return name
        _warn_once(f"attention backend {name!r} skipped: {reason}; falling back")
    raise AssertionError("unreachable: the reference backend supports every valid input")


def contract_ops(name: str) -> AttentionBackend:
    """The module of a backend with the forward/backward contract (for ring attention)."""
    if name not in REGISTRY or not REGISTRY[name].contract:
        contract = tuple(n for n, e in REGISTRY.items() if e.contract)
        raise ValueError(f"backend {name!r} has no forward/backward contract; use one of "
                         f"{contract}")
    return load(name)
