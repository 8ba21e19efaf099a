#!/usr/bin/env python
"""Train the same model with each attention method and compare validation loss at L, 4L, 16L.

    python launch/sweep.py --config configs/tiny.yaml --out runs/sweep
    python launch/sweep.py --config configs/tiny.yaml --out runs/sweep --methods si_p_rope,rope --steps 50
    python launch/sweep.py --config configs/tiny.yaml --out runs/sweep --gpus 0,1,2,3   # 4 at once
    python launch/sweep.py --plan configs/sweeps/python.yaml --out runs/sweep-python     # seeds + needle
    python launch/sweep.py --publish runs/sweep-python --docs docs     # RESULTS.md section, reproduction.json

A plan (YAML) holds the sweep's own settings: config, methods, seeds ({method: [seeds]}), steps,
multiples, max_tokens, eval_batch_size, parallel, gpus, overrides, time_limit and needle
(launch/niah.py settings, see evaluate.sweep.NEEDLE_DEFAULTS); command-line flags override it.
Before any job the data is prepared once (every job then finds it in the cache) and its manifest
is written to <out>/data_manifest.json and into every run directory. Outputs are rewritten as each
job finishes.

Methods (attention.transform, attention.position): si_p_rope (scale_invariant, p_rope),
p_rope (none, p_rope), rope (none, rope), nope (none, nope), logn_p_rope (logn, p_rope),
alibi (none, alibi). L is the config's train.seq_len. Extra key=value arguments are passed to every
training run. Writes <out>/sweep.md, <out>/sweep.json and <out>/sweep_loss_vs_length.png.

A sweep longer than one sitting runs in parts: `--time-limit 540` stops it (exit 75) with every
unfinished training checkpointed, and the same command with `--skip-existing` continues it.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

if __name__ == "__main__":  # a plain checkout: the repository root on sys.path
    import _bootstrap  # noqa: F401

from scaleinv_dist.cli import EXIT_PREEMPTED, ArgumentParser, run_cli  # noqa: E402
from scaleinv_dist.evaluate.errors import EvalError  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--plan", help="a sweep plan (YAML, e.g. configs/sweeps/python.yaml)")
    p.add_argument("--publish", metavar="SWEEP_DIR",
                   help="write the results of a finished sweep folder into --docs, and exit")
    p.add_argument("--docs", default="docs", help="with --publish: the docs folder (default docs)")
    p.add_argument("--config", help="the base config (e.g. configs/tiny.yaml); required without --plan")
    p.add_argument("--out", help="sweep folder (runs/, logs/, sweep.md, sweep.json, plot)")
    p.add_argument("--methods", default=None, help="comma-separated subset of: "
                   "si_p_rope,p_rope,rope,nope,logn_p_rope,alibi (default all)")
    p.add_argument("--steps", type=int, default=None, help="train.steps for every method")
    p.add_argument("--multiples", default=None,
                   help="evaluation lengths as multiples of L (default: the plan's, else the config's "
                        "eval.length_multiples)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="validation tokens per length (default: the plan's, else the config's "
                        "eval.max_tokens)")
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--parallel", type=int, default=None,
                   help="methods trained at once (default: number of --gpus, else 1)")
    p.add_argument("--gpus", default=None, help="GPU ids, e.g. 0,1,2,3: each job is pinned to one")
    p.add_argument("--skip-existing", action="store_true",
                   help="continue a sweep in <out>: skip finished stages (training at its final step, "
                        "eval.json, niah.json); unfinished training resumes from its checkpoint")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop the jobs still running this long after the start (training checkpoints "
                        "first) and exit 75; rerun with --skip-existing to continue")
    p.add_argument("overrides", nargs="*", help="config overrides key=value for every training run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


def run(args) -> int:
    import threading
    import time

    from scaleinv_dist.config import load_config
    from scaleinv_dist.evaluate import common, publish, sweep

    if args.publish:
        written = publish.publish(Path(args.publish), Path(args.docs))
        print("wrote " + ", ".join(str(p) for p in written))
        return 0
    plan = sweep.load_plan(args.plan) if args.plan else {}
    config = args.config or plan.get("config")
    if not config or not args.out:
        raise EvalError("give --out and either --config or a --plan that names a config")
    overrides = list(plan.get("overrides", [])) + list(args.overrides)
    methods = sweep.select_methods(args.methods or ",".join(plan.get("methods", [])) or None)
    for o in overrides:
        if o.split("=", 1)[0] in ("attention.transform", "attention.position", "run.out_dir", "run.seed"):
            raise EvalError(f"override {o!r} is set by the sweep itself; remove it")
    steps = args.steps if args.steps is not None else plan.get("steps")
    if steps is not None and steps < 1:
        raise EvalError("--steps must be >= 1")
    time_limit = args.time_limit if args.time_limit is not None else plan.get("time_limit")
    if time_limit is not None and time_limit <= 0:
        raise EvalError("--time-limit must be a positive number of seconds")
    # validates the config and the overrides now, before anything trains
    cfg = load_config(config, overrides + ([f"train.steps={steps}"] if steps else []))
    multiples = common.parse_float_list(args.multiples or ",".join(
        f"{x:g}" for x in plan.get("multiples", cfg.eval.length_multiples)), "--multiples")
    gpus_text = args.gpus if args.gpus is not None else ",".join(str(g) for g in plan.get("gpus", []))
    gpus = [g.strip() for g in gpus_text.split(",") if g.strip()]
    parallel = args.parallel or plan.get("parallel") or max(1, len(gpus))
    max_tokens = args.max_tokens if args.max_tokens is not None else plan.get("max_tokens")
    eval_batch = args.eval_batch_size or plan.get("eval_batch_size")
    out = Path(args.out).resolve()

    t0 = time.time()
    manifest = sweep.prepare_sweep_data(cfg, out)
    data_s = time.time() - t0
    print(f"data: {manifest['source']}, {manifest['train_tokens']:,} training / {manifest['val_tokens']:,} "
          f"validation tokens ({manifest['train_docs']} / {manifest['val_docs']} documents), "
          f"prepared in {data_s:.0f}s")
    multiples = sweep.fit_multiples(multiples, cfg.train.seq_len, manifest)
    jobs = sweep.build_jobs(methods, str(Path(config).resolve()), out, overrides, cfg.train.steps,
                            multiples, max_tokens, eval_batch, seeds=plan.get("seeds"),
                            needle=plan.get("needle"))
    print(f"sweep: {len(jobs)} jobs ({', '.join(j.name for j in jobs)}), L = {cfg.train.seq_len}, "
          f"{cfg.train.steps} steps each, {parallel} at a time"
          + (f" on GPUs {','.join(gpus)}" if gpus else ""))
    title = f"{Path(config).stem}, L = {cfg.train.seq_len}, {cfg.train.steps} steps"
    device = sweep.device_name()
    import torch
    torch_version = torch.__version__
    command = (" ".join(["python launch/sweep.py", *map(shlex.quote, sys.argv[1:])])
               if Path(sys.argv[0]).name == "sweep.py" else None)
    lock = threading.Lock()
    earlier = sweep.earlier_parts(out) if args.skip_existing else None

    def write(done=None):
        with lock:
            if done is not None:
                sweep.copy_manifest(out, done.run_dir)
            summary = sweep.collect(jobs, cfg.train.seq_len, multiples)
            summary.update(config=str(config), plan=args.plan, overrides=overrides, steps=cfg.train.steps,
                           data_seconds=round(data_s, 1), seconds=round(time.time() - t0, 1),
                           device=device, command=command, parallel=parallel, torch=torch_version,
                           date=time.strftime("%Y-%m-%d", time.gmtime(t0)))
            return sweep.write_outputs(sweep.add_parts(summary, earlier), out, title)

    sweep.run_jobs(jobs, out / "logs", parallel=parallel, gpus=gpus, skip_existing=args.skip_existing,
                   on_done=write, deadline=None if time_limit is None else t0 + time_limit)
    files = write()
    print(files["table"])
    print(f"wrote {files['md']}, {files['json']}, {files['png']} ({time.time() - t0:.0f}s in all)")
    stopped = [j.name for j in jobs if j.status == "stopped"]
    if stopped:
        again = (command or "the same command") + ("" if args.skip_existing else " --skip-existing")
        print(f"stopped at the time limit ({time_limit:g}s): {len(stopped)} of {len(jobs)} jobs unfinished "
              f"({', '.join(stopped)}); continue with: {again}")
        return EXIT_PREEMPTED
    failed = [j.name for j in jobs if j.status != "ok"]
    if failed:
        print(f"error: {len(failed)} method(s) failed: {', '.join(failed)} (logs in {out / 'logs'})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
