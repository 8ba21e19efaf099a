#!/usr/bin/env python
"""Needle-in-a-haystack retrieval of a trained run: accuracy by needle depth and context length.

    python launch/niah.py --run runs/tiny                                  # 1x, 4x, 16x train length
    python launch/niah.py --run runs/tiny --lengths 256,1024 --depths 0,0.5,1 --samples 20
    python launch/niah.py --run runs/tiny --finetune-steps 300 --needles 3   # the paper's recipe, roughly
    python launch/niah.py --run runs/tiny --mode generate                  # greedy KV-cache decoding

Needles "The special magic <city> number is <7 digits>." go into validation text at each depth;
the context ends with "What is the special magic <city> number? The special magic <city> number is"
and the number must follow. Writes <run>/niah.json and <run>/niah_heatmap.png (or under --out).
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
    add_run_arguments(p, multiples_help="multiples of the training length (default 1,4,16)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=10, help="contexts per (depth, length) cell")
    p.add_argument("--needles", type=int, default=1,
                   help="needles per context: the scored one at the depth, the rest distractors (paper: 3)")
    p.add_argument("--task", choices=("magic_number", "passkey"), default="magic_number",
                   help="magic_number: city needles, 7 digits; passkey: 'The pass key is 48213. Remember it. ...'")
    p.add_argument("--mode", choices=("teacher", "generate"), default="teacher",
                   help="teacher: argmax exact match of the answer tokens; generate: greedy decoding")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="fine-tune on needle tasks first (paper: 300)")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="AdamW lr (default: the run's train.lr / 10)")
    p.add_argument("--finetune-length", type=int, default=None,
                   help="fine-tune context length (default: the run's train.seq_len)")
    p.add_argument("--finetune-batch", type=int, default=8, help="contexts per fine-tune step")
    p.add_argument("--finetune-until", type=float, default=None, metavar="ACC",
                   help="repeat the fine-tune (rounds of --finetune-steps) until the accuracy at the "
                        "fine-tune length, on contexts built from the training split, reaches ACC")
    p.add_argument("--finetune-max-steps", type=int, default=None,
                   help="with --finetune-until: at most this many steps in all (default 4 rounds)")
    p.add_argument("--finetune-lm", action="store_true",
                   help="add a batch of unseen training windows to every fine-tune step (keeps the LM)")
    p.add_argument("--batch-size", type=int, default=1, help="contexts per forward when scoring")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


def run(args) -> int:
    import torch

    from scaleinv_dist.evaluate import common, data_access, niah, plots, report
    from scaleinv_dist.evaluate.niah_finetune import finetune_until, unseen_train_batches

    run_dir = existing_run_dir(args.run)
    depths = common.parse_float_list(args.depths, "--depths", fractions=True)
    if args.samples < 1 or args.needles < 1 or args.finetune_steps < 0 or args.batch_size < 1:
        raise EvalError("--samples, --needles and --batch-size must be >= 1, --finetune-steps >= 0")
    if args.finetune_until is not None and not (0 < args.finetune_until <= 1 and args.finetune_steps):
        raise EvalError("--finetune-until takes an accuracy in (0, 1] and needs --finetune-steps > 0")
    if args.needles > len(niah.CITIES):
        raise EvalError(f"--needles must be <= {len(niah.CITIES)} (one city per needle)")
    if args.mode == "generate" and not niah.generation_available():
        raise EvalError("--mode generate needs scaleinv_dist.generate (KV-cache decoding), which does not "
                        "import here; use --mode teacher")
    torch.manual_seed(args.seed)
    model, cfg, ckpt, device = common.load_run_model(run_dir, args)
    train_len = cfg.train.seq_len
    lens = common.lengths_from_args(args, train_len, default_multiples=[1, 4, 16])
    bundle = data_access.load_validation(cfg, run_dir)
    tokenizer = bundle.tokenizer
    bos = data_access.window_bos(bundle)
    haystack = data_access.store_tokens(bundle.val_store, max(lens) * 4)
    builder = niah.NeedleBuilder(tokenizer, haystack, bos_id=bos, seed=args.seed, task=args.task)
    need = builder.min_length(args.needles)
    if min(lens) < need:
        raise EvalError(f"context length {min(lens)} is too short for {args.needles} needle(s) and the "
                        f"question with this tokenizer (about {need} tokens needed); use --lengths of at "
                        f"least {need}")
    ft_len = args.finetune_length or train_len
    if args.finetune_steps and ft_len < need:
        raise EvalError(f"the fine-tune length {ft_len} (train.seq_len) is too short for {args.needles} "
                        f"needle(s) and the question (about {need} tokens); pass --finetune-length {need} "
                        f"or more")

    ft = None
    if args.finetune_steps:
        # fine-tune haystacks come from the training split: the scored contexts stay unseen
        ft_hay = data_access.store_tokens(bundle.train_store, max(ft_len * 64, 1 << 20))
        ft_builder = niah.NeedleBuilder(tokenizer, ft_hay, bos_id=bos, seed=args.seed + 1, task=args.task)
        lr = args.finetune_lr if args.finetune_lr is not None else cfg.train.lr / 10
        lm = unseen_train_batches(bundle, ckpt) if args.finetune_lm else None
        # the probe's contexts: training-split haystacks with their own seed (never the scored ones)
        probe_builder = niah.NeedleBuilder(tokenizer, ft_hay, bos_id=bos, seed=args.seed + 2, task=args.task)

        def probe() -> float:
            g = niah.run_grid(model, probe_builder, [ft_len], depths, args.samples, n_needles=args.needles,
                              mode="teacher", tokenizer=tokenizer, device=device,
                              batch_size=args.batch_size, progress=False)
            return g["accuracy_by_length"][0]

        max_steps = args.finetune_max_steps or 4 * args.finetune_steps
        t0 = time.time()
        losses, probes = finetune_until(
            model, ft_builder, ft_len, args.finetune_steps, lr, probe, args.finetune_until, max_steps,
            batch_size=args.finetune_batch, n_needles=args.needles, device=device,
            progress=not args.quiet, lm_batches=lm)
        ft = {"steps": len(losses), "round_steps": args.finetune_steps, "until": args.finetune_until,
              "probe_accuracy": probes, "lr": lr, "batch": args.finetune_batch, "length": ft_len,
              "first_loss": losses[0], "last_loss": losses[-1], "seconds": round(time.time() - t0, 1),
              "haystack": "train split", "lm_mixed": bool(args.finetune_lm)}
        print(f"fine-tuned {len(losses)} steps: answer loss {losses[0]:.3f} -> {losses[-1]:.3f}"
              + (f"; accuracy at {ft_len} after each round: {', '.join(f'{a:.2f}' for a in probes)}"
                 if probes else ""))

    t0 = time.time()
    grid = niah.run_grid(model, builder, lens, depths, args.samples, n_needles=args.needles,
                         mode=args.mode, tokenizer=tokenizer, device=device, batch_size=args.batch_size,
                         progress=not args.quiet)
    out_dir = Path(args.out) if args.out else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"run": str(run_dir), "checkpoint": str(ckpt), "step": common.checkpoint_step(ckpt),
               "train_seq_len": train_len, "transform": cfg.attention.transform,
               "position": cfg.attention.position, "seed": args.seed, "task": args.task, "finetune": ft,
               "seconds": round(time.time() - t0, 1), **grid}
    (out_dir / "niah.json").write_text(json.dumps(payload, indent=2))
    title = (f"{run_dir.name}: {cfg.attention.transform} + {cfg.attention.position}, {args.mode}"
             + (f", fine-tuned {ft['steps']} steps" if ft else ""))
    plots.plot_needle_heatmap(grid, out_dir / "niah_heatmap.png", train_len, title)
    print(report.needle_table(grid))
    print(f"wrote {out_dir / 'niah.json'} and {out_dir / 'niah_heatmap.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
