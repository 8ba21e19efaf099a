"""The training loop: `train(cfg) -> summary dict`.

    setup_distributed -> (CP topology) -> data (rank 0 prepares caches first) -> model ->
    run directory (config.yaml with vocab_size filled in, tokenizer.model) -> (apply_cp) ->
    optimizer + LR schedule -> DeepSpeed engine -> resume from checkpoints/latest -> steps

One step = train.grad_accum micro batches per data-parallel rank. The loss is the mean over every
scored token of the step across all ranks (an all-reduced token count scales each micro batch's
summed loss), so gradients equal a single device's on the whole batch, with or without context
parallelism. Every step boundary all-reduces the summed loss and a stop flag, so all ranks agree
on a non-finite loss (train.nan_policy) and on a preemption signal (SIGUSR1 / SIGTERM).

Exit codes (launch/train.py; see docs/training.md): 0 done, 2 bad config / data / checkpoint,
3 non-finite loss with nan_policy=stop, 4 lost a peer rank / collective timeout,
75 preempted (checkpoint written: requeue and the job resumes).
"""
from __future__ import annotations

import copy
import math
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch

from ..config import save_config
from ..model import build_model
from . import checkpoint as ckpt
from .engine import build_engine, deepspeed_config, grad_divisor, setup_distributed, use_bf16
from .metrics import Metrics, peak_flops, peak_gpu_memory_gb
from .optim import build_optimizer
from .schedule import build_scheduler, reset_lrs

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_PEER_FAILURE = 4
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "temporary failure, try again"
PREEMPT_SIGNALS = ("SIGUSR1", "SIGTERM")


class TrainingInterrupted(RuntimeError):
    """The run stopped early on purpose; `exit_code` tells the launcher what to return."""
    exit_code = 1


class Preempted(TrainingInterrupted):
    exit_code = EXIT_PREEMPTED


class NonFiniteLoss(TrainingInterrupted):
    exit_code = EXIT_NONFINITE


class PeerFailure(TrainingInterrupted):
    exit_code = EXIT_PEER_FAILURE


_DIST_ERROR = re.compile(r"gloo|nccl|connection (closed|reset|refused)|broken pipe|timed out|timeout|"
                         r"by peer|watchdog", re.IGNORECASE)


def is_distributed_failure(err: BaseException) -> bool:
    import torch.distributed as dist
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    return isinstance(err, RuntimeError) and bool(_DIST_ERROR.search(str(err)))


# ----------------------------------------------------------------------------- small helpers
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


def _test_hook(name: str) -> int | None:
    """Test-only fault injection through SCALEINV_TEST_* environment variables."""
    v = os.environ.get(f"SCALEINV_TEST_{name}")
    return int(v) if v not in (None, "") else None


class _StopFlag:
    """SIGUSR1 / SIGTERM set a flag; the loop checkpoints at the next step boundary."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def install(self) -> None:
        import threading
        if threading.current_thread() is not threading.main_thread():
            return
        for name in PREEMPT_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, TypeError):
                pass
        self.previous.clear()


# ----------------------------------------------------------------------------- batches
class _BatchPrep:
    """Host batch -> this rank's (tokens, labels, positions, doc_ids) on the device (CP-sharded)."""

    def __init__(self, cfg, device, topology):
        self.device, self.topology = device, topology
        self.doc_masking = cfg.data.document_masking
        self.layout = None
        if topology is not None and topology.cp_size > 1:
            from ..parallel.layouts import check_seq_len, layout_for
            self.layout = layout_for(cfg.parallel.cp_strategy)
            check_seq_len(cfg.train.seq_len, topology.cp_size, self.layout)

    def __call__(self, batch, labels=None):
        tokens, positions = batch.tokens, batch.positions
        labels = batch.labels if labels is None else labels
        doc_ids = batch.doc_ids if self.doc_masking else None
        if self.layout is not None:
            from ..parallel.layouts import shard_batch
            tokens, labels, positions, doc_ids = shard_batch(
                tokens, labels, positions, doc_ids, rank=self.topology.cp_rank,
                cp_size=self.topology.cp_size, layout=self.layout)
        to = lambda t: None if t is None else t.to(self.device, non_blocking=True)  # noqa: E731
        return to(tokens), to(labels), to(positions), to(doc_ids)


