"""Chunked cross-entropy: the full (tokens x vocabulary) logits of a long sequence never exist.

Each chunk's logits are computed, reduced to a loss and dropped; the backward recomputes them
(activation checkpointing per chunk), so peak memory is chunk_tokens x vocab instead of N x vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # a label that is not scored (cross_entropy's default ignore_index)


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = (h @ weight.t()).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token losses (fp32 scalar) and the number of scored tokens (labels != IGNORE_INDEX).

    hidden (B, N, d), weight (V, d) the output head, labels (B, N) int64.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    step = max(1, int(chunk_tokens))
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], step):
        hs, ys = h[s:s + step], y[s:s + step]
        if torch.is_grad_enabled() and h.shape[0] > step:
            total = total + checkpoint(_chunk_loss, hs, weight, ys, use_reentrant=False)
        else:
            total = total + _chunk_loss(hs, weight, ys)
    return total, (y != IGNORE_INDEX).sum()
