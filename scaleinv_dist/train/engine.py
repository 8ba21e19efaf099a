"""Process setup and the DeepSpeed engine: device, torch.distributed, the DeepSpeed config dict.

    env = setup_distributed(cfg)                     # before anything imports deepspeed
    engine = build_engine(cfg, model, optimizer, scheduler, mpu=topology_or_None)

Launchers: `deepspeed`, `torchrun` and Slurm `srun` (one task per rank, MASTER_ADDR/MASTER_PORT
exported by the job script) set RANK / WORLD_SIZE / LOCAL_RANK; a plain `python launch/train.py`
becomes a one-process group on a free local port.

DeepSpeed config from the Config (docs/training.md has the table):
    train_micro_batch_size_per_gpu = train.micro_batch_size
    gradient_accumulation_steps    = train.grad_accum
    gradient_clipping              = train.grad_clip (0 = off)
    zero_optimization.stage        = train.zero_stage
    torch_autocast (bfloat16)      = run.dtype bfloat16, or auto on CUDA: bf16 compute, fp32 parameters,
                                     gradients and optimizer state (DeepSpeed's "bf16" stays off)
The optimizer (AdamW / Muon) and LR schedule are client objects (scaleinv_dist.train.optim /
schedule), so DeepSpeed JIT-builds no optimizer op on CPU (the effect of `torch_adam: true`).
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from ..config import ConfigError
from ..device import computes_in_bf16, cuda_missing, prefer_expandable_segments, resolve_device

DEFAULT_EXTENSIONS_DIR = Path.home() / ".cache" / "scaleinv_dist" / "torch_extensions"


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def use_cuda(cfg) -> bool:
    """Whether run.device (auto | cpu | cuda, through device.resolve_device) trains on CUDA;
    ConfigError for run.device=cuda without a GPU."""
    device = resolve_device(cfg.run.device)
    if cuda_missing(device):
        raise ConfigError("run.device=cuda but no CUDA GPU is visible; set run.device=cpu or auto")
    return device.type == "cuda"


def use_bf16(cfg) -> bool:
    return computes_in_bf16(cfg.run.dtype, "cuda" if use_cuda(cfg) else "cpu")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rendezvous_env() -> None:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for whichever launcher ran us."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
        return
    srun_tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if srun_tasks > 1:  # `srun python launch/train.py`: one Slurm task per rank
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise ConfigError("launched by srun with several tasks but MASTER_ADDR / MASTER_PORT are not "
                              "set; export them in the job script (see slurm/pretrain.sh)")
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], str(srun_tasks)
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        return
    # a plain `python launch/train.py`: a one-process group on a free local port
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))


def _skip_cpu_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce (30-70 s, needs a compiler)
    that only inference_all_reduce uses; training all-reduces through torch.distributed."""
    import importlib
    ds_torch = importlib.import_module("deepspeed.comm.torch")  # the module, not torch itself
    if hasattr(ds_torch, "build_shm_op"):
        ds_torch.build_shm_op = lambda: None


def setup_distributed(cfg) -> DistEnv:
    """Select the accelerator, then initialise torch.distributed through DeepSpeed.

    Collective timeout = train.collective_timeout_s: a rank that dies makes the others fail
    instead of hanging (gloo notices a closed peer at once; NCCL's watchdog after the timeout).
    """
    cuda = use_cuda(cfg)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")  # before importing deepspeed
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(DEFAULT_EXTENSIONS_DIR))
    if cuda:  # a hung NCCL collective aborts the process after the timeout instead of blocking
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        prefer_expandable_segments()
    _rendezvous_env()
    import deepspeed
    deepspeed.utils.logger.setLevel(logging.WARNING)  # the loop prints what matters
    if not cuda:
        _skip_cpu_shm_op()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    timeout = timedelta(seconds=max(1, int(cfg.train.collective_timeout_s)))
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False,
                               auto_mpi_discovery=False)
    import torch.distributed as dist
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def deepspeed_config(cfg) -> dict:
    """The DeepSpeed config dict for a Config (no optimizer / scheduler sections: client objects)."""
    t = cfg.train
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}")
    if t.grad_accum < 1:
        raise ConfigError(f"train.grad_accum must be >= 1, got {t.grad_accum}")
    bf16 = use_bf16(cfg)
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": float(t.grad_clip) if t.grad_clip > 0 else 0.0,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # our AdamW / Muon are client optimizers
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10 ** 9,  # the training loop logs
        "wall_clock_breakdown": False,
    }
    if bf16:  # bf16 compute over fp32 parameters, gradients and optimizer state (any optimizer and
        # ZeRO stage; DeepSpeed's "bf16" mode needs ZeRO >= 1 for fp32 accumulation and flattens
        # parameters, which Muon cannot take)
        # no "lower precision safe" modules: gradients are reduced in fp32, not bf16
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return ds


def build_engine(cfg, model: torch.nn.Module, optimizer, scheduler, mpu=None):
    """deepspeed.initialize(...) with the client optimizer and scheduler; returns the engine."""
    import deepspeed
    # DeepSpeed's bf16/fp16 modes are off (bf16 is torch_autocast), so it casts no parameter or
    # buffer: the fp32 ALiBi slopes stay exact
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg), mpu=mpu,
                                           dist_init_required=False)
    return engine


def grad_divisor(engine) -> int:
    """How many ranks DeepSpeed averages gradients over (data-parallel replicas; with a context-
    parallel mpu it sums the CP shards and divides by the data-parallel size only)."""
    return int(engine.dp_world_size)
