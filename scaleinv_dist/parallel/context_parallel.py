"""Context-parallel attention for the model: `ContextParallelAttention` and `apply_cp`.

Every strategy is one code path, Ulysses over the Ulysses group followed by ring attention over the
ring group, with degrees taken from the Topology (ring and zigzag: Ulysses degree 1; ulysses: ring
size 1; hybrid: both). What each strategy implies (layout, Ulysses degree, divisibility) is the
table layouts.CP_STRATEGIES.

Inputs are this rank's shard (as cut by layouts.shard_batch with layout_for(strategy)) together
with the GLOBAL positions and document ids of those tokens; nothing else about the layout is
needed, because positions travel with the tokens.
"""
from __future__ import annotations

import warnings
import weakref

import torch

from ..attention import backend_ops, prepare_inputs, resolve_backend
from .layouts import LayoutError, check_heads, cp_strategy, pieces_per_shard
from .ring import RingComm, build_ring_plan, ring_attention
from .topology import Topology
from .ulysses import expand_kv_heads, gather_seq, head_to_seq, local_heads, seq_to_head


class _PlanCache:
    """The last batch's gathered positions and ring plan, reused while the same position tensors
    (same objects, unmodified) come back, i.e. across the layers of one forward and its backward.

    Hits depend only on object identity, which follows the program, so all ranks hit or miss
    together (a miss runs collectives)."""

    def __init__(self):
        self.refs, self.versions, self.key, self.value = (), (), None, None

    def get(self, tensors, key):
        if self.value is None or key != self.key or len(tensors) != len(self.refs):
            return None
        for t, ref, ver in zip(tensors, self.refs, self.versions):
            if (t is None) != (ref is None):
                return None
            if t is not None and (ref() is not t or t._version != ver):
                return None
        return self.value

    def put(self, tensors, key, value):
        self.refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
        self.versions = tuple(None if t is None else t._version for t in tensors)
        self.key, self.value = key, value


