#!/usr/bin/env python
"""Pretrain (or resume) a model: the config file plus dotted key=value overrides.

    python launch/train.py --config configs/tiny.yaml [train.steps=20 run.out_dir=runs/x ...]
    deepspeed launch/train.py --config configs/tiny.yaml                 # one node, all GPUs
    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny.yaml

A run restarted with the same run.out_dir resumes from <out_dir>/checkpoints/latest.
Exit codes: 0 done, 2 bad config / data / checkpoint, 3 non-finite loss (nan_policy=stop),
4 another rank died or a collective timed out, 75 preempted by SIGUSR1/SIGTERM after writing a
checkpoint (requeue the job; it resumes). See docs/training.md.
"""
from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # a plain checkout: the repository root on sys.path
    import _bootstrap  # noqa: F401


def parse_args(argv=None):
    from scaleinv_dist.cli import ArgumentParser

    p = ArgumentParser(__doc__)
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=20 run.out_dir=runs/x")
    return p.parse_args(argv)


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _die(code: int, message: str, all_ranks: bool = True) -> None:
    """One line on stderr (rank 0; other ranks prefix theirs, since their errors may differ)."""
    from scaleinv_dist.cli import one_line

    rank = _rank()
    if rank == 0 or all_ranks:
        print(f"error: {'' if rank == 0 else f'[rank {rank}] '}{one_line(message)}", file=sys.stderr,
              flush=True)
    _exit(code)


def _exit(code: int, hard: bool = False) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if hard:  # a peer is gone: tearing down the process group could block
        os._exit(code)
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass
    # Everything is written and closed by now (checkpoints synchronously, metrics/wandb in the
    # loop's finally). Skipping interpreter finalisation keeps the exit code: a native thread torn
    # down there (seen with 2 gloo ranks) could otherwise abort the process (SIGABRT, not `code`).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:  # deepspeed launcher
        os.environ["LOCAL_RANK"] = str(args.local_rank)

    from scaleinv_dist.cli import EXIT_OK, EXIT_USAGE
    from scaleinv_dist.config import ConfigError, check_device, load_config
    from scaleinv_dist.data.errors import DataError
    from scaleinv_dist.parallel.layouts import LayoutError
    from scaleinv_dist.parallel.topology import TopologyError
    from scaleinv_dist.run_dir import check_resume_shape
    from scaleinv_dist.train.checkpoint import CheckpointError
    from scaleinv_dist.train.engine import use_cuda

    # user mistakes (ValueErrors but CheckpointError); any other exception is a bug: traceback
    user_errors = (ConfigError, DataError, LayoutError, TopologyError, CheckpointError)
    try:
        cfg = load_config(args.config, args.overrides)
        check_device(cfg, "cuda" if use_cuda(cfg) else "cpu")
        check_resume_shape(cfg)
    except user_errors as err:
        _die(EXIT_USAGE, str(err))

    from scaleinv_dist.train.loop import PeerFailure, Preempted, TrainingInterrupted, train
    try:
        summary = train(cfg)
    except user_errors as err:
        _die(EXIT_USAGE, str(err))
    except Preempted as err:
        if _rank() == 0:
            print(f"preempted: {err}", file=sys.stderr, flush=True)
        _exit(err.exit_code)
    except PeerFailure as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        _exit(err.exit_code, hard=True)
    except TrainingInterrupted as err:  # NonFiniteLoss: every rank knows the same
        _die(err.exit_code, str(err), all_ranks=False)
    if summary and _rank() == 0:
        loss = summary.get("final_loss")
        print(f"done: step {summary['step']}, loss {loss if loss is None else round(loss, 4)}, "
              f"{summary['wall_s']} s; checkpoint {summary['checkpoint']}", flush=True)
    _exit(EXIT_OK)
    return EXIT_OK


if __name__ == "__main__":
    main()