def evaluate_loss(engine, val_store, cfg, prep: _BatchPrep, dp_rank: int, dp_size: int) -> tuple[float, int]:
    """Mean validation loss over up to train.eval_tokens tokens (0 = all) in windows of train.seq_len.

    Batches are dealt round-robin to data-parallel ranks; every rank runs the same number of
    forwards (padding ones score nothing), which ZeRO-3's parameter gathering needs.
    """
    from ..data import count_validation_tokens, validation_windows
    t = cfg.train
    n_windows = count_validation_tokens(val_store, t.seq_len, t.eval_tokens) // t.seq_len
    per_rank = math.ceil(math.ceil(n_windows / t.micro_batch_size) / dp_size)
    totals = torch.zeros(2, dtype=torch.float64, device=prep.device)

    def score(batch, labels=None) -> None:
        tokens, labels, positions, doc_ids = prep(batch, labels)
        loss_sum, n = engine(tokens, positions, doc_ids, labels)
        totals[0] += loss_sum.double()
        totals[1] += n

    engine.eval()
    try:
        with torch.no_grad():
            done, first = 0, None
            for i, batch in enumerate(validation_windows(val_store, t.seq_len, t.eval_tokens,
                                                         t.micro_batch_size)):
                first = batch if first is None else first
                if i % dp_size == dp_rank:
                    score(batch)
                    done += 1
            while done < per_rank and first is not None:
                score(first, torch.full_like(first.labels, -100))
                done += 1
    finally:
        engine.train()
    _all_reduce(totals)  # dp ranks hold different windows, cp ranks different tokens
    n = int(totals[1].item())
    return (totals[0].item() / n if n else float("nan")), n


# ----------------------------------------------------------------------------- the loop
def train(cfg) -> dict:
    """Train (or resume) the run described by cfg; returns a summary dict.

    Raises ConfigError / DataError / CheckpointError for user mistakes, and TrainingInterrupted
    subclasses (Preempted, NonFiniteLoss, PeerFailure) carrying the process exit code.
    """
    env = setup_distributed(cfg)
    try:
        return _train(cfg, env)
    except TrainingInterrupted:
        raise
    except Exception as err:
        if is_distributed_failure(err):
            raise PeerFailure(
                f"rank {env.rank}: lost contact with another rank (it died, or a collective "
                f"exceeded train.collective_timeout_s={cfg.train.collective_timeout_s}s): "
                f"{str(err).splitlines()[0][:300]}. Restart the job: it resumes from "
                f"{Path(cfg.run.out_dir) / 'checkpoints' / 'latest'}") from err
        raise


def _prepare_data(cfg, env):
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