class ContextParallelAttention:
    """attend(q, k, v, q_pos, k_pos, q_seg, k_seg) -> out over the whole (sharded) sequence.

    q (B, Hq, n, D) and k, v (B, Hkv, n, D) are this rank's tokens; q_pos/k_pos (B, n) or (n,)
    their global positions; q_seg/k_seg their document ids or None. Returns out (B, Hq, n, D) for
    the same tokens (with return_lse=True also lse (B, Hq, n) fp32). A query that sees no key
    gets out = 0 (and lse = -inf), never NaN.
    """

    def __init__(self, topology: Topology, strategy: str = "zigzag",
                 transform: str = "scale_invariant", tau: float = 10.0, backend: str = "auto",
                 alibi_slopes: torch.Tensor | None = None, causal: bool = True, *,
                 scale: float | None = None, layout: str | None = None, cache_plans: bool = True):
        spec = cp_strategy(strategy)
        u, r = topology.ulysses_size, topology.ring_size
        want = spec.ulysses_degree(topology.cp_size, u)
        if u != want:
            raise LayoutError(f"strategy {strategy!r} uses Ulysses degree {want} over "
                              f"{topology.cp_size} context-parallel ranks, but the topology has "
                              f"ulysses_degree {u}; build it with init_topology_from_config, or use "
                              f"strategy 'hybrid' for Ulysses x ring")
        self.topology, self.strategy = topology, strategy
        self.transform, self.tau, self.backend, self.causal = transform, float(tau), backend, causal
        self.alibi_slopes, self.scale = alibi_slopes, scale
        self.layout = layout or spec.layout
        self.pieces = pieces_per_shard(self.layout)
        self.ring_comm = RingComm(topology.ring_group, topology.ring_ranks) if r > 1 else None
        self.cache_plans = cache_plans
        self._cache = _PlanCache()
        self._slopes_cache: dict = {}
        self._warned = False

    def __repr__(self) -> str:
        t = self.topology
        return (f"ContextParallelAttention(strategy={self.strategy}, layout={self.layout}, "
                f"ulysses={t.ulysses_size}, ring={t.ring_size}, transform={self.transform}, "
                f"backend={self.backend})")

    # ------------------------------------------------------------------ helpers
    def _ops(self, q):
        name = resolve_backend(self.backend, q)
        if name == "flex":
            if self.backend != "auto":
                raise ValueError("context parallelism needs an attention backend with the "
                                 "forward/backward (out, lse) contract: 'triton' or 'reference'; "
                                 "attention.backend='flex' is single-device only")
            if not self._warned:
                warnings.warn("context parallelism: the Triton kernel is unavailable, falling back "
                              "to the (slow) reference backend", stacklevel=3)
                self._warned = True
            name = "reference"
        return backend_ops(name)

    def _slopes(self, device, rank, size):
        if self.alibi_slopes is None:
            return None
        key = (device, rank, size)
        if key not in self._slopes_cache:
            s = self.alibi_slopes.detach().to(device=device, dtype=torch.float32)
            self._slopes_cache[key] = local_heads(s, rank, size).contiguous()
        return self._slopes_cache[key]

    def _plan(self, raw, q_pos, k_pos, q_seg, k_seg, pieces):
        """raw: the position / document-id arguments as passed (the cache key)."""
        topo = self.topology
        tensors = raw
        key = (tuple(q_pos.shape), tuple(k_pos.shape), pieces, self.causal)
        if self.cache_plans:
            hit = self._cache.get(tensors, key)
            if hit is not None:
                return hit
        if topo.ulysses_size > 1:
            g = topo.ulysses_group
            same_pos, same_seg = raw[1] is raw[0], raw[3] is raw[2]
            gq_pos = gather_seq(q_pos, g, pieces)
            gk_pos = gq_pos if same_pos else gather_seq(k_pos, g, pieces)
            gq_seg = None if q_seg is None else gather_seq(q_seg, g, pieces)
            gk_seg = None if k_seg is None else (gq_seg if same_seg else gather_seq(k_seg, g, pieces))
        else:
            gq_pos, gk_pos, gq_seg, gk_seg = q_pos, k_pos, q_seg, k_seg
        plan = build_ring_plan(gq_pos, gk_pos, gq_seg, gk_seg, causal=self.causal,
                               comm=self.ring_comm, pieces=pieces)
        if self.cache_plans:
            self._cache.put(tensors, key, plan)
        return plan

    # ------------------------------------------------------------------ the call
    def __call__(self, q, k, v, q_pos, k_pos, q_seg=None, k_seg=None, *, return_lse: bool = False):
        raw = (q_pos, k_pos, q_seg, k_seg)
        q_pos, k_pos, q_seg, k_seg = prepare_inputs(q, k, v, q_pos, k_pos, q_seg, k_seg,
                                                    transform=self.transform, backend=self.backend,
                                                    alibi_slopes=self.alibi_slopes)
        b, hq, n, _ = q.shape
        if k.shape[2] != n:
            raise ValueError(f"context-parallel attention needs as many local keys as queries "
                             f"(self-attention on one shard): q has {n} tokens, k has {k.shape[2]}")
        topo = self.topology
        u = topo.ulysses_size
        if u > 1:
            check_heads(hq, k.shape[1], u)
        pieces = self.pieces if n % self.pieces == 0 else 1
        ops = self._ops(q)
        scale = q.shape[-1] ** -0.5 if self.scale is None else float(self.scale)
        opts = dict(scale=scale, tau=self.tau, causal=self.causal, transform=self.transform,
                    alibi_slopes=self._slopes(q.device, topo.ulysses_rank, u))
        plan = self._plan(raw, q_pos, k_pos, q_seg, k_seg, pieces)
        if u > 1:
            g = topo.ulysses_group
            q = seq_to_head(q, g, pieces)
            k = seq_to_head(expand_kv_heads(k, hq, u), g, pieces)
            v = seq_to_head(expand_kv_heads(v, hq, u), g, pieces)
        out, lse = ring_attention(q, k, v, plan, self.ring_comm, ops, **opts)
        if u > 1:
            out = head_to_seq(out, topo.ulysses_group, pieces)
            if return_lse:
                with torch.no_grad():
                    lse = head_to_seq(lse[..., None], topo.ulysses_group, pieces)[..., 0]
        return (out, lse) if return_lse else out


def apply_cp(model, topology: Topology, parallel_cfg) -> object:
    """Give `model` context-parallel attention (torchtitan style): sets `model.attend`.

    The model must expose `attend` (q, k, v, q_pos, k_pos, q_seg, k_seg) -> out and
    `attention_options()` -> dict(transform, tau, backend, alibi_slopes[, causal]). With
    context_parallel_size 1 the model is left as is. Returns the model.
    """
    cp = parallel_cfg.context_parallel_size
    if cp != topology.cp_size:
        raise LayoutError(f"parallel.context_parallel_size {cp} does not match the topology's "
                          f"{topology.cp_size}; build the topology with init_topology_from_config")
    if cp == 1:
        return model
    opts = dict(model.attention_options())
    causal = opts.pop("causal", True)
    model.attend = ContextParallelAttention(topology, parallel_cfg.cp_strategy, causal=causal, **opts)
    return model
