"""Attention score statistics by query-key distance: is a trained model in the regime where the
scale-invariant transform is scale-invariant?

The transform's guarantee (the paper's Sec. 3) assumes scores S = q.k / sqrt(D) distributed as
N(0, 1) at every distance t. For S ~ N(mu, sigma^2) the expected unnormalised weight of one key is

    E[exp(a_t S + m_t)] = exp(a_t mu + sigma^2 / 2) * (1 + t/tau)^(sigma^2 - 2)

(a_t^2 = 1 + 2 log(1 + t/tau), m_t = -2 log(1 + t/tau)), so only sigma^2 = 1, mu = 0 gives the
1/(1 + t/tau) decay (times e^0.5) that keeps each range [t, 2t) at a constant share of attention.
A head whose scores at distances beyond the training length have larger variance, or a mean that
drifts up, gives those distances more attention the longer the context: the long context swamps
it. `distance_stats` measures, per layer, head and distance bucket, the mean and variance of S
and the mass ratio E[exp(a_t S + m_t)] (1 + t/tau), which is e^0.5 = 1.65 under N(0, 1) at every t.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Sequence

import torch


def distance_edges(length: int) -> list[int]:
    """Bucket edges [0, 1, 4, 16, 64, ...] (powers of 4) up to and including `length`."""
    edges = [0, 1]
    while edges[-1] < length:
        edges.append(min(edges[-1] * 4, length))
    return edges


@contextmanager
def captured_qk(model):
    """Within the block, every attention call appends (q, k) to the yielded list, as the kernel
    sees them (after QK-norm, rotary and LogN scaling): (B, Hq, N, D) and (B, Hkv, N, D)."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    attend = model.attend

    def capture(q, k, v, *rest):
        calls.append((q.detach(), k.detach()))
        return attend(q, k, v, *rest)

    model.attend = capture
    try:
        yield calls
    finally:
        model.attend = attend


def distance_stats(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, edges: Sequence[int],
                   tau: float, doc_ids: torch.Tensor | None = None, rows_per_chunk: int = 128) -> dict:
    """Sums over causal pairs (same document, 0 <= t = q_pos - k_pos) by distance bucket.

    q (B, Hq, N, D), k (B, Hkv, N, D), positions (B, N), doc_ids (B, N) or None; buckets
    [edges[i], edges[i+1]). Returns float64 CPU tensors of shape (Hq, n_buckets): "count",
    "sum_s", "sum_s2" and "sum_mass" (the sum of exp(a_t S + m_t) (1 + t/tau)); `summarise` turns
    them into mean, variance and mass ratio. Computed in float64 on q's device, `rows_per_chunk`
    query rows at a time (about 32 x Hq x rows_per_chunk x N bytes of temporaries).
    """
    b, hq, n, d = q.shape
    group = hq // k.shape[1]
    bounds = torch.tensor(list(edges), dtype=torch.float64, device=q.device)
    nb = len(edges) - 1
    sums = torch.zeros(4, hq, nb + 1, dtype=torch.float64, device=q.device)  # last column: non-pairs
    kk = k.to(torch.float64).repeat_interleave(group, dim=1)
    for bi in range(b):
        for r0 in range(0, n, rows_per_chunk):
            rows = slice(r0, min(n, r0 + rows_per_chunk))
            s = q[bi, :, rows].to(torch.float64) @ kk[bi].transpose(-1, -2) / math.sqrt(d)  # (Hq, r, N)
            t = (positions[bi, rows][:, None] - positions[bi][None, :]).to(torch.float64)  # (r, N)
            bucket = torch.bucketize(t, bounds, right=True) - 1
            ok = (t >= 0) & (bucket < nb)
            if doc_ids is not None:
                ok &= doc_ids[bi, rows][:, None] == doc_ids[bi][None, :]
            bucket = torch.where(ok, bucket, nb).reshape(1, -1).expand(hq, -1)
            g = torch.log1p(t.clamp_min(0) / tau)
            mass = torch.exp(torch.sqrt(1 + 2 * g) * s - 2 * g) * (1 + t.clamp_min(0) / tau)
            for i, value in enumerate((torch.ones_like(s), s, s * s, mass)):
                sums[i].scatter_add_(1, bucket, value.reshape(hq, -1))
    return dict(zip(("count", "sum_s", "sum_s2", "sum_mass"), sums[:, :, :nb].cpu()))


def merge(a: dict | None, b: dict) -> dict:
    """The sums of two distance_stats results (over more sequences)."""
    return b if a is None else {name: a[name] + b[name] for name in b}


def summarise(sums: dict) -> dict:
    """{"count", "mean", "var", "mass"} (Hq, n_buckets) float64 from distance_stats sums; NaN where
    a bucket has no pair (var needs two)."""
    n = sums["count"]
    mean = sums["sum_s"] / n
    var = (sums["sum_s2"] - n * mean * mean) / (n - 1)
    return {"count": n, "mean": mean, "var": var, "mass": sums["sum_mass"] / n}


@torch.no_grad()
def model_score_stats(model, windows, edges: Sequence[int], tau: float, device) -> list[dict]:
    """Per layer, summarise() of every window's scores, computed on `device` (float64: on a GPU
    seconds per 16k window, on a CPU minutes). windows: iterable of (tokens, positions, doc_ids or
    None), each (B, N)."""
    per_layer: list[dict | None] = []
    for tokens, positions, doc_ids in windows:
        tokens, positions = tokens.to(device), positions.to(device)
        doc_ids = doc_ids.to(device) if doc_ids is not None else None
        with captured_qk(model) as calls:
            model.hidden_states(tokens, positions, doc_ids)
        if not per_layer:
            per_layer = [None] * len(calls)
        for i, (q, k) in enumerate(calls):
            sums = distance_stats(q, k, positions, edges, tau, doc_ids)
            per_layer[i] = merge(per_layer[i], sums)
    return [summarise(s) for s in per_layer]
