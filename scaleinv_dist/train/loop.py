"""The training loop: `train(cfg) -> summary dict`, read top to bottom in `Trainer`.

    trainer = Trainer(cfg, env)
    trainer.setup()     CP topology -> data (rank 0 prepares caches first) -> run directory
                        (config.yaml with vocab_size filled in, tokenizer.model) -> build_model
                        (+ apply_cp) -> optimizer + LR schedule -> DeepSpeed engine -> components
    trainer.resume()    from the newest intact checkpoint (checkpoint.Checkpointer)
    trainer.run()       while step < train.steps:
                            result = train_step(micro batches)    -> StepResult
                            after_step(result)                    log, evaluate, checkpoint, preempt

One step = train.grad_accum micro batches per data-parallel rank (forward_backward_step). The loss
is the mean over every scored token of the step across all ranks (an all-reduced token count
scales each micro batch's summed loss), so gradients equal a single device's on the whole batch,
with or without context parallelism. At every step boundary one all-reduce of (summed loss, stop
flag) makes all ranks agree on a non-finite loss (train.nan_policy) and on a preemption signal
(SIGUSR1 / SIGTERM, interrupts.StopFlag).

Components: checkpoint.Checkpointer, validate.Validator, metrics.Metrics and metrics.Window,
interrupts.StopFlag. Test-only faults (SCALEINV_TEST_DIE_AT_STEP, SCALEINV_TEST_STEP_SLEEP, ...) come
from faults.inject at named points; nothing else here reads them.

Exit codes (scaleinv_dist.cli, returned by launch/train.py; see docs/training.md): 0 done, 2 bad
config / data / checkpoint, 3 non-finite loss with nan_policy=stop, 4 lost a peer rank / collective
timeout, 75 preempted (checkpoint written: requeue and the job resumes).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..cli import EXIT_NONFINITE, EXIT_PEER_FAILURE, EXIT_PREEMPTED  # noqa: F401 (re-exported)
from ..config import save_config
from ..loss import IGNORE_INDEX
from ..model import build_model
from . import faults
from .checkpoint import Checkpointer, CheckpointError
from .engine import build_engine, deepspeed_config, grad_divisor, setup_distributed, use_bf16
from .interrupts import (NonFiniteLoss, PeerFailure, Preempted, StopFlag,  # noqa: F401
                         TrainingInterrupted, is_distributed_failure)
from .metrics import Metrics, Window, peak_flops, peak_gpu_memory_gb
from .optim import build_optimizer
from .schedule import build_scheduler, reset_lrs
from .validate import Validator


def train(cfg) -> dict:
    """Train (or resume) the run described by cfg; returns a summary dict.

    Raises ConfigError / DataError / CheckpointError for user mistakes, and TrainingInterrupted
    subclasses (Preempted, NonFiniteLoss, PeerFailure) carrying the process exit code.
    """
    env = setup_distributed(cfg)
    try:
        trainer = Trainer(cfg, env)
        trainer.setup()
        trainer.resume()
        return trainer.run()
    except (TrainingInterrupted, CheckpointError):
        raise
    except Exception as err:
        if is_distributed_failure(err):
            raise PeerFailure(
                f"rank {env.rank}: lost contact with another rank (it died, or a collective "
                f"exceeded train.collective_timeout_s={cfg.train.collective_timeout_s}s): "
                f"{str(err).splitlines()[0][:300]}. Restart the job: it resumes from "
                f"{Path(cfg.run.out_dir) / 'checkpoints' / 'latest'}") from err
        raise


@dataclasses.dataclass
class StepResult:
    """What one optimizer step did, the same on every rank."""
    step: int                  # optimizer steps completed, this one included
    loss: float                # mean loss per scored token over all ranks (non-finite: not applied)
    lr: float                  # AdamW learning rate this step used
    grad_norm: float | None    # global gradient norm before clipping (None when skipped)
    preempt: bool              # some rank got SIGUSR1 / SIGTERM: checkpoint and exit

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss)


class Trainer:
    """Owns the engine, the data loader and the components of one training process."""

    def __init__(self, cfg, env):
        self.cfg, self.env = cfg, env
        self.out_dir = Path(cfg.run.out_dir)
        self.t_start = time.time()
        self.step, self.tokens_seen, self.resumed_from = 0, 0, None
        self.last_loss, self.skipped = None, 0

    # ------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.run.seed)
        self.topology, self.dp_rank, self.dp_size = self._init_topology()
        deepspeed_config(cfg)  # config errors before the (slow) data preparation
        resolved = self._setup_data()
        seed_everything(cfg.run.seed)  # the same initial weights whatever data preparation consumed
        self.model = self.build_model(resolved)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.engine = build_engine(cfg, self.model, self.optimizer, self.scheduler, mpu=self.topology)
        dev = self.engine.device
        self.device = dev if isinstance(dev, torch.device) else torch.device(dev)
        self._setup_components()

    def _init_topology(self):
        """(CP topology or None, data-parallel rank, data-parallel size)."""
        if self.cfg.parallel.context_parallel_size <= 1:
            return None, self.env.rank, self.env.world_size
        from ..parallel.topology import init_topology_from_config
        topo = init_topology_from_config(self.cfg.parallel, timeout_s=self.cfg.train.collective_timeout_s)
        return topo, topo.dp_rank, topo.dp_size

    def _setup_data(self):
        """Token caches (rank 0 first), this rank's loaders, and the run directory's config.yaml and
        tokenizer.model; returns the resolved config (model.vocab_size from the tokenizer)."""
        _prepare_data(self.cfg, self.env)
        from ..data import build_data
        self.bundle = build_data(self.cfg, self.dp_rank, self.dp_size)
        self.loader = self.bundle.train_loader
        resolved = copy.deepcopy(self.cfg)
        if resolved.model.vocab_size == 0:
            resolved.model.vocab_size = int(self.bundle.tokenizer.vocab_size)
        if self.env.is_main:
            _write_run_files(resolved, self.out_dir, self.bundle.tokenizer)
        return resolved

    def build_model(self, resolved) -> torch.nn.Module:
        """The model, built once here on every rank (same seed: same weights), then made context-
        parallel. Anything that wraps the model before DeepSpeed sees it belongs here."""
        model = build_model(resolved, device=self.env.device)  # compiled blocks on CUDA (train.compile)
        self.n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
        self.flops_per_token = model.flops_per_token(self.cfg.train.seq_len)
        if self.topology is not None:
            from ..parallel.context_parallel import apply_cp
            apply_cp(model, self.topology, self.cfg.parallel)
        return model

    def _setup_components(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.sharder = None
        if self.topology is not None and self.topology.cp_size > 1:
            from ..parallel.sharding import CPSharder
            self.sharder = CPSharder(self.topology, cfg.parallel.cp_strategy)
            self.sharder.check(t.seq_len)
        self.checkpointer = Checkpointer(self.engine, self.out_dir, cfg, self.dp_size)
        self.validator = Validator(self.engine, self.bundle.val_store, cfg, self.local_batch,
                                   self.device, (self.dp_rank, self.dp_size))
        self.window = Window()
        self.divisor = grad_divisor(self.engine)
        self.peak = peak_flops(self.device, use_bf16(cfg))
        self.tokens_per_step = t.micro_batch_size * t.seq_len * t.grad_accum * self.dp_size
        self.grad_norm_by_hand = t.zero_stage == 0  # DeepSpeed reports none there

    def local_batch(self, batch):
        """Host batch -> this rank's (tokens, labels, positions, doc_ids) on the device, CP-sharded;
        doc_ids None without data.document_masking."""
        if not self.cfg.data.document_masking:
            batch = dataclasses.replace(batch, doc_ids=None)
        if self.sharder is not None:
            batch = self.sharder(batch)
        to = lambda t: None if t is None else t.to(self.device, non_blocking=True)  # noqa: E731
        return to(batch.tokens), to(batch.labels), to(batch.positions), to(batch.doc_ids)

    # ------------------------------------------------------------------------- resume
    def resume(self) -> None:
        """Restore the newest intact checkpoint, if any; then open the metrics (which drops records
        after the resumed step) and print what the run is."""
        cfg, t = self.cfg, self.cfg.train
        self.step, self.tokens_seen, folder, damage = self.checkpointer.resume(self.loader)
        if folder is not None:
            reset_lrs(self.optimizer, self.scheduler, cfg)
            self.resumed_from = self.step
        self.metrics = Metrics(cfg, self.out_dir, self.env.is_main, t.steps, self.step)
        if damage:
            self.metrics.print(f"warning: {damage}")
        if folder is not None:
            self.metrics.print(f"resumed from {folder} (step {self.step})")
        self.metrics.print(
            f"model: {self.n_params / 1e6:.2f}M parameters | {self.env.world_size} rank(s) on "
            f"{self.device.type} | dp {self.dp_size} x cp {cfg.parallel.context_parallel_size} | "
            f"zero {t.zero_stage} | {'bf16' if use_bf16(cfg) else 'fp32'} | {t.steps} steps of "
            f"{t.micro_batch_size * t.grad_accum * self.dp_size} x {t.seq_len} tokens")

    # ------------------------------------------------------------------------- the loop
    def run(self) -> dict:
        t = self.cfg.train
        self.stop = StopFlag().install()
        try:
            self.engine.train()
            while self.step < t.steps:
                t0 = time.perf_counter()
                faults.inject("step_start", self.step + 1, self.env.rank, grad_accum=t.grad_accum)
                micro = [self.loader.next_batch() for _ in range(t.grad_accum)]
                result = self.train_step(micro)
                self.window.add(time.perf_counter() - t0, self.tokens_per_step,
                                result.loss if result.finite else None)
                self.after_step(result)
            if self.env.world_size > 1:
                import torch.distributed as dist
                dist.barrier()
        finally:
            self.stop.restore()
            self.metrics.close()
        return self.summary()

    def train_step(self, micro: list) -> StepResult:
        """One optimizer step on this rank's micro batches (host Batch objects)."""
        shards = [self.local_batch(b) for b in micro]
        n_global = self._scored_tokens(shards)  # over all ranks
        scale = (self.divisor * len(shards) / n_global[0].clamp_min(1)).float()  # 0-d
        loss_sum = self.forward_backward_step(shards, scale)
        self.stop.signal = faults.inject("step_end", self.step + 1, self.env.rank, value=self.stop.signal)
        loss_sum, preempt = self._step_boundary(loss_sum, self.stop.signal is not None)
        loss = loss_sum / max(1.0, n_global.item())
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = self._optimizer_step(loss, lr)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return StepResult(self.step, loss, lr, grad_norm, preempt)

    def forward_backward_step(self, shards: list, scale: torch.Tensor) -> torch.Tensor:
        """Forward and backward of each micro batch; returns this rank's summed loss (float64, 0-d).

        `scale` = data-parallel size x grad_accum / scored tokens of the whole step: DeepSpeed divides
        by grad_accum and averages over data-parallel ranks, so the gradient is that of the mean.
        """
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, (tokens, labels, positions, doc_ids) in enumerate(shards):
            loss_sum, _ = self.engine(tokens, positions, doc_ids, labels)
            loss_sum = faults.inject("micro_loss", self.step + 1, self.env.rank, value=loss_sum)
            self.engine.backward(loss_sum * scale)
            total += loss_sum.detach().double()
            if i < len(shards) - 1:
                self.engine.step()  # inside an accumulation boundary: no update
        return total

    def _scored_tokens(self, shards: list) -> torch.Tensor:
        count = torch.zeros(1, dtype=torch.float64, device=self.device)
        for _, labels, _, _ in shards:
            count += (labels != IGNORE_INDEX).sum()
        return _all_reduce(count)

    def _step_boundary(self, loss_sum: torch.Tensor, stop: bool) -> tuple[float, bool]:
        """One all-reduce that gives every rank the step's total loss and whether any rank was
        asked to stop."""
        both = torch.stack([loss_sum, torch.tensor(1.0 if stop else 0.0, dtype=torch.float64,
                                                   device=self.device)])
        _all_reduce(both)
        return both[0].item(), both[1].item() > 0

    def _optimizer_step(self, loss: float, lr: float) -> float | None:
        """The step's engine.step() (the update); returns the gradient norm. A non-finite loss
        stops the run (nan_policy=stop) or makes the update a no-op (skip)."""
        finite, grad_norm = math.isfinite(loss), None
        if not finite:
            self._nonfinite(lr)
        elif self.grad_norm_by_hand:
            grads = [p.grad.detach().double().norm() for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.stack(grads).norm().item() if grads else 0.0
        try:
            self.engine.step()
        finally:
            self.optimizer.skip_updates = False
        if finite and grad_norm is None:
            g = self.engine.get_global_grad_norm()
            grad_norm = None if g is None else float(g)
        return grad_norm

    def _nonfinite(self, lr: float) -> None:
        if self.cfg.train.nan_policy == "stop":
            step = self.step + 1
            self.metrics.write({"step": step, "loss": None, "nonfinite": True, "lr": lr})
            raise NonFiniteLoss(
                f"non-finite loss at step {step}; train.nan_policy=stop: stopped before updating the "
                f"weights. Last good checkpoint: {self.checkpointer.latest() or 'none'} (a restart "
                f"resumes from it; lower train.lr, or set train.nan_policy=skip)")
        self.optimizer.skip_updates = True

    # ------------------------------------------------------------------------- after a step
    def after_step(self, r: StepResult) -> None:
        """Log, evaluate, checkpoint and honour a preemption, in that order."""
        t = self.cfg.train
        if r.finite:
            self.last_loss = r.loss
        else:
            self.skipped += 1
            self.metrics.print(f"warning: non-finite loss at step {r.step}; skipped the update "
                               f"(train.nan_policy=skip, {self.skipped} skipped so far)")
        self.metrics.advance(r.step, self.last_loss)
        if r.step % self.cfg.run.log_every == 0 or r.step == t.steps or not r.finite:
            self.log_step(r)
        if self.validator.due(r.step):
            self.validator.run(r.step, self.metrics)
        periodic = t.checkpoint_every > 0 and r.step % t.checkpoint_every == 0
        if (periodic or r.step == t.steps or r.preempt) and self.checkpointer.last_saved != r.step:
            folder = self.checkpointer.save(r.step, self.tokens_seen, self.loader)
            self.metrics.print(f"checkpoint {folder}")
            if r.preempt and r.step < t.steps:
                self.metrics.print(f"preempted ({self.stop.signal or 'signal on another rank'}): "
                                   f"checkpoint {folder} written; exiting with {EXIT_PREEMPTED}")
                raise Preempted(f"preempted at step {r.step}; checkpoint {folder} written; "
                                f"rerun the same command to resume")
        elif r.preempt and r.step < t.steps:
            raise Preempted(f"preempted at step {r.step}; checkpoint {self.checkpointer.latest()} is "
                            f"current; rerun to resume")

    def log_step(self, r: StepResult) -> None:
        tps = self.window.tokens_per_s()
        n_gpus = self.env.world_size
        self.metrics.log_step({
            "step": r.step, "loss": r.loss if r.finite else None, "loss_avg": self.window.loss_avg(),
            "lr": r.lr, "grad_norm": r.grad_norm, "tokens_per_s": tps, "tokens": self.tokens_seen,
            "mfu": self.flops_per_token * tps / (n_gpus * self.peak) if self.peak else None,
            "peak_gpu_mem_gb": peak_gpu_memory_gb(self.device),
            "elapsed_s": round(time.time() - self.t_start, 3),
            **({"skipped": True} if not r.finite else {}),
            **({"skipped_total": self.skipped} if self.skipped else {}),
        })
        self.window.reset()

    def summary(self) -> dict:
        return {"step": self.step, "final_loss": self.last_loss, "eval_loss": self.validator.last_loss,
                "tokens": self.tokens_seen, "resumed_from": self.resumed_from,
                "skipped_steps": self.skipped, "out_dir": str(self.out_dir),
                "checkpoint": str(self.checkpointer.latest()),
                "wall_s": round(time.time() - self.t_start, 2)}


# ----------------------------------------------------------------------------- setup helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _all_reduce(t: torch.Tensor, group=None) -> torch.Tensor:
    import torch.distributed as dist
    dist.all_reduce(t, group=group)
    return t


def _write_run_files(cfg, out_dir: Path, tokenizer) -> None:
    """config.yaml (resolved: vocab_size filled in) and tokenizer.model, each written then renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "config.yaml.tmp"
    save_config(cfg, tmp)
    os.replace(tmp, out_dir / "config.yaml")
    src = Path(getattr(tokenizer, "model_path", "") or "")
    if src.is_file() and src.resolve() != (out_dir / "tokenizer.model").resolve():
        tmp = out_dir / "tokenizer.model.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, out_dir / "tokenizer.model")


def _prepare_data(cfg, env) -> None:
    """Rank 0 builds the tokenizer and token caches first; then every rank opens them."""
    import torch.distributed as dist
    from datetime import timedelta

    from ..data import prepare_data
    from ..data.errors import DataError
    # data preparation can take longer than the collective timeout: wait on a separate group
    group = dist.new_group(backend="gloo", timeout=timedelta(hours=6)) if env.world_size > 1 else None
    failed = torch.zeros(1)
    if env.rank == 0:
        try:
            prepare_data(cfg)
        except Exception:
            failed[0] = 1
            if group is not None:
                dist.all_reduce(failed, group=group)
            raise
    if group is not None:
        dist.all_reduce(failed, group=group)
        dist.destroy_process_group(group)
    if failed.item():
        raise DataError("data preparation failed on rank 0 (its error message says why)")
