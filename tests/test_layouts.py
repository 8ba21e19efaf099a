"""Sequence layouts: permutations of tokens with their positions (no processes needed)."""
from __future__ import annotations

import pytest
import torch

from scaleinv_dist.config import ParallelConfig
from scaleinv_dist.parallel import (CP_STRATEGIES, LAYOUTS, LayoutError, check_heads, check_seq_len,
                                    cp_strategy, layout_for, padded_seq_len, pieces_per_shard,
                                    shard_batch, shard_index, unshard)
from scaleinv_dist.parallel.topology import TopologyError, init_topology, init_topology_from_config


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_shard_index_is_a_permutation(layout, cp):
    seq_len = 48
    idx = shard_index(seq_len, cp, layout)
    assert idx.shape == (cp, seq_len // cp) and idx.dtype == torch.long
    assert torch.equal(idx.flatten().sort().values, torch.arange(seq_len))  # every token once


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_zigzag_rank_holds_chunks_r_and_2w_minus_1_minus_r(cp):
    seq_len = 16 * cp
    chunks = torch.arange(seq_len).view(2 * cp, -1)
    idx = shard_index(seq_len, cp, "zigzag")
    for r in range(cp):
        assert torch.equal(idx[r], torch.cat((chunks[r], chunks[2 * cp - 1 - r])))


def test_contiguous_and_striped_and_alias():
    assert torch.equal(shard_index(8, 2, "contiguous"), torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]))
    assert torch.equal(shard_index(8, 2, "ring"), shard_index(8, 2, "contiguous"))
    assert torch.equal(shard_index(8, 2, "striped"), torch.tensor([[0, 2, 4, 6], [1, 3, 5, 7]]))


def test_zigzag_balances_causal_work():
    """Every rank's queries see the same number of (query, key) pairs under a causal mask."""
    seq_len, cp = 64, 4
    idx = shard_index(seq_len, cp, "zigzag")
    work = [int((idx[r] + 1).sum()) for r in range(cp)]
    assert len(set(work)) == 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_batch_and_unshard_round_trip(layout):
    b, seq_len, cp = 3, 48, 4
    tokens = torch.randint(0, 100, (b, seq_len))
    positions = torch.arange(seq_len).repeat(b, 1)
    docs = torch.randint(0, 3, (b, seq_len)).cumsum(1)
    shards = [shard_batch(tokens, positions, None, docs, rank=r, cp_size=cp, layout=layout)
              for r in range(cp)]
    for r, (t, p, none, d) in enumerate(shards):
        assert none is None
        assert torch.equal(p[0], shard_index(seq_len, cp, layout)[r])  # positions are global
        assert torch.equal(t, tokens[:, p[0]]) and torch.equal(d, docs[:, p[0]])
    assert torch.equal(unshard([s[0] for s in shards], layout), tokens)
    assert torch.equal(unshard([s[1] for s in shards], layout), positions)
    x = torch.randn(b, 2, seq_len, 5)  # (B, H, N, D) along dim 2
    parts = [shard_batch(x, rank=r, cp_size=cp, layout=layout, dim=2) for r in range(cp)]
    assert torch.equal(unshard(parts, layout, dim=2), x)


def test_hybrid_zigzag_is_a_ring_zigzag_over_super_chunks():
    """With cp rank = u + U r, the union of a Ulysses group's zigzag shards is super-chunks r and
    2R-1-r of a zigzag over the R ring ranks: what Ulysses gathers is a balanced ring shard."""
    for u_deg, ring in ((2, 2), (2, 3), (4, 2), (3, 2)):
        cp = u_deg * ring
        seq_len = 2 * cp * 3
        idx = shard_index(seq_len, cp, layout_for("hybrid"))
        ring_idx = shard_index(seq_len, ring, "zigzag")
        for r in range(ring):
            group = idx[r * u_deg:(r + 1) * u_deg].flatten().sort().values
            assert torch.equal(group, ring_idx[r].sort().values)


def test_layout_for_strategies():
    assert layout_for("ring") == "contiguous"
    assert layout_for("zigzag") == "zigzag"
    assert layout_for("ulysses") == "contiguous"
    assert layout_for("hybrid") == "zigzag"
    assert pieces_per_shard("zigzag") == 2 and pieces_per_shard("contiguous") == 1
    with pytest.raises(LayoutError, match="choose one of ring, zigzag, ulysses, hybrid"):
        layout_for("zig-zag")
    with pytest.raises(LayoutError, match="unknown sequence layout"):
        shard_index(8, 2, "diagonal")