def _train(cfg, env) -> dict:
    import torch.distributed as dist
    t_start = time.time()
    seed_everything(cfg.run.seed)
    out_dir = Path(cfg.run.out_dir)
    t = cfg.train
    topology = None
    dp_rank, dp_size = env.rank, env.world_size
    if cfg.parallel.context_parallel_size > 1:
        from ..parallel.topology import init_topology_from_config
        topology = init_topology_from_config(cfg.parallel, timeout_s=t.collective_timeout_s)
        dp_rank, dp_size = topology.dp_rank, topology.dp_size
    deepspeed_config(cfg)  # config errors before the (slow) data preparation

    _prepare_data(cfg, env)
    from ..data import build_data
    bundle = build_data(cfg, dp_rank, dp_size)
    vocab = int(bundle.tokenizer.vocab_size)
    resolved = copy.deepcopy(cfg)
    if resolved.model.vocab_size == 0:
        resolved.model.vocab_size = vocab
    if env.is_main:
        _write_run_files(resolved, out_dir, bundle.tokenizer)

    seed_everything(cfg.run.seed)  # the same initial weights whatever data preparation consumed
    model = build_model(resolved, device=env.device)  # issue 16: compiled blocks on CUDA (train.compile)
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    flops_per_token = model.flops_per_token(t.seq_len)
    if topology is not None:
        from ..parallel.context_parallel import apply_cp
        apply_cp(model, topology, cfg.parallel)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    engine = build_engine(cfg, model, optimizer, scheduler, mpu=topology)
    device = engine.device if isinstance(engine.device, torch.device) else torch.device(engine.device)
    loader = bundle.train_loader

    # ---- resume
    step, tokens_seen, resumed_from = 0, 0, None
    latest = ckpt.latest_checkpoint(out_dir)
    if latest is not None:
        trainer_state, rank_state = ckpt.load_checkpoint(engine, latest)
        step, tokens_seen = int(trainer_state["step"]), int(trainer_state.get("tokens_seen", 0))
        loader.load_state_dict(rank_state["loader"])
        ckpt.set_rng_state(rank_state["rng"])
        reset_lrs(optimizer, scheduler, cfg)
        resumed_from = step
    last_saved = step if latest is not None else None

    metrics = Metrics(cfg, out_dir, env.is_main, t.steps, step)
    if resumed_from is not None:
        metrics.print(f"resumed from {latest} (step {step})")
    metrics.print(f"model: {n_params / 1e6:.2f}M parameters | {env.world_size} rank(s) on {device.type} "
                  f"| dp {dp_size} x cp {cfg.parallel.context_parallel_size} | zero {t.zero_stage} | "
                  f"{'bf16' if use_bf16(cfg) else 'fp32'} | {t.steps} steps of "
                  f"{t.micro_batch_size * t.grad_accum * dp_size} x {t.seq_len} tokens")

    G = t.grad_accum
    divisor = grad_divisor(engine)
    peak = peak_flops(device, use_bf16(cfg))
    n_gpus = env.world_size
    tokens_per_step = t.micro_batch_size * t.seq_len * G * dp_size
    grad_norm_by_hand = t.zero_stage == 0  # DeepSpeed reports none there
    prep = _BatchPrep(cfg, device, topology)
    stop = _StopFlag()
    stop.install()
    nan_at, die_at, die_rank = _test_hook("NAN_AT_STEP"), _test_hook("DIE_AT_STEP"), _test_hook("DIE_RANK")
    preempt_at, hang_at = _test_hook("PREEMPT_AT_STEP"), _test_hook("HANG_AT_STEP")
    step_sleep = float(os.environ.get("SCALEINV_TEST_STEP_SLEEP") or 0)  # test-only: slow steps
    last_loss, last_eval, skipped = None, None, 0
    window_time, window_tokens, window_losses = 0.0, 0, []
    eval_enabled = t.eval_every > 0

    def rank_state() -> dict:
        return {"loader": loader.state_dict(), "rng": ckpt.rng_state()}

    def save(at_step: int) -> Path:
        nonlocal last_saved
        folder = ckpt.save_checkpoint(engine, out_dir, at_step,
                                      {"tokens_seen": tokens_seen, "dp_size": dp_size,
                                       "cp_size": cfg.parallel.context_parallel_size},
                                      rank_state(), t.keep_checkpoints, t.zero_stage)
        last_saved = at_step
        metrics.print(f"checkpoint {folder}")
        return folder

    def run_eval(at_step: int) -> None:
        nonlocal last_eval, eval_enabled
        from ..data.errors import DataError
        try:
            loss, n = evaluate_loss(engine, bundle.val_store, cfg, prep, dp_rank, dp_size)
        except DataError as err:
            metrics.print(f"warning: evaluation disabled: {err}")
            eval_enabled = False
            return
        last_eval = loss
        metrics.log_eval({"split": "val", "context_length": t.seq_len, "loss": loss, "step": at_step,
                          "tokens": n})

    try:
        engine.train()
        while step < t.steps:
            t0 = time.perf_counter()
            if die_at == step + 1 and die_rank == env.rank:
                os._exit(1)  # test-only: a rank dies
            if hang_at == step + 1 and die_rank == env.rank:
                time.sleep(10 ** 6)  # test-only: a rank hangs
            if step_sleep:
                time.sleep(step_sleep * G)
            micro = [loader.next_batch() for _ in range(G)]
            shards = [prep(b) for b in micro]
            count = torch.zeros(1, dtype=torch.float64, device=device)
            for _, labels, _, _ in shards:
                count += (labels != -100).sum()
            n_global = _all_reduce(count)  # scored tokens of this step over all ranks
            scale = (divisor * G / n_global[0].clamp_min(1)).float()  # 0-d
            loss_acc = torch.zeros(2, dtype=torch.float64, device=device)
            for i, (tokens, labels, positions, doc_ids) in enumerate(shards):
                loss_sum, _ = engine(tokens, positions, doc_ids, labels)
                if nan_at == step + 1 and env.rank == 0:
                    loss_sum = loss_sum * float("nan")  # test-only: a non-finite loss
                engine.backward(loss_sum * scale)  # DeepSpeed divides by G and averages over dp
                loss_acc[0] += loss_sum.detach().double()
                if i < G - 1:
                    engine.step()
            if preempt_at == step + 1 and env.rank == 0:
                stop.signal = "SCALEINV_TEST_PREEMPT_AT_STEP"  # test-only: as if signalled
            loss_acc[1] = 1.0 if stop.signal else 0.0
            _all_reduce(loss_acc)
            loss = loss_acc[0].item() / max(1.0, n_global.item())
            preempt = loss_acc[1].item() > 0
            lr = scheduler.get_last_lr()[0]
            finite = math.isfinite(loss)
            grad_norm = None
            if not finite:
                if t.nan_policy == "stop":
                    metrics.write({"step": step + 1, "loss": None, "nonfinite": True, "lr": lr})
                    good = ckpt.latest_checkpoint(out_dir)
                    raise NonFiniteLoss(
                        f"non-finite loss at step {step + 1}; train.nan_policy=stop: stopped before "
                        f"updating the weights. Last good checkpoint: {good or 'none'} (a restart "
                        f"resumes from it; lower train.lr, or set train.nan_policy=skip)")
                optimizer.skip_updates = True
            elif grad_norm_by_hand:
                grads = [p.grad.detach().double().norm() for p in model.parameters() if p.grad is not None]
                grad_norm = torch.stack(grads).norm().item() if grads else 0.0
            try:
                engine.step()
            finally:
                optimizer.skip_updates = False
            if finite and grad_norm is None:
                g = engine.get_global_grad_norm()
                grad_norm = None if g is None else float(g)
            step += 1
            tokens_seen += tokens_per_step
            if not finite:
                skipped += 1
                metrics.print(f"warning: non-finite loss at step {step}; skipped the update "
                              f"(train.nan_policy=skip, {skipped} skipped so far)")
            else:
                last_loss = loss
                window_losses.append(loss)
            window_time += time.perf_counter() - t0
            window_tokens += tokens_per_step
            metrics.advance(step, last_loss)

            if step % cfg.run.log_every == 0 or step == t.steps or not finite:
                tps = window_tokens / max(window_time, 1e-9)
                metrics.log_step({
                    "step": step, "loss": loss if finite else None,
                    "loss_avg": sum(window_losses) / len(window_losses) if window_losses else None,
                    "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps, "tokens": tokens_seen,
                    "mfu": flops_per_token * tps / (n_gpus * peak) if peak else None,
                    "peak_gpu_mem_gb": peak_gpu_memory_gb(device),
                    "elapsed_s": round(time.time() - t_start, 3),
                    **({"skipped": True} if not finite else {}),
                    **({"skipped_total": skipped} if skipped else {}),
                })
                window_time, window_tokens, window_losses = 0.0, 0, []

            if eval_enabled and (step % t.eval_every == 0 or step == t.steps):
                run_eval(step)
            periodic = t.checkpoint_every > 0 and step % t.checkpoint_every == 0
            if (periodic or step == t.steps or preempt) and last_saved != step:
                folder = save(step)
                if preempt and step < t.steps:
                    metrics.print(f"preempted ({stop.signal or 'signal on another rank'}): "
                                  f"checkpoint {folder} written; exiting with {EXIT_PREEMPTED}")
                    raise Preempted(f"preempted at step {step}; checkpoint {folder} written; "
                                    f"rerun the same command to resume")
            elif preempt and step < t.steps:
                raise Preempted(f"preempted at step {step}; checkpoint "
                                f"{ckpt.latest_checkpoint(out_dir)} is current; rerun to resume")
        if env.world_size > 1:
            dist.barrier()
    finally:
        stop.restore()
        metrics.close()

    return {"step": step, "final_loss": last_loss, "eval_loss": last_eval, "tokens": tokens_seen,
            "resumed_from": resumed_from, "skipped_steps": skipped, "out_dir": str(out_dir),
            "checkpoint": str(ckpt.latest_checkpoint(out_dir)), "wall_s": round(time.time() - t_start, 2)}
