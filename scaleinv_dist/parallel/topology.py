"""Process groups for data x context parallelism, from megatron-core `parallel_state`.

    world = dp x cp (x tp, reserved: 1 today), megatron order "tp-cp-ep-dp-pp": the CP ranks of one
    data-parallel replica are consecutive global ranks (one node first).
    cp = ulysses (inner, all-to-all, consecutive CP ranks) x ring (outer, point-to-point)

    cp_rank = ulysses_rank + ulysses_size * ring_rank

The Ulysses x ring split comes from megatron's `hierarchical_context_parallel_sizes=[U, R]`
(level 0 = U consecutive CP ranks, level 1 = the strided ring); without einops it is built here
with `torch.distributed.new_group`, identically on every rank.

`Topology` doubles as the `mpu` object DeepSpeed takes (`deepspeed.initialize(..., mpu=topology)`):
it answers DeepSpeed's sequence-parallel protocol, so DeepSpeed all-reduces (and ZeRO-partitions)
gradients over data x context parallel ranks (megatron's
`get_data_parallel_group(with_context_parallel=True)`) and divides them by the data-parallel size
only: the context-parallel shards of one sequence add up to its gradient, while batch-size
bookkeeping counts data-parallel replicas alone.
"""
from __future__ import annotations

import datetime
import math
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .layouts import cp_strategy, divisors


class TopologyError(RuntimeError):
    """A parallel layout that the launched processes cannot form."""


@dataclass
class Topology:
    world_size: int
    rank: int
    dp_size: int
    dp_rank: int
    cp_size: int
    cp_rank: int
    ulysses_size: int
    ulysses_rank: int
    ring_size: int
    ring_rank: int
    tp_size: int = 1
    tp_rank: int = 0
    dp_group: object = None  # pure data parallel (batch bookkeeping)
    dp_cp_group: object = None  # data x context parallel: gradient reduction
    cp_group: object = None
    ulysses_group: object = None  # None when ulysses_size == 1
    ring_group: object = None  # None when ring_size == 1
    tp_group: object = None
    cp_ranks: tuple = ()  # global ranks of this rank's CP group, in CP-rank order
    ulysses_ranks: tuple = ()
    ring_ranks: tuple = ()  # global ranks of the ring, in ring order (next = ring_rank + 1)
    extra: dict = field(default_factory=dict)

    # ----------------------------------------------------------------- mpu (Megatron / DeepSpeed)
    def get_data_parallel_group(self, with_context_parallel: bool = False):
        return self.dp_cp_group if with_context_parallel else self.dp_group

    def get_data_parallel_world_size(self, with_context_parallel: bool = False) -> int:
        return self.dp_size * (self.cp_size if with_context_parallel else 1)

    def get_data_parallel_rank(self, with_context_parallel: bool = False) -> int:
        if with_context_parallel:
            return dist.get_rank(self.dp_cp_group)
        return self.dp_rank

    def get_data_parallel_group_ranks(self, with_context_parallel: bool = False):
        return dist.get_process_group_ranks(self.get_data_parallel_group(with_context_parallel))

    # DeepSpeed's sequence-parallel protocol: the CP group, and DP x CP for gradients
    def get_sequence_parallel_group(self):
        return self.cp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.cp_size

    def get_sequence_parallel_rank(self) -> int:
        return self.cp_rank

    def get_sequence_data_parallel_group(self):
        return self.dp_cp_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.dp_size * self.cp_size

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank(self.dp_cp_group)

    get_context_parallel_group = get_sequence_parallel_group
    get_context_parallel_world_size = get_sequence_parallel_world_size
    get_context_parallel_rank = get_sequence_parallel_rank

    def get_context_parallel_global_ranks(self):
        return list(self.cp_ranks)

    def get_model_parallel_group(self):
        return self.tp_group

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.rank - self.tp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


_CURRENT: Topology | None = None
_OWN_GROUPS: list = []


