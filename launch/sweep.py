#!/usr/bin/env python
"""Train the same model with each attention method and compare validation loss at L, 4L, 16L.

    python launch/sweep.py --config configs/tiny.yaml --out runs/sweep
    python launch/sweep.py --config configs/tiny.yaml --out runs/sweep --methods si_p_rope,rope --steps 50
    python launch/sweep.py --config configs/tiny.yaml --out runs/sweep --gpus 0,1,2,3   # 4 at once

Methods (attention.transform, attention.position): si_p_rope (scale_invariant, p_rope),
p_rope (none, p_rope), rope (none, rope), nope (none, nope), logn_p_rope (logn, p_rope),
alibi (none, alibi). L is the config's train.seq_len. Extra key=value arguments are passed to every
training run. Writes <out>/sweep.md, <out>/sweep.json and <out>/sweep_loss_vs_length.png.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # a plain checkout: the repository root on sys.path
    import _bootstrap  # noqa: F401

from scaleinv_dist.cli import ArgumentParser, run_cli  # noqa: E402
from scaleinv_dist.evaluate.errors import EvalError  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--config", required=True, help="the base config (e.g. configs/tiny.yaml)")
    p.add_argument("--out", required=True, help="sweep folder (runs/, logs/, sweep.md, sweep.json, plot)")
    p.add_argument("--methods", default="all", help="comma-separated subset of: "
                   "si_p_rope,p_rope,rope,nope,logn_p_rope,alibi (default all)")
    p.add_argument("--steps", type=int, default=None, help="train.steps for every method")
    p.add_argument("--multiples", default="1,4,16", help="evaluation lengths as multiples of L")
    p.add_argument("--max-tokens", type=int, default=None, help="validation tokens per length (eval)")
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--parallel", type=int, default=None,
                   help="methods trained at once (default: number of --gpus, else 1)")
    p.add_argument("--gpus", default="", help="GPU ids, e.g. 0,1,2,3: each job is pinned to one")
    p.add_argument("--skip-existing", action="store_true",
                   help="don't retrain methods that already have a checkpoint under <out>/runs")
    p.add_argument("overrides", nargs="*", help="config overrides key=value for every training run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


def run(args) -> int:
    from scaleinv_dist.config import load_config
    from scaleinv_dist.evaluate import common, sweep

    methods = sweep.select_methods(args.methods)
    for o in args.overrides:
        if o.split("=", 1)[0] in ("attention.transform", "attention.position", "run.out_dir"):
            raise EvalError(f"override {o!r} is set by the sweep itself; remove it")
    if args.steps is not None and args.steps < 1:
        raise EvalError("--steps must be >= 1")
    # validates the config and the overrides now, before anything trains
    steps = [f"train.steps={args.steps}"] if args.steps else []
    cfg = load_config(args.config, list(args.overrides) + steps)
    multiples = common.parse_float_list(args.multiples, "--multiples")
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    parallel = args.parallel or max(1, len(gpus))
    out = Path(args.out).resolve()
    jobs = sweep.build_jobs(methods, str(Path(args.config).resolve()), out, args.overrides, args.steps,
                            multiples, args.max_tokens, args.eval_batch_size)
    print(f"sweep: {len(jobs)} methods ({', '.join(methods)}), L = {cfg.train.seq_len}, "
          f"{cfg.train.steps} steps each, {parallel} at a time"
          + (f" on GPUs {','.join(gpus)}" if gpus else ""))
    sweep.run_jobs(jobs, out / "logs", parallel=parallel, gpus=gpus, skip_existing=args.skip_existing)
    summary = sweep.collect(jobs, cfg.train.seq_len, multiples)
    summary.update(config=str(args.config), overrides=list(args.overrides), steps=cfg.train.steps)
    title = f"{Path(args.config).stem}, L = {cfg.train.seq_len}, {cfg.train.steps} steps"
    files = sweep.write_outputs(summary, out, title)
    print(files["table"])
    print(f"wrote {files['md']}, {files['json']}, {files['png']}")
    failed = [j.method for j in jobs if j.status != "ok"]
    if failed:
        print(f"error: {len(failed)} method(s) failed: {', '.join(failed)} (logs in {out / 'logs'})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
