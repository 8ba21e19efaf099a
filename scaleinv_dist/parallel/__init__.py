"""Sequence (context) parallelism: layouts, topology, ring / Ulysses attention, apply_cp.

Positions are data: a layout is a permutation of tokens carrying their global positions and
document ids; ring, zigzag, Ulysses and hybrid are one code path (Ulysses over the Ulysses group,
then a ring over the ring group). See docs/parallel.md.
"""
from .context_parallel import ContextParallelAttention, apply_cp
from .layouts import (CP_STRATEGIES, LAYOUTS, STRATEGIES, CPStrategy, LayoutError, check_heads,
                      check_seq_len, cp_strategy, layout_for, padded_seq_len, pieces_per_shard,
                      shard_batch, shard_index, unshard)
from .ring import RingComm, RingPlan, build_ring_plan, merge_lse, ring_attention
from .topology import (Topology, TopologyError, destroy_topology, init_topology,
                       init_topology_from_config)
from .ulysses import gather_seq, head_to_seq, seq_to_head

__all__ = [
    "ContextParallelAttention", "apply_cp",
    "CP_STRATEGIES", "CPStrategy", "LAYOUTS", "STRATEGIES", "LayoutError", "check_heads",
    "check_seq_len", "cp_strategy", "layout_for",
    "padded_seq_len", "pieces_per_shard", "shard_batch", "shard_index", "unshard",
    "RingComm", "RingPlan", "build_ring_plan", "merge_lse", "ring_attention",
    "Topology", "TopologyError", "destroy_topology", "init_topology", "init_topology_from_config",
    "gather_seq", "head_to_seq", "seq_to_head",
]
