"""The Triton kernel's plan cache (flash_si.PlanCache): the tile-classification pre-pass runs once
per distinct set of position / document-id tensors, and reuse never changes a result.

CPU under TRITON_INTERPRET=1 (set before triton is imported). Results with the cache are compared
bit for bit (torch.equal) with results computed with the cache off, where every call builds its
own plan as before the cache existed. Launch counts come from counting wrappers around the two
pre-pass kernels (_bounds_kernel, _lists_kernel); no timing is measured.
"""
import json
import os
import socket
import tempfile

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from scaleinv_dist.attention import scale_invariant_attention  # noqa: E402
from scaleinv_dist.kernels import flash_si  # noqa: E402

TAU = 10.0


class _Counted:
    """Stands in for a Triton kernel: kernel[grid](...) launches it and counts the launch."""

    def __init__(self, kernel, counts, name):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counts[self.name] += 1
            return self.kernel[grid](*args, **kwargs)
        return launch


def count_prepass(monkeypatch) -> dict:
    """Counts of pre-pass launches from now on: {'bounds': n, 'lists': n}."""
    counts = {"bounds": 0, "lists": 0}
    monkeypatch.setattr(flash_si, "_bounds_kernel", _Counted(flash_si._bounds_kernel, counts,
                                                             "bounds"))
    monkeypatch.setattr(flash_si, "_lists_kernel", _Counted(flash_si._lists_kernel, counts,
                                                            "lists"))
    return counts


@pytest.fixture(autouse=True)
def fresh_cache():
    cache = flash_si.plan_cache
    saved = cache.max_entries, cache.max_bytes
    cache.clear()
    yield cache
    cache.max_entries, cache.max_bytes = saved
    cache.clear()


def make(seed, b, hq, hkv, nq, nk, d, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, nq, d, generator=g).to(dtype),
            torch.randn(b, hkv, nk, d, generator=g).to(dtype),
            torch.randn(b, hkv, nk, d, generator=g).to(dtype),
            torch.randn(b, hq, nq, d, generator=g).to(dtype))


def run(q, k, v, do, q_pos, k_pos, q_seg=None, k_seg=None, causal=True):
    """out, lse, dq, dk, dv of one forward and backward through the contract."""
    opts = dict(scale=q.shape[-1] ** -0.5, tau=TAU, causal=causal, transform="scale_invariant")
    out, lse = flash_si.forward(q, k, v, q_pos, k_pos, q_seg, k_seg, **opts)
    return (out, lse, *flash_si.backward(do, q, k, v, out, lse, q_pos, k_pos, q_seg, k_seg, **opts))


def uncached(*args, **kwargs):
    cache = flash_si.plan_cache
    saved = cache.max_entries
    cache.max_entries = 0
    try:
        return run(*args, **kwargs)
    finally:
        cache.max_entries = saved


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


