"""Sequence layouts: which global tokens (with their positions and document ids) each rank holds.

Positions are data. A layout is nothing but a permutation of the sequence's token indices, cut into
`cp_size` equal shards; every tensor that lives along the sequence (tokens, labels, positions,
document ids) is sharded with the same index, so each rank knows the global position and document
of every token it holds. Attention, RoPE, the transform's t, the causal mask and the loss all read
those positions, so no other code depends on the layout: it only decides the load balance.

    contiguous (alias "ring")  rank r holds tokens [r n, (r+1) n), n = L / W
    zigzag                     2W chunks of L / 2W; rank r holds chunks r and 2W-1-r (head + tail),
                               so every rank does the same causal work
    striped                    rank r holds tokens r, r+W, r+2W, ...

`shard_index(seq_len, cp_size, layout)` is the (W, L/W) index table; `shard_batch` slices (B, L)
tensors for one rank; `unshard` puts per-rank shards back in order (tests, evaluation).

Hybrid (Ulysses inside, ring across) uses the plain zigzag layout over all W = U x R ranks: a
Ulysses group is U consecutive context-parallel ranks r U .. r U + U-1 (see topology.py), whose
zigzag chunks together are super-chunk r and super-chunk 2R-1-r of a zigzag over the R ring ranks
(each super-chunk = U chunks). So what Ulysses gathers is exactly a balanced zigzag shard of the
ring dimension; the tail chunks arrive in reverse order, which does not matter because positions
travel with the tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

LAYOUTS = ("contiguous", "zigzag", "striped")
_ALIASES = {"ring": "contiguous", "head_tail": "zigzag", "stripe": "striped"}


class LayoutError(ValueError):
    """A sequence length, head count or parallel size that a context-parallel layout cannot use."""


def divisors(n: int) -> str:
    """'1, 2, 4' for n = 4: the sizes that split n evenly, for error messages."""
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass(frozen=True)
class CPStrategy:
    """What a context-parallel strategy implies (the one home of this knowledge; see CP_STRATEGIES).

    layout    how batches are sharded over the W context-parallel ranks (shard_batch)
    ulysses   the all-to-all (Ulysses) degree U: "none" (1, a ring over all W ranks), "all" (W, no
              ring) or "configured" (parallel.ulysses_degree, a ring over the R = W / U groups)
    Divisibility: the sequence length by the layout's multiple (W, or 2W for zigzag), the query
    heads by U, and the KV heads by U or U by them (check).
    """

    name: str
    layout: str
    ulysses: str

    def ulysses_degree(self, cp_size: int, configured: int = 1) -> int:
        """U for cp_size ranks; `configured` is parallel.ulysses_degree (used by hybrid only)."""
        if self.ulysses == "none":
            return 1
        if self.ulysses == "all":
            return cp_size
        if configured < 1 or cp_size % configured:
            raise LayoutError(f"parallel.ulysses_degree {configured} must divide "
                              f"parallel.context_parallel_size {cp_size}; choose one of "
                              f"{divisors(cp_size)}")
        return configured

    def check(self, seq_len: int, cp_size: int, n_heads: int, n_kv_heads: int,
              configured_ulysses: int = 1) -> None:
        """LayoutError, naming the fix, when this strategy can't split the sequence or the heads."""
        check_seq_len(seq_len, cp_size, self.layout)
        check_heads(n_heads, n_kv_heads, self.ulysses_degree(cp_size, configured_ulysses))


CP_STRATEGIES = {s.name: s for s in (
    CPStrategy("ring", layout="contiguous", ulysses="none"),
    CPStrategy("zigzag", layout="zigzag", ulysses="none"),
    CPStrategy("ulysses", layout="contiguous", ulysses="all"),
    CPStrategy("hybrid", layout="zigzag", ulysses="configured"),  # see the module docstring
)}
STRATEGIES = tuple(CP_STRATEGIES)


def cp_strategy(name: str) -> CPStrategy:
    """CP_STRATEGIES[name], or a LayoutError listing the strategies."""
    if name not in CP_STRATEGIES:
        raise LayoutError(f"unknown context-parallel strategy {name!r}; choose one of "
                          f"{', '.join(STRATEGIES)}")
    return CP_STRATEGIES[name]


def normalize_layout(layout: str) -> str:
    name = _ALIASES.get(layout, layout)
    if name not in LAYOUTS:
        raise LayoutError(f"unknown sequence layout {layout!r}; choose one of {', '.join(LAYOUTS)} "
                          f"(or 'ring' for contiguous)")
    return name


def layout_for(strategy: str) -> str:
    """The layout the data loader must shard batches with for a context-parallel strategy."""
    return cp_strategy(strategy).layout


def pieces_per_shard(layout: str) -> int:
    """How many contiguous runs of positions a shard of this layout is made of (zigzag: 2).

    Ring attention uses this only to skip fully masked sub-blocks; results never depend on it.
    """
    return 2 if normalize_layout(layout) == "zigzag" else 1


