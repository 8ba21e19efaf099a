#!/usr/bin/env python
"""Sample from a trained run with a KV cache: greedy, temperature or top-p; streamed to stdout.

    python launch/generate.py --run runs/tiny --prompt "Once upon a time"
    python launch/generate.py --run runs/tiny --prompt "The" --prompt "A" --max-new-tokens 100 \\
        --temperature 0.8 --top-p 0.95 --seed 1
    python launch/generate.py --run runs/tiny --prompt-file prompts.txt --batch   # one prompt a line
    python launch/generate.py --run runs/tiny --prompt "..." attention.backend=reference

Prompts run one after another, each streamed as it is generated (with --batch: all together,
printed at the end). Speed goes to stderr: prompt tokens, prefill time and decode tokens/s.
Exit status 2 with a one-line message for bad input: an empty prompt, a prompt (plus
--max-new-tokens) longer than --max-length, or a checkpoint that does not fit the run's config.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # a plain checkout: the repository root on sys.path
    import _bootstrap  # noqa: F401

from scaleinv_dist.cli import ArgumentParser, die, existing_run_dir, run_cli  # noqa: E402

MAX_LENGTH_MULTIPLE = 16  # default --max-length: 16x the training sequence length


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--run", required=True, help="run directory (a training run's run.out_dir)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", action="append", help="prompt text (repeat for several prompts)")
    g.add_argument("--prompt-file", help="a file with one prompt per non-empty line ('-': stdin)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
    p.add_argument("--max-length", type=int, default=None,
                   help=f"maximum prompt + new tokens (default: {MAX_LENGTH_MULTIPLE}x train.seq_len)")
    p.add_argument("--no-bos", action="store_true", help="don't prepend the tokenizer's BOS token")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after the EOS token")
    p.add_argument("--batch", action="store_true", help="generate all prompts in one batch")
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="prefill long prompts in chunks of this many tokens (bounded memory; 0: whole prompt)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. attention.backend=reference)")
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        prompts = list(args.prompt)
    else:
        try:
            text = sys.stdin.read() if args.prompt_file == "-" else Path(args.prompt_file).read_text()
        except OSError as err:
            die(f"cannot read --prompt-file {args.prompt_file!r}: {err.strerror or err}")
        prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            die(f"--prompt-file {args.prompt_file!r} has no non-empty line")
    for i, p in enumerate(prompts):
        if not p.strip():
            die(f"prompt {i + 1} is empty; give some text to continue")
    return prompts


class TextStreamer:
    """Prints the growing decoded continuation of one prompt (text deltas, whole characters only)."""

    def __init__(self, sp, prompt_ids: list[int], out=sys.stdout):
        self.sp, self.prompt_ids, self.out = sp, list(prompt_ids), out
        self.ids: list[int] = []
        self.base = sp.decode(self.prompt_ids)
        self.printed = ""

    def text(self) -> str:
        full = self.sp.decode(self.prompt_ids + self.ids)
        return full[len(self.base):] if full.startswith(self.base) else self.sp.decode(self.ids)

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.text()
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return  # an incomplete UTF-8 byte sequence, or a re-segmentation: wait for more
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text

    def finish(self) -> None:
        text = self.text()
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
        else:
            self.out.write("\n[decoded] " + text)
        self.out.write("\n")
        self.out.flush()


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


def run(args) -> int:
    import torch

    from scaleinv_dist.config import check_device
    from scaleinv_dist.data.tokenizer import RUN_TOKENIZER_FIX, load_sentencepiece
    from scaleinv_dist.evaluate.common import pick_device
    from scaleinv_dist.generate import (GenerationError, GenerationStats, check_prompts,
                                        generate, load_model)

    run_dir = existing_run_dir(args.run)
    prompts = read_prompts(args)
    if args.max_new_tokens < 1:
        raise GenerationError("--max-new-tokens must be >= 1")
    if args.prefill_chunk < 0:
        raise GenerationError("--prefill-chunk must be >= 0")
    device = pick_device(args.device)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model, cfg, ckpt = load_model(run_dir, args.checkpoint, device=device, dtype=dtype, overrides=args.overrides)
    check_device(cfg, device.type)
    tok_path = run_dir / "tokenizer.model"
    if not tok_path.is_file():
        die(f"{tok_path} not found: the run directory must hold the sentencepiece model it was trained with")
    sp, _ = load_sentencepiece(tok_path, fix=RUN_TOKENIZER_FIX)
    if sp.get_piece_size() > model.cfg.vocab_size:
        die(f"{tok_path} has {sp.get_piece_size()} pieces but the checkpoint's vocabulary is "
            f"{model.cfg.vocab_size}: the tokenizer and the checkpoint come from different runs")
    max_length = args.max_length or MAX_LENGTH_MULTIPLE * cfg.train.seq_len
    bos = [] if args.no_bos or sp.bos_id() < 0 else [sp.bos_id()]
    eos_id = None if args.ignore_eos or sp.eos_id() < 0 else sp.eos_id()
    token_prompts = [bos + sp.encode(p) for p in prompts]
    check_prompts(token_prompts, model.cfg.vocab_size, args.max_new_tokens, max_length)
    p = next(model.parameters())
    print(f"[{ckpt} | {cfg.attention.position} / {cfg.attention.transform} | {p.device} {p.dtype} | "
          f"max length {max_length}]", file=sys.stderr)
    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                eos_id=eos_id, seed=args.seed, max_length=max_length,
                prefill_chunk=args.prefill_chunk or None)
    total = GenerationStats()
    if args.batch:
        stats = GenerationStats()
        outs = generate(model, token_prompts, stats=stats, **opts)
        for text, ids, new in zip(prompts, token_prompts, outs):
            streamer = TextStreamer(sp, ids)
            streamer.ids = new
            sys.stdout.write(text)
            streamer.finish()
        report(stats, f"{len(prompts)} prompts")
        return 0
    for i, (text, ids) in enumerate(zip(prompts, token_prompts)):
        sys.stdout.write(text)
        sys.stdout.flush()
        streamer = TextStreamer(sp, ids)
        stats = GenerationStats()
        generate(model, [ids], stream=lambda row, tok: streamer.push(tok), stats=stats, **opts)
        streamer.finish()
        report(stats, f"prompt {i + 1}")
        for k in ("prompt_tokens", "new_tokens", "prefill_s", "decode_s"):
            setattr(total, k, getattr(total, k) + getattr(stats, k))
    if len(prompts) > 1:
        report(total, "all prompts")
    return 0


def report(stats, what: str) -> None:
    print(f"[{what}: {stats.prompt_tokens} prompt tokens prefilled in {stats.prefill_s:.3f} s; "
          f"{stats.new_tokens} new tokens in {stats.decode_s:.3f} s = {stats.tokens_per_s:.1f} tokens/s]",
          file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
