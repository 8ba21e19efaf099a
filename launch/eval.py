#!/usr/bin/env python
"""Validation loss of a trained run at several context lengths, and by position bucket.

    python launch/eval.py --run runs/tiny                       # the config's eval.length_multiples
    python launch/eval.py --run runs/tiny --multiples 1,4,16 --max-tokens 65536
    python launch/eval.py --run runs/tiny --lengths 256,1024,4096 attention.backend=reference
    torchrun --nproc_per_node 4 launch/eval.py --run-dir R --lengths 65536 parallel.context_parallel_size=4

Prints a table, writes <run>/eval.json and <run>/eval_loss_vs_length.png, and appends one
{"split": "val", "context_length", "loss", "step"} record per length to <run>/metrics.jsonl.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # a plain checkout: the repository root on sys.path
    import _bootstrap  # noqa: F401

from scaleinv_dist.cli import ArgumentParser, add_run_arguments, existing_run_dir, run_cli  # noqa: E402
from scaleinv_dist.evaluate.errors import EvalError  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    add_run_arguments(p, multiples_help="multiples of the training length, e.g. 1,4,16")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="validation tokens per length (0 = all; default: the config's eval.max_tokens)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per forward (default: eval.batch_size)")
    p.add_argument("--no-align", action="store_true",
                   help="score every whole window of each length instead of the same tokens at all lengths")
    p.add_argument("--no-metrics", action="store_true", help="don't append to metrics.jsonl")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


def run(args) -> int:
    from scaleinv_dist.evaluate import common, data_access, distributed
    from scaleinv_dist.evaluate import lengths as ev

    run_dir = existing_run_dir(args.run)
    model, cfg, ckpt, device = common.load_run_model(run_dir, args)
    lens = common.lengths_from_args(args, cfg.train.seq_len, cfg_lengths=cfg.eval.context_lengths,
                                    cfg_multiples=cfg.eval.length_multiples)
    max_tokens = cfg.eval.max_tokens if args.max_tokens is None else args.max_tokens
    batch_size = args.batch_size or cfg.eval.batch_size
    if max_tokens < 0 or batch_size < 1:
        raise EvalError("--max-tokens must be >= 0 and --batch-size >= 1")

    par = distributed.setup_parallel(model, cfg, lens)
    bundle = data_access.load_validation(cfg, run_dir)
    align = 0 if args.no_align else data_access.choose_align(bundle.val_store, lens)
    data_access.check_lengths(bundle.val_store, lens, max_tokens, align)
    if par.is_main and not args.no_align and not align:
        print(f"note: no validation document holds lcm{tuple(lens)} tokens; each length scores its "
              f"own whole windows (the token sets differ between lengths)")

    t0 = time.time()
    results = ev.evaluate_lengths(model, bundle.val_store, lens, max_tokens, batch_size, device,
                                  align_to=align, shard=par.shard, reduce=par.reduce, dp=par.dp,
                                  cp_size=par.cp_size, progress=par.is_main and not args.quiet)
    if par.is_main:
        meta = {"checkpoint": str(ckpt), "step": common.checkpoint_step(ckpt), "max_tokens": max_tokens,
                "align_to": align, "device": str(device), "world_size": par.dp[1] * par.cp_size,
                "seconds": round(time.time() - t0, 2)}
        write_outputs(args, run_dir, cfg, bundle, results, meta)
    distributed.teardown(par)
    return 0


def write_outputs(args, run_dir: Path, cfg, bundle, results: dict, meta: dict) -> None:
    """Table on stdout, eval.json, the plot and the metrics.jsonl records."""
    from scaleinv_dist.evaluate import common, data_access, report

    train_len = cfg.train.seq_len
    out_dir = Path(args.out) if args.out else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    training = common.training_summary(common.read_metrics(run_dir / "metrics.jsonl"))
    first = results[min(results)]
    gap = first["loss"] - training["train_loss"] if "train_loss" in training else None
    payload = {"run": str(run_dir), "train_seq_len": train_len, "transform": cfg.attention.transform,
               "position": cfg.attention.position, **meta, "training": training, "train_val_gap": gap,
               **data_access.data_summary(bundle, training),
               "results": {str(L): r for L, r in results.items()}}
    (out_dir / "eval.json").write_text(json.dumps(payload, indent=2))
    print(report.length_table(results, train_len))
    if payload["epochs"] is not None and gap is not None:
        print(f"trained {payload['epochs']:.3g} epochs of the training split; last train loss "
              f"{training['train_loss']:.4f}; val@{min(results)} - train = {gap:+.4f}")
    written = [out_dir / "eval.json"]
    if not args.no_plot:
        from scaleinv_dist.evaluate import plots

        title = f"{run_dir.name}: {cfg.attention.transform} + {cfg.attention.position}, step {meta['step']}"
        written.append(plots.plot_loss_vs_length(results, train_len, out_dir / "eval_loss_vs_length.png", title))
    if not args.no_metrics:
        common.append_metrics(run_dir / "metrics.jsonl", report.metrics_records(results, meta["step"], train_len))
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    sys.exit(main())