def seq_len_multiple(cp_size: int, layout: str) -> int:
    """Sequence lengths must be a multiple of this (W, or 2W for zigzag)."""
    return 2 * cp_size if normalize_layout(layout) == "zigzag" else cp_size


def padded_seq_len(seq_len: int, cp_size: int, layout: str) -> int:
    """The smallest length >= seq_len that the layout can shard (pad to it and mask the padding)."""
    m = seq_len_multiple(cp_size, layout)
    return -(-seq_len // m) * m


def check_seq_len(seq_len: int, cp_size: int, layout: str) -> None:
    """Raise LayoutError, naming lengths that work, when seq_len can't be sharded evenly."""
    if cp_size < 1:
        raise LayoutError(f"context_parallel_size must be >= 1, got {cp_size}")
    name = normalize_layout(layout)
    m = seq_len_multiple(cp_size, name)
    if seq_len < m or seq_len % m:
        what = (f"2 x context_parallel_size = {m}" if name == "zigzag"
                else f"context_parallel_size = {m}")
        up = padded_seq_len(max(seq_len, 1), cp_size, name)
        raise LayoutError(
            f"seq_len {seq_len} is not divisible by {what} ({name} layout); use a multiple of {m} "
            f"such as {seq_len} -> {up}, or pad the batch to {up} tokens and mask the padding")


def shard_index(seq_len: int, cp_size: int, layout: str = "contiguous") -> torch.Tensor:
    """LongTensor (cp_size, seq_len // cp_size): the global token indices each rank holds, in order."""
    check_seq_len(seq_len, cp_size, layout)
    name = normalize_layout(layout)
    idx = torch.arange(seq_len)
    if name == "contiguous":
        return idx.view(cp_size, seq_len // cp_size)
    if name == "striped":
        return idx.view(seq_len // cp_size, cp_size).t().contiguous()
    chunks = idx.view(2 * cp_size, seq_len // (2 * cp_size))
    ranks = torch.arange(cp_size)
    return torch.cat((chunks[ranks], chunks[2 * cp_size - 1 - ranks]), dim=1)


def shard_batch(*tensors: torch.Tensor | None, rank: int, cp_size: int, layout: str = "contiguous",
                dim: int = 1):
    """This rank's shard of each tensor along the sequence dimension `dim` (default: (B, L) batches).

    All tensors are cut with the same index, e.g.
        tokens, labels, pos, docs = shard_batch(tokens, labels, pos, docs, rank=r, cp_size=W,
                                                layout=layout_for(strategy))
    None passes through. Returns a tuple (a single tensor when one was given). The contiguous layout
    returns views; the others copy.
    """
    if not 0 <= rank < cp_size:
        raise LayoutError(f"rank {rank} is outside 0 .. {cp_size - 1}")
    lengths = {t.shape[dim] for t in tensors if t is not None}
    if len(lengths) > 1:
        raise LayoutError(f"tensors to shard disagree in sequence length (dim {dim}): {sorted(lengths)}")
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        seq_len = t.shape[dim]
        name = normalize_layout(layout)
        if name == "contiguous":
            check_seq_len(seq_len, cp_size, name)
            n = seq_len // cp_size
            out.append(t.narrow(dim, rank * n, n))
        else:
            index = shard_index(seq_len, cp_size, name)[rank].to(t.device)
            out.append(t.index_select(dim, index))
    return out[0] if len(out) == 1 else tuple(out)


def unshard(shards: Sequence[torch.Tensor], layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """Inverse of shard_batch: the per-rank shards (rank order) back in global sequence order."""
    cp_size = len(shards)
    seq_len = sum(s.shape[dim] for s in shards)
    index = shard_index(seq_len, cp_size, layout).reshape(-1).to(shards[0].device)
    cat = torch.cat(list(shards), dim=dim)
    out = torch.empty_like(cat)
    out.index_copy_(dim, index, cat)
    return out


def check_heads(n_heads: int, n_kv_heads: int, ulysses_degree: int) -> None:
    """Ulysses splits heads: query heads must divide by the degree; KV heads divide it or by it."""
    u = ulysses_degree
    if u <= 1:
        return
    if n_heads % u:
        ok = [d for d in range(2, n_heads + 1) if n_heads % d == 0]
        raise LayoutError(
            f"Ulysses degree {u} does not divide the {n_heads} query heads; use a "
            f"parallel.ulysses_degree that divides {n_heads} ({', '.join(map(str, ok)) or 'none'}), "
            f"or strategy zigzag / hybrid with a smaller ulysses_degree (the ring takes the rest)")
    if n_kv_heads % u and u % n_kv_heads:
        raise LayoutError(
            f"Ulysses degree {u} and {n_kv_heads} key/value heads: one must divide the other "
            f"(KV heads are split when {n_kv_heads} % {u} == 0 and replicated when {u} % "
            f"{n_kv_heads} == 0); use ulysses_degree {math.gcd(u, n_kv_heads)} with hybrid, or "
            f"change model.n_kv_head")