def test_non_divisible_lengths_name_lengths_that_work():
    with pytest.raises(LayoutError) as err:
        check_seq_len(1001, 4, "zigzag")
    msg = str(err.value)
    assert "seq_len 1001 is not divisible by 2 x context_parallel_size = 8" in msg
    assert "use a multiple of 8 such as 1001 -> 1008" in msg
    with pytest.raises(LayoutError, match=r"context_parallel_size = 3.*1000 -> 1002"):
        shard_index(1000, 3, "contiguous")
    with pytest.raises(LayoutError, match="not divisible by context_parallel_size = 4"):
        shard_batch(torch.zeros(2, 10), rank=0, cp_size=4, layout="striped")
    with pytest.raises(LayoutError, match="2 x context_parallel_size = 4"):
        shard_batch(torch.zeros(2, 10), rank=1, cp_size=2, layout="zigzag")
    with pytest.raises(LayoutError, match="rank 2 is outside"):
        shard_batch(torch.zeros(2, 8), rank=2, cp_size=2)
    assert padded_seq_len(1001, 4, "zigzag") == 1008
    assert padded_seq_len(1000, 4, "contiguous") == 1000
    check_seq_len(1008, 4, "zigzag")


def test_head_count_errors_name_the_fix():
    check_heads(16, 16, 4)  # split KV heads
    check_heads(16, 2, 4)  # replicate KV heads
    with pytest.raises(LayoutError, match=r"Ulysses degree 3 does not divide the 16 query heads.*2, 4, 8, 16"):
        check_heads(16, 16, 3)
    with pytest.raises(LayoutError, match="6 key/value heads: one must divide the other"):
        check_heads(12, 6, 4)


def test_topology_errors_before_any_process_group():
    with pytest.raises(TopologyError, match="must divide context_parallel_size 4; choose one of 1, 2, 4"):
        init_topology(4, 3)
    assert cp_strategy("zigzag").ulysses_degree(4, 2) == 1
    assert cp_strategy("ulysses").ulysses_degree(4, 1) == 4
    assert cp_strategy("hybrid").ulysses_degree(8, 2) == 2
    with pytest.raises(LayoutError, match="ulysses_degree 3 must divide parallel.context_parallel_size 8"):
        cp_strategy("hybrid").ulysses_degree(8, 3)
    with pytest.raises(LayoutError, match="unknown context-parallel strategy 'stripes'"):
        init_topology_from_config(ParallelConfig(context_parallel_size=4, cp_strategy="stripes"))


def test_strategy_table_is_the_one_source():
    """layout_for, the Ulysses degree and the divisibility checks all read CP_STRATEGIES."""
    assert tuple(CP_STRATEGIES) == ("ring", "zigzag", "ulysses", "hybrid")
    for name, spec in CP_STRATEGIES.items():
        assert spec.name == name and layout_for(name) == spec.layout
    # hybrid with U = 2 over 8 ranks: zigzag needs 16 | seq_len, and 2 | query heads
    cp_strategy("hybrid").check(seq_len=32, cp_size=8, n_heads=6, n_kv_heads=2, configured_ulysses=2)
    with pytest.raises(LayoutError, match="2 x context_parallel_size = 16"):
        cp_strategy("hybrid").check(seq_len=40, cp_size=8, n_heads=6, n_kv_heads=2, configured_ulysses=2)
    with pytest.raises(LayoutError, match="Ulysses degree 4 does not divide the 6 query heads"):
        cp_strategy("hybrid").check(seq_len=32, cp_size=8, n_heads=6, n_kv_heads=2, configured_ulysses=4)
    # ulysses takes every rank for the all-to-all; ring and zigzag none, whatever is configured
    with pytest.raises(LayoutError, match="Ulysses degree 8 does not divide the 6 query heads"):
        cp_strategy("ulysses").check(seq_len=32, cp_size=8, n_heads=6, n_kv_heads=6)
    cp_strategy("ring").check(seq_len=24, cp_size=8, n_heads=6, n_kv_heads=6, configured_ulysses=4)
    with pytest.raises(LayoutError, match="context_parallel_size = 8"):
        cp_strategy("ring").check(seq_len=20, cp_size=8, n_heads=6, n_kv_heads=6)
