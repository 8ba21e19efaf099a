"""This rank's context-parallel part of a batch: the one place training and evaluation cut batches.

    sharder = CPSharder(topology, cfg.parallel.cp_strategy)
    sharder.check(seq_len)            # LayoutError when seq_len cannot be split evenly
    local = sharder(batch)            # tokens / labels / positions / doc_ids: (B, L / cp_size)

Every tensor of the batch is cut with the strategy's layout (`layouts.layout_for`); tokens keep
their global positions and document ids, which is all the context-parallel attention needs.
"""
from __future__ import annotations

import dataclasses

from .layouts import check_seq_len, layout_for, shard_batch


class CPSharder:
    """Cuts (B, L) batches (any dataclass with tokens, labels, positions, doc_ids; doc_ids may be
    None) into this rank's (B, L / cp_size) shard, for the topology's context-parallel group."""

    def __init__(self, topology, strategy: str):
        self.rank, self.size = topology.cp_rank, topology.cp_size
        self.layout = layout_for(strategy)

    def check(self, seq_len: int) -> None:
        check_seq_len(seq_len, self.size, self.layout)

    def __call__(self, batch):
        tokens, labels, positions, doc_ids = shard_batch(
            batch.tokens, batch.labels, batch.positions, batch.doc_ids, rank=self.rank,
            cp_size=self.size, layout=self.layout)
        return dataclasses.replace(batch, tokens=tokens, labels=labels, positions=positions,
                                   doc_ids=doc_ids)
