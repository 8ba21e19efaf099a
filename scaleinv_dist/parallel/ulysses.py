"""Ulysses: all-to-all from sequence-sharded (B, H, n, D) to head-sharded (B, H/U, U n, D) and back.

Within a Ulysses group of U ranks, rank u ends up with heads [u H/U, (u+1) H/U) for the tokens of
all U ranks; attention over those tokens is then local (or, for hybrid, a ring across the ring
groups). Positions and document ids are all-gathered in the same order as the tokens, so the kernel
sees the right global positions whatever the layout.

Gathered token order is piece-major: a shard made of P equal runs (zigzag: head and tail) is
gathered as [run 0 of ranks 0..U-1, run 1 of ranks 0..U-1, ...], so a zigzag hybrid shard is again
"head super-chunk, tail super-chunk" for the ring's skip plan. The order never changes the numbers.

With grouped-query attention, KV heads are split when U divides them and replicated (each KV head
repeated U / Hkv times before the all-to-all, gradients summed back) when they divide U.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .layouts import check_heads


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_head(x: torch.Tensor, group, size: int, pieces: int) -> torch.Tensor:
    b, h, n, d = x.shape
    send = x.reshape(b, size, h // size, n, d).transpose(0, 1).contiguous()  # (U, B, h, n, D)
    recv = _all_to_all(send, group)  # [u'] = rank u''s tokens, my heads
    recv = recv.view(size, b, h // size, pieces, n // pieces, d).permute(1, 2, 3, 0, 4, 5)
    return recv.reshape(b, h // size, size * n, d)


def _head_to_seq(y: torch.Tensor, group, size: int, pieces: int) -> torch.Tensor:
    b, h, m, d = y.shape
    n = m // size
    send = y.reshape(b, h, pieces, size, n // pieces, d).permute(3, 0, 1, 2, 4, 5).contiguous()
    recv = _all_to_all(send, group).view(size, b, h, n, d)  # [u'] = head group u', my tokens
    return recv.transpose(0, 1).reshape(b, size * h, n, d)


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, size, pieces):
        ctx.args = (group, size, pieces)
        return _seq_to_head(x, *ctx.args)

    @staticmethod
    def backward(ctx, dy):
        return _head_to_seq(dy.contiguous(), *ctx.args), None, None, None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group, size, pieces):
        ctx.args = (group, size, pieces)
        return _head_to_seq(y, *ctx.args)

    @staticmethod
    def backward(ctx, dx):
        return _seq_to_head(dx.contiguous(), *ctx.args), None, None, None


def seq_to_head(x: torch.Tensor, group, pieces: int = 1) -> torch.Tensor:
    """(B, H, n, D) sequence shard -> (B, H/U, U n, D) head shard (autograd-aware)."""
    size = dist.get_world_size(group)
    if size == 1:
        return x
    return _SeqToHead.apply(x, group, size, pieces)


def head_to_seq(y: torch.Tensor, group, pieces: int = 1) -> torch.Tensor:
    """(B, H/U, U n, D) head shard -> (B, H, n, D) sequence shard (autograd-aware)."""
    size = dist.get_world_size(group)
    if size == 1:
        return y
    return _HeadToSeq.apply(y, group, size, pieces)


def gather_seq(x: torch.Tensor, group, pieces: int = 1) -> torch.Tensor:
    """(B, n) per-token data (positions, document ids) of the group, in seq_to_head's token order."""
    size = dist.get_world_size(group)
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    b, n = x.shape
    g = torch.stack(parts).view(size, b, pieces, n // pieces).permute(1, 2, 0, 3)
    return g.reshape(b, size * n)


def expand_kv_heads(k: torch.Tensor, n_heads: int, size: int) -> torch.Tensor:
    """Repeat KV heads so that a Ulysses degree larger than Hkv still gives each rank its KV head."""
    hkv = k.shape[1]
    check_heads(n_heads, hkv, size)
    if hkv % size == 0:
        return k
    return k.repeat_interleave(size // hkv, dim=1)


def local_heads(x: torch.Tensor | None, rank: int, size: int) -> torch.Tensor | None:
    """The slice of a per-head vector (e.g. ALiBi slopes (H,)) for this Ulysses rank."""
    if x is None or size == 1:
        return x
    h = x.shape[0] // size
    return x[rank * h:(rank + 1) * h]