def _init_process_group(timeout_s: float, backend: str | None) -> None:
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise TopologyError("torch.distributed is not initialised and RANK / WORLD_SIZE are not set: "
                            "launch with torchrun (or the deepspeed launcher / srun)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {}
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def _split_cp_groups(cp_ranks: list[int], ulysses: int, timeout_s: float):
    """Ulysses (consecutive) and ring (strided) sub-groups of every CP group, built on all ranks."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(cp_ranks))
    all_cp = sorted({tuple(g) for g in gathered})
    timeout = datetime.timedelta(seconds=timeout_s)
    me = dist.get_rank()
    ulysses_group = ring_group = None
    ring = len(cp_ranks) // ulysses
    for cp in all_cp:
        for r in range(ring):
            ranks = list(cp[r * ulysses:(r + 1) * ulysses])
            g = dist.new_group(ranks, timeout=timeout)
            _OWN_GROUPS.append(g)
            if me in ranks:
                ulysses_group = g
    for cp in all_cp:
        for u in range(ulysses):
            ranks = list(cp[u::ulysses])
            g = dist.new_group(ranks, timeout=timeout)
            _OWN_GROUPS.append(g)
            if me in ranks:
                ring_group = g
    return ulysses_group, ring_group


def init_topology(cp_size: int = 1, ulysses_degree: int = 1, timeout_s: float = 600.0, *,
                  backend: str | None = None, tensor_parallel_size: int = 1,
                  groups: str = "auto") -> Topology:
    """Initialise torch.distributed (if needed) and megatron-core's groups; return the Topology.

    cp_size = ulysses_degree x ring size; the data-parallel size is world / (cp_size x tp).
    groups: "auto" (megatron-core when it imports), "megatron" or "torch" (the same rank layout
    built with torch.distributed.new_group). Call destroy_topology() before initialising another.
    """
    global _CURRENT
    if _CURRENT is not None:
        raise TopologyError("a topology is already initialised; call destroy_topology() first")
    if cp_size < 1 or ulysses_degree < 1:
        raise TopologyError(f"context_parallel_size ({cp_size}) and ulysses_degree ({ulysses_degree}) "
                            f"must be >= 1")
    if cp_size % ulysses_degree:
        raise TopologyError(f"ulysses_degree {ulysses_degree} must divide context_parallel_size "
                            f"{cp_size}; choose one of {divisors(cp_size)}")
    _init_process_group(timeout_s, backend)
    world = dist.get_world_size()
    model = cp_size * tensor_parallel_size
    if world % model:
        raise TopologyError(
            f"{world} processes are not divisible by context_parallel_size {cp_size} x tensor "
            f"parallel {tensor_parallel_size}; launch a multiple of {model} processes or use a "
            f"context_parallel_size that divides {world} ({divisors(world)})")

    ps = None
    if groups not in ("auto", "megatron", "torch"):
        raise TopologyError(f"groups must be auto, megatron or torch, got {groups!r}")
    if groups != "torch":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # megatron warns about missing TransformerEngine
                from megatron.core import parallel_state as ps
        except ImportError:
            if groups == "megatron":
                raise
    if ps is None and groups == "auto":
        warnings.warn("megatron-core is not installed: building the same data / context-parallel "
                      "groups with torch.distributed (pip install megatron-core==0.16.1)")
    if ps is None:
        topo = _torch_topology(cp_size, ulysses_degree, tensor_parallel_size, timeout_s)
    else:
        topo = _megatron_topology(ps, cp_size, ulysses_degree, tensor_parallel_size, timeout_s)
    _CURRENT = topo
    return topo


def _check_split(topo: Topology) -> Topology:
    u = topo.ulysses_size
    if topo.cp_rank != topo.ulysses_rank + u * topo.ring_rank or \
            topo.ulysses_ranks != topo.cp_ranks[topo.ring_rank * u:(topo.ring_rank + 1) * u]:
        raise TopologyError(f"unexpected Ulysses/ring groups: cp rank {topo.cp_rank}, ulysses "
                            f"{topo.ulysses_ranks}, ring {topo.ring_ranks}, cp {topo.cp_ranks}")
    return topo


def _megatron_topology(ps, cp_size, ulysses_degree, tp, timeout_s) -> Topology:
    if ps.model_parallel_is_initialized():
        raise TopologyError("megatron-core parallel_state is already initialised by someone else; "
                            "call megatron.core.parallel_state.destroy_model_parallel() first")
    ring = cp_size // ulysses_degree
    hierarchical = [ulysses_degree, ring] if 1 < ulysses_degree < cp_size else None
    kwargs = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
                  context_parallel_size=cp_size,
                  distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
                  create_gloo_process_groups=False)
    try:
        ps.initialize_model_parallel(hierarchical_context_parallel_sizes=hierarchical, **kwargs)
        own_split = False
    except ImportError:  # hierarchical groups need einops
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(**kwargs)
        own_split = True

    cp_group = ps.get_context_parallel_group()
    cp_ranks = tuple(ps.get_context_parallel_global_ranks())
    ulysses_group = ring_group = None
    if ulysses_degree == 1:
        ring_group = cp_group if cp_size > 1 else None
    elif ring == 1:
        ulysses_group = cp_group
    elif own_split:
        ulysses_group, ring_group = _split_cp_groups(list(cp_ranks), ulysses_degree, timeout_s)
    else:
        ulysses_group, ring_group = ps.get_hierarchical_context_parallel_groups()
    me = dist.get_rank()
    return _check_split(Topology(
        world_size=dist.get_world_size(), rank=me,
        dp_size=ps.get_data_parallel_world_size(), dp_rank=ps.get_data_parallel_rank(),
        cp_size=cp_size, cp_rank=ps.get_context_parallel_rank(),
        ulysses_size=ulysses_degree,
        ulysses_rank=dist.get_rank(ulysses_group) if ulysses_group is not None else 0,
        ring_size=ring, ring_rank=dist.get_rank(ring_group) if ring_group is not None else 0,
        tp_size=tp, tp_rank=ps.get_tensor_model_parallel_rank(),
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        cp_group=cp_group, ulysses_group=ulysses_group, ring_group=ring_group,
        tp_group=ps.get_tensor_model_parallel_group(),
        cp_ranks=cp_ranks,
        ulysses_ranks=tuple(dist.get_process_group_ranks(ulysses_group)) if ulysses_group else (me,),
        ring_ranks=tuple(dist.get_process_group_ranks(ring_group)) if ring_group else (me,),
        extra={"groups": "megatron-core"}))


def _torch_topology(cp_size, ulysses_degree, tp, timeout_s) -> Topology:
    """megatron's "tp-cp-ep-dp-pp" order without megatron: rank = t + tp (c + cp d)."""
    world, me = dist.get_world_size(), dist.get_rank()
    dp = world // (tp * cp_size)
    ring = cp_size // ulysses_degree
    timeout = datetime.timedelta(seconds=timeout_s)
    at = lambda t, c, d: t + tp * (c + cp_size * d)  # noqa: E731
    t_me, c_me, d_me = me % tp, (me // tp) % cp_size, me // (tp * cp_size)

    def group(ranks_list):
        mine = None
        for ranks in ranks_list:
            g = dist.new_group(ranks, timeout=timeout)
            _OWN_GROUPS.append(g)
            if me in ranks:
                mine = (g, tuple(ranks))
        return mine

    tp_g = group([[at(t, c, d) for t in range(tp)] for d in range(dp) for c in range(cp_size)])
    cp_g = group([[at(t, c, d) for c in range(cp_size)] for d in range(dp) for t in range(tp)])
    dp_g = group([[at(t, c, d) for d in range(dp)] for c in range(cp_size) for t in range(tp)])
    dpcp_g = group([[at(t, j % cp_size, j // cp_size) for j in range(cp_size * dp)]
                    for t in range(tp)])
    u_g = r_g = None
    if 1 < ulysses_degree < cp_size:
        u_g = group([[at(t, r * ulysses_degree + u, d) for u in range(ulysses_degree)]
                     for d in range(dp) for t in range(tp) for r in range(ring)])
        r_g = group([[at(t, r * ulysses_degree + u, d) for r in range(ring)]
                     for d in range(dp) for t in range(tp) for u in range(ulysses_degree)])
    elif ulysses_degree == cp_size:
        u_g = cp_g if cp_size > 1 else None
    else:
        r_g = cp_g if cp_size > 1 else None
    return _check_split(Topology(
        world_size=world, rank=me, dp_size=dp, dp_rank=d_me, cp_size=cp_size, cp_rank=c_me,
        ulysses_size=ulysses_degree, ulysses_rank=c_me % ulysses_degree,
        ring_size=ring, ring_rank=c_me // ulysses_degree, tp_size=tp, tp_rank=t_me,
        dp_group=dp_g[0], dp_cp_group=dpcp_g[0], cp_group=cp_g[0],
        ulysses_group=u_g[0] if u_g else None, ring_group=r_g[0] if r_g else None,
        tp_group=tp_g[0], cp_ranks=cp_g[1],
        ulysses_ranks=u_g[1] if u_g else (me,), ring_ranks=r_g[1] if r_g else (me,),
        extra={"groups": "torch.distributed"}))


def init_topology_from_config(parallel_cfg, timeout_s: float = 600.0, **kwargs) -> Topology:
    """init_topology for a config's `parallel` section (ParallelConfig)."""
    cp = parallel_cfg.context_parallel_size
    u = cp_strategy(parallel_cfg.cp_strategy).ulysses_degree(cp, parallel_cfg.ulysses_degree)
    return init_topology(cp, u, timeout_s, **kwargs)


def destroy_topology(destroy_process_group: bool = False) -> None:
    """Forget the groups (megatron's and ours); optionally tear down torch.distributed too."""
    global _CURRENT
    if _CURRENT is not None and _CURRENT.extra.get("groups") == "megatron-core":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core import parallel_state as ps
        ps.destroy_model_parallel()
    _CURRENT = None
    _OWN_GROUPS.clear()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()
