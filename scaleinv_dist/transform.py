"""The scale-invariant logit transform (Anson, Wang, Aitchison 2025, eq. 16 with a_0 = 1, m_0 = 0).

For a query at position i and a key at position j, t = i - j >= 0 tokens, and score S = scale * q.k:

    L = a(t) * S + m(t),   a(t) = sqrt(1 + 2 log(1 + t/tau)),   m(t) = -2 log(1 + t/tau)

It is the identity at t = 0 and has no learned parameters. This module is the single definition
every backend is tested against.
"""
from __future__ import annotations

import math

import torch

TRANSFORMS = ("scale_invariant", "none", "alibi")


def log_gain(t: torch.Tensor, tau: float) -> torch.Tensor:
    """g(t) = log(1 + t / tau); t in tokens (any real dtype), returns t's float dtype."""
    t = t if t.is_floating_point() else t.to(torch.float64)
    return torch.log1p(t / tau)


def si_scale(t: torch.Tensor, tau: float) -> torch.Tensor:
    """a(t) = sqrt(1 + 2 log(1 + t/tau)): the multiplier on the score."""
    return torch.sqrt(1.0 + 2.0 * log_gain(t, tau))


def si_bias(t: torch.Tensor, tau: float) -> torch.Tensor:
    """m(t) = -2 log(1 + t/tau): the additive term on the logit."""
    return -2.0 * log_gain(t, tau)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's geometric head slopes (Press et al. 2021), shape (n_heads,), float32.

    For a power of two n: 2^(-8 i / n), i = 1..n; otherwise the closest power of two's slopes
    interleaved with the next one's, as in the reference implementation.
    """
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def apply_transform(
    scores: torch.Tensor,
    t: torch.Tensor,
    *,
    transform: str,
    tau: float,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and dL/dS for scores (..., H, Nq, Nk) at distances t broadcastable to them.

    t must already be non-negative (|i - j| for bidirectional use); alibi_slopes must broadcast
    against the scores (e.g. shape (H, 1, 1)). Returns (logits, gain) where gain = dL/dS is a(t)
    for scale_invariant and 1 otherwise.
    """
    if transform == "none":
        return scores, torch.ones((), dtype=scores.dtype, device=scores.device)
    t = t.to(scores.dtype)
    if transform == "scale_invariant":
        g = log_gain(t, tau)
        a = torch.sqrt(1.0 + 2.0 * g)
        return a * scores - 2.0 * g, a
    if transform == "alibi":
        if alibi_slopes is None:
            raise ValueError("transform='alibi' needs alibi_slopes (one per query head)")
        return scores - alibi_slopes.to(scores.dtype) * t, torch.ones((), dtype=scores.dtype, device=scores.device)
    raise ValueError(f"unknown transform {transform!r}; choose one of {TRANSFORMS}")
