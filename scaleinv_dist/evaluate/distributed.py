"""Evaluation across processes: context parallelism for windows longer than one device holds.

Launched with torchrun (e.g. `torchrun --nproc_per_node 4 launch/eval.py --run-dir R
parallel.context_parallel_size=4`): every rank reads the same validation windows; the CP ranks of
a replica each take their layout's shard of every window (tokens with their global positions and
document ids, `parallel.sharding.CPSharder`), the model's attention is swapped for the
distributed one (`parallel.apply_cp`), data-parallel replicas take batches round-robin, and the
per-bucket loss sums and counts are all-reduced over all ranks at the end of each length.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import EvalError


@dataclass
class EvalParallel:
    shard: Callable | None = None
    reduce: Callable | None = None
    dp: tuple[int, int] = (0, 1)
    cp_size: int = 1
    rank: int = 0
    topology: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(device: torch.device) -> torch.device:
    """cuda:LOCAL_RANK under torchrun on CUDA, else `device`."""
    if device.type == "cuda" and launched_distributed():
        idx = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return device


def setup_parallel(model, cfg, lengths) -> EvalParallel:
    """Topology, CP attention and the shard / reduce callables for evaluate_lengths.

    A single process with context_parallel_size 1 gets EvalParallel() (no-ops).
    """
    cp = cfg.parallel.context_parallel_size
    if cp == 1 and not launched_distributed():
        return EvalParallel()
    if not launched_distributed():
        raise EvalError(f"parallel.context_parallel_size={cp} needs {cp} processes: launch with "
                        f"torchrun --nproc_per_node {cp} launch/eval.py ...")
    try:
        from ..parallel import layouts
        from ..parallel.topology import init_topology_from_config
    except ImportError as err:
        raise EvalError(f"sequence parallelism is unavailable ({err})") from None
    import torch.distributed as dist

    from ..parallel.topology import TopologyError

    try:
        topo = init_topology_from_config(cfg.parallel)
    except TopologyError as err:
        raise EvalError(str(err)) from None
    shard = None
    if topo.cp_size > 1:
        from ..parallel import apply_cp
        from ..parallel.sharding import CPSharder

        shard = CPSharder(topo, cfg.parallel.cp_strategy)
        for length in lengths:
            try:
                shard.check(int(length))
            except layouts.LayoutError as err:
                raise EvalError(f"evaluation length {length}: {err}") from None
        apply_cp(model, topo, cfg.parallel)

    def reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t)

    return EvalParallel(shard=shard, reduce=reduce, dp=(topo.dp_rank, topo.dp_size),
                        cp_size=topo.cp_size, rank=dist.get_rank(), topology=topo)


def teardown(par: EvalParallel) -> None:
    if par.topology is not None:
        from ..parallel.topology import destroy_topology

        destroy_topology(destroy_process_group=True)
