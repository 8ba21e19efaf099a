"""Validation loss at several context lengths, and by log-spaced position bucket.

Every length scores the same held-out documents: the data layer cuts each validation document into
non-overlapping windows of that length (`validation_windows`), so a length trend is not a trend in
which documents were scored. Loss is also split by the position of the predicting token (its
context size: the position the model sees) into buckets [0,1), [1,2), [2,4), [4,8), ... so one
can see where a method breaks (typically just past the training length).

Bucket sums and counts are additive, so shards of a window (context parallelism) or several
processes merge by summing.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch

from ..loss import token_cross_entropy
from .common import autocast

Batch = object  # scaleinv_dist.data.Batch: tokens, labels, positions, doc_ids, each (B, L) int64


# ----------------------------------------------------------------------------- buckets
def n_buckets(length: int) -> int:
    """Number of log-spaced buckets covering positions 0 .. length-1."""
    return int(length - 1).bit_length() + 1


def bucket_edges(length: int) -> list[int]:
    """Edges [0, 1, 2, 4, ...]; bucket i is [edges[i], edges[i+1]), the last edge clipped to length."""
    edges = [0] + [2 ** i for i in range(n_buckets(length))]
    edges[-1] = min(edges[-1], length)
    return edges


def bucket_index(positions: torch.Tensor) -> torch.Tensor:
    """Bucket of each integer position: 0 for 0, else floor(log2 p) + 1 (same shape, int64)."""
    p = positions.to(torch.int64).clamp_min(0)
    idx = torch.floor(torch.log2(p.clamp_min(1).to(torch.float64))).to(torch.int64) + 1
    return torch.where(p == 0, torch.zeros_like(idx), idx)


# ----------------------------------------------------------------------------- per-token loss
def token_losses(model, tokens: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor | None,
                 labels: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
    """Cross-entropy of every token, (B, N) float32, 0 where labels == -100.

    Computes logits chunk by chunk from the final hidden states (never the full N x V logits).
    """
    h = model.hidden_states(tokens, positions, doc_ids)
    chunk = chunk_tokens or getattr(model, "loss_chunk_tokens", 8192)
    return token_cross_entropy(h, model.lm_head.weight, labels, chunk)


def bucket_sums(losses: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor,
                nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bucket (loss sum float64 (nb,), token count float64 (nb,)) over scored tokens."""
    mask = labels != -100
    idx = bucket_index(positions)[mask].clamp_max(nb - 1)
    sums = torch.zeros(nb, dtype=torch.float64, device=losses.device)
    counts = torch.zeros(nb, dtype=torch.float64, device=losses.device)
    sums.index_add_(0, idx, losses[mask].to(torch.float64))
    counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
    return sums, counts


# ----------------------------------------------------------------------------- evaluation
def _progress(iterable, total: int | None, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=None)


@torch.no_grad()
def evaluate_length(model, windows: Iterable, length: int, device, *,
                    shard: Callable | None = None, reduce: Callable | None = None,
                    dp: tuple[int, int] = (0, 1), cp_size: int = 1, progress: bool = False,
                    total_windows: int | None = None) -> dict:
    """Loss of `model` over the batches `windows` (each (B, length)); see evaluate_lengths."""
    nb = n_buckets(length)
    sums = torch.zeros(nb, dtype=torch.float64, device=device)
    counts = torch.zeros(nb, dtype=torch.float64, device=device)
    n_windows = 0
    dp_rank, dp_size = dp
    for i, batch in enumerate(_progress(windows, total_windows, f"eval L={length}", progress)):
        if i % dp_size != dp_rank:  # data parallel: batches round-robin over replicas
            continue
        labels = batch.labels
        n_windows += int((labels != -100).any(dim=1).sum())
        if shard is not None:  # context parallelism: this rank's tokens of each window
            batch = shard(batch)
        tokens, positions, labels = (t.to(device) for t in (batch.tokens, batch.positions, batch.labels))
        doc_ids = None if batch.doc_ids is None else batch.doc_ids.to(device)
        with autocast(device):
            losses = token_losses(model, tokens, positions, doc_ids, labels)
        s, c = bucket_sums(losses, positions, labels, nb)
        sums += s
        counts += c
    if reduce is not None:  # sums, counts over all ranks; windows over data-parallel replicas
        both = torch.cat([sums, counts, torch.tensor([float(n_windows)], dtype=torch.float64, device=device)])
        reduce(both)
        sums, counts, n_windows = both[:nb], both[nb:2 * nb], int(round(float(both[-1]) / max(1, cp_size)))
    total, n = float(sums.sum()), int(counts.sum())
    edges = bucket_edges(length)
    buckets = [{"lo": edges[i], "hi": edges[i + 1], "loss_sum": float(sums[i]), "count": int(counts[i]),
                "loss": float(sums[i] / counts[i]) if counts[i] > 0 else None} for i in range(nb)]
    return {"context_length": int(length), "loss": total / n if n else float("nan"),
            "ppl": math.exp(total / n) if n and total / n < 700 else float("inf") if n else float("nan"),
            "tokens": n, "windows": n_windows, "loss_sum": total, "buckets": buckets}


def evaluate_lengths(model, val_store, lengths: Sequence[int], max_tokens: int = 0, batch_size: int = 1,
                     device="cpu", *, shard: Callable | None = None, reduce: Callable | None = None,
                     align_to: int = 0, dp: tuple[int, int] = (0, 1), cp_size: int = 1,
                     progress: bool = True, windows_fn: Callable | None = None) -> dict:
    """Validation loss of `model` at each context length, on the same held-out documents.

    Returns {length: {"context_length", "loss" (nats/token), "ppl", "tokens" (scored), "windows",
    "loss_sum", "buckets": [{"lo", "hi", "loss_sum", "count", "loss"}]}}. max_tokens > 0 caps the
    validation tokens per length (0 = all). align_to = A (a multiple of every length, e.g. their
    lcm) cuts every document to the same prefix of whole A-blocks, so every length scores exactly
    the same tokens (count_validation_tokens(store, L, max_tokens, A) is then the same for all L);
    0 scores every whole window of each length. `shard(batch) -> batch` gives this rank's part of each
    window and `reduce(tensor)` all-reduces (sums) in place over all ranks, for context parallelism
    (cp_size ranks share each window); dp = (rank, size) deals batches round-robin to data-parallel
    replicas.
    Runs under no_grad with bf16 autocast on CUDA; the model is put in eval mode.
    """
    if windows_fn is None:
        from ..data import validation_windows as windows_fn
    device = torch.device(device)
    model.eval()
    results = {}
    for length in lengths:
        windows = windows_fn(val_store, int(length), max_tokens=max_tokens, batch_size=batch_size,
                             align_to=align_to)
        total = _count_windows(val_store, int(length), max_tokens, batch_size, align_to)
        results[int(length)] = evaluate_length(model, windows, int(length), device, shard=shard,
                                               reduce=reduce, dp=dp, cp_size=cp_size, progress=progress,
                                               total_windows=total)
    return results


def _count_windows(val_store, length: int, max_tokens: int, batch_size: int, align_to: int) -> int | None:
    """Number of batches, for the progress bar (None if unknown)."""
    try:
        from ..data import count_validation_tokens

        n = count_validation_tokens(val_store, length, max_tokens, align_to)
    except Exception:
        return None
    return max(1, math.ceil(n / length / max(1, batch_size)))