def _cases():
    """name -> (q, k, v, do, q_pos, k_pos, q_seg, k_seg, causal)."""
    g = torch.Generator().manual_seed(0)
    n, c = 160, 40
    chunks = torch.arange(n).view(4, c)
    k_gap = torch.randint(1, 6, (2, 120), generator=g).cumsum(1)
    q_seg = (torch.arange(96) // 24)[None]
    perm = torch.randperm(100, generator=g)
    return {
        "contiguous": (*make(1, 1, 2, 2, 100, 100, 16), torch.arange(100)[None],
                       torch.arange(100)[None],
                       None, None, True),
        "gapped_per_batch": (*make(2, 2, 2, 1, 90, 120, 16), k_gap[:, 30:] + 1, k_gap,
                             None, None, True),
        "permuted_bidirectional": (*make(3, 1, 2, 2, 100, 100, 16), perm[None], perm[None],
                                   None, None, False),
        "zigzag": (*make(4, 1, 2, 2, 2 * c, n, 32), torch.cat([chunks[0], chunks[3]])[None],
                   torch.cat([chunks[2], chunks[0], chunks[3], chunks[1]])[None], None, None,
                   True),
        "documents": (*make(5, 1, 2, 1, 96, 70, 32), torch.arange(96)[None],
                      (torch.arange(70) + 26)[None], q_seg, ((torch.arange(70) + 26) // 24)[None],
                      True),
        "gqa_fp16": (*make(6, 2, 4, 1, 72, 72, 16, torch.float16), torch.arange(72)[None],
                     torch.arange(72)[None], None, None, True),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_cached_equals_uncached_bitwise(name):
    """The forward builds the plan, the backward and a second call reuse it (hits), and every
    result is bit-identical to the cache-off path."""
    *qkvdo, q_pos, k_pos, q_seg, k_seg, causal = CASES[name]
    cache = flash_si.plan_cache
    want = uncached(*qkvdo, q_pos, k_pos, q_seg, k_seg, causal=causal)
    assert len(cache.entries) == 0 and cache.misses == 2 and cache.hits == 0
    first = run(*qkvdo, q_pos, k_pos, q_seg, k_seg, causal=causal)
    assert (cache.misses, cache.hits) == (3, 1)  # backward reused the forward's plan
    again = run(*qkvdo, q_pos, k_pos, q_seg, k_seg, causal=causal)
    assert (cache.misses, cache.hits) == (3, 3) and len(cache.entries) == 1
    assert_same(first, want)
    assert_same(again, want)


def test_in_place_write_misses_and_stays_correct():
    q, k, v, do, q_pos, k_pos, q_seg, k_seg, causal = CASES["documents"]
    q_pos, k_pos, k_seg = q_pos.clone(), k_pos.clone(), k_seg.clone()
    cache = flash_si.plan_cache
    before = run(q, k, v, do, q_pos, k_pos, q_seg, k_seg)
    misses = cache.misses
    k_pos.add_(-20)  # keys move earlier: more of them are visible
    after = run(q, k, v, do, q_pos, k_pos, q_seg, k_seg)
    assert cache.misses == misses + 1
    assert not torch.equal(after[0], before[0])
    assert_same(after, uncached(q, k, v, do, q_pos, k_pos, q_seg, k_seg))
    k_seg[:, :10] = -1  # document ids too
    misses = cache.misses
    got = run(q, k, v, do, q_pos, k_pos, q_seg, k_seg)
    assert cache.misses == misses + 1
    assert_same(got, uncached(q, k, v, do, q_pos, k_pos, q_seg, k_seg))


def test_other_tensors_with_equal_or_other_values_are_correct():
    """A value-equal clone (other identity) and a new tensor made after the cached one was
    dropped (the cache holds it, so its memory cannot be reused) never see a stale plan."""
    q, k, v, do, q_pos, k_pos, *_ = CASES["gapped_per_batch"]
    want = uncached(q, k, v, do, q_pos, k_pos)
    assert_same(run(q, k, v, do, q_pos.clone(), k_pos.clone()), want)
    tmp_q, tmp_k = q_pos.clone(), k_pos.clone()
    run(q, k, v, do, tmp_q, tmp_k)
    del tmp_q, tmp_k
    shifted_k = k_pos.clone() - 50
    shifted_q = q_pos.clone()
    assert_same(run(q, k, v, do, shifted_q, shifted_k),
                uncached(q, k, v, do, shifted_q, shifted_k))


def test_bounds_evict_least_recently_used():
    q, k, v, do, *_ = CASES["contiguous"]
    cache = flash_si.plan_cache
    cache.max_entries = 2
    pos = [(torch.arange(100) + i)[None] for i in range(3)]
    for p in pos:
        run(q, k, v, do, p, p)
    assert len(cache.entries) == 2
    hits = cache.hits
    run(q, k, v, do, pos[2], pos[2])
    assert cache.hits == hits + 2
    misses = cache.misses
    run(q, k, v, do, pos[0], pos[0])  # evicted: rebuilt (and correct)
    assert cache.misses == misses + 1
    cache.max_bytes = 0  # nothing fits: every call builds its own plan
    run(q, k, v, do, pos[1], pos[1])
    assert len(cache.entries) == 0


def test_inference_tensors_are_not_cached():
    q, k, v, _, *_ = CASES["contiguous"]
    with torch.inference_mode():
        pos = torch.arange(100)
    opts = dict(scale=0.25, tau=TAU, causal=True, transform="scale_invariant")
    flash_si.forward(q, k, v, pos[None], pos[None], **opts)
    assert len(flash_si.plan_cache.entries) == 0


def _expected_prepass(dtype, d):
    """(bounds, lists) launches of one plan: the distinct tile sizes of forward and backward."""
    (bm, bn, *_), (bm1, bn1, bm2, bn2, *_) = flash_si._tiles(dtype, flash_si.block_d(d))
    bounds = {(True, bm), (False, bn), (True, bm1), (False, bn1), (True, bm2), (False, bn2)}
    lists = {(True, bm, bn), (False, bn1, bm1), (True, bm2, bn2)}
    return len(bounds), len(lists)


def _model_step(layers, q, k, v, do, pos):
    """`layers` attention layers on one batch (same position tensors), forward then backward."""
    grads = []
    for _ in range(layers):
        qs, ks, vs = (x.clone().requires_grad_(True) for x in (q, k, v))
        out = scale_invariant_attention(qs, ks, vs, pos, pos, backend="triton", tau=TAU)
        out.backward(do)
        grads.append((out.detach(), qs.grad, ks.grad, vs.grad))
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prepass_runs_once_per_plan(monkeypatch, dtype):
    """A 1-layer and a 3-layer step run the same number of pre-pass launches: one per distinct
    tile size (bounds) and tile-size pair (lists), not per call; with the cache off they scale
    with the layers (forward 2 + 1, backward up to 4 + 2 per layer)."""
    q, k, v, do = make(7, 1, 2, 2, 150, 150, 16, dtype)
    pos = torch.arange(150) + 3
    counts = count_prepass(monkeypatch)
    one = _model_step(1, q, k, v, do, pos)
    n_bounds, n_lists = _expected_prepass(dtype, 16)
    assert counts == {"bounds": n_bounds, "lists": n_lists}
    flash_si.plan_cache.clear()
    counts.update(bounds=0, lists=0)
    three = _model_step(3, q, k, v, do, pos)
    assert counts == {"bounds": n_bounds, "lists": n_lists}
    flash_si.plan_cache.max_entries = 0
    counts.update(bounds=0, lists=0)
    off = _model_step(3, q, k, v, do, pos)
    _, (bm1, bn1, bm2, bn2, *_) = flash_si._tiles(dtype, 16)
    per_layer_bounds = 2 + 2 + (bm2 != bm1) + (bn2 != bn1)  # what the code did before the cache
    assert counts == {"bounds": 3 * per_layer_bounds, "lists": 3 * 3}
    assert n_bounds < 3 * per_layer_bounds and n_lists < 3 * 3
    for g in one + three + off:  # every layer computes the same thing
        assert_same(g, one[0])


# ----------------------------------------------------------------------------- ring attention
def _ring_worker(rank: int, world: int, port: int, path: str) -> None:
    import torch.distributed as dist

    from scaleinv_dist.parallel import (ContextParallelAttention, destroy_topology,
                                        init_topology, shard_batch)

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    counts = {"bounds": 0, "lists": 0}
    flash_si._bounds_kernel = _Counted(flash_si._bounds_kernel, counts, "bounds")
    flash_si._lists_kernel = _Counted(flash_si._lists_kernel, counts, "lists")
    report = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        topo = init_topology(world, 1, timeout_s=120, backend="gloo")
        n = 128
        q, k, v, do = make(11, 1, 2, 2, n, n, 16)
        pos = torch.arange(n)[None]
        shard = dict(rank=topo.cp_rank, cp_size=topo.cp_size, layout="zigzag")
        ql, kl, vl, dol = shard_batch(q, k, v, do, dim=2, **shard)
        pos_l = shard_batch(pos, **shard)
        attend = ContextParallelAttention(topo, "zigzag", backend="triton", tau=TAU)
        for name, layers, entries in (("one", 1, 32), ("three", 3, 32), ("off", 3, 0)):
            flash_si.plan_cache.clear()
            flash_si.plan_cache.max_entries = entries
            counts.update(bounds=0, lists=0)
            grads = []
            for _ in range(layers):
                qs, ks, vs = (x.clone().requires_grad_(True) for x in (ql, kl, vl))
                out = attend(qs, ks, vs, pos_l, pos_l)
                out.backward(dol)
                grads.append([out.detach(), qs.grad, ks.grad, vs.grad])
            report[name] = dict(counts=dict(counts), plans=len(flash_si.plan_cache.entries),
                                steps=attend._cache.value.computed)
            if name == "three":
                ref_grads = grads
            if name == "off":
                report["bitwise"] = all(torch.equal(a, b) for ga, gb in zip(ref_grads, grads)
                                        for a, b in zip(ga, gb))
        destroy_topology()
        gathered = [None] * world
        dist.all_gather_object(gathered, report)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        with open(path, "w") as f:
            json.dump(gathered, f)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ring_prepass_once_per_step_plan():
    """Zigzag ring over 2 gloo processes, Triton kernel: each ring step's key block has its own
    plan, built once per step and reused by the backward and by every further layer."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "report.json")
        mp.spawn(_ring_worker, args=(2, port, path), nprocs=2, join=True)
        with open(path) as f:
            reports = json.load(f)
    n_bounds, n_lists = _expected_prepass(torch.float32, 16)
    for rep in reports:
        steps = rep["one"]["steps"]
        assert steps == 2 and rep["one"]["plans"] == steps  # zigzag: no step is skipped
        assert rep["three"]["counts"] == rep["one"]["counts"]
        assert rep["one"]["counts"]["lists"] == steps * n_lists
        assert rep["one"]["counts"]["bounds"] <= steps * n_bounds
        assert rep["off"]["counts"]["lists"] == 3 * steps * 3
        assert rep["bitwise"]


def test_options_outside_the_key_tensors_are_respected(monkeypatch):
    """One plan, several list sets: causal vs bidirectional, and a changed Taylor degree (the
    switch rule moves: tiles 1000 tokens apart are POLY at degree 2 and exact at degree 1) give
    the cache-off results bit for bit."""
    q, k, v, do = make(8, 1, 2, 1, 128, 96, 32)
    q_pos, k_pos = (torch.arange(128) + 1100)[None], torch.arange(96)[None]
    for causal in (True, False):
        assert_same(run(q, k, v, do, q_pos, k_pos, causal=causal),
                    uncached(q, k, v, do, q_pos, k_pos, causal=causal))
    deg2 = run(q, k, v, do, q_pos, k_pos)
    monkeypatch.setattr(flash_si, "POLY_DEGREE", 1)
    deg1 = run(q, k, v, do, q_pos, k_pos)
    assert len(flash_si.plan_cache.entries) == 1
    assert not torch.equal(deg1[0], deg2[0])
    assert_same(deg1, uncached(q, k, v, do, q_pos, k_pos))
