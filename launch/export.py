#!/usr/bin/env python
"""Export a trained run as a Hugging Face-style folder (loads with trust_remote_code=True).

    python launch/export.py --run runs/tiny --out exports/tiny
    python launch/export.py --run runs/tiny --out exports/tiny --dtype bfloat16 --overwrite --verify

Writes model.safetensors, config.json (auto_map -> modeling_scaleinv.py / configuration_scaleinv.py),
the sentencepiece tokenizer (tokenizer.model + tokenization_scaleinv.py for AutoTokenizer),
generation_config.json and a README. The folder needs torch + transformers (+ sentencepiece for the
tokenizer) and not this package. --verify loads it back through transformers and compares logits.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # a plain checkout: the repository root on sys.path
    import _bootstrap  # noqa: F401

from scaleinv_dist.cli import ArgumentParser, die, existing_run_dir, run_cli  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--run", required=True, help="run directory (a training run's run.out_dir)")
    p.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the exported weights (training checkpoints are float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-bos", action="store_true",
                   help="the exported tokenizer does not prepend BOS (default: it does, as launch/generate.py)")
    p.add_argument("--verify", action="store_true",
                   help="load the folder with transformers and compare logits with this package's model")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_args(argv)


def verify(folder: Path, run_dir: Path, checkpoint, overrides) -> float:
    """Max |logit difference| between the exported folder (transformers, fp32) and our model."""
    import torch

    from scaleinv_dist.generate import load_model

    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        die("--verify needs transformers (pip install 'transformers>=5')")
    ours, cfg, _ = load_model(run_dir, checkpoint, device="cpu", dtype=torch.float32, overrides=overrides)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).float().eval()
    n = min(2 * cfg.train.seq_len, 512)
    tokens = torch.randint(0, ours.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(tokens, torch.arange(n)[None])
        b = hf(input_ids=tokens).logits.float()
    return (a - b).abs().max().item()


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


def run(args) -> int:
    from scaleinv_dist.export_hf import export_run

    run_dir = existing_run_dir(args.run)
    out = export_run(run_dir, args.out, checkpoint=args.checkpoint, dtype=args.dtype,
                     overwrite=args.overwrite, add_bos_token=not args.no_bos, overrides=args.overrides)
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"exported {run_dir} -> {out} ({size:.1f} MiB): {', '.join(files)}")
    if args.verify:
        diff = verify(out, run_dir, args.checkpoint, args.overrides)
        tol = 1e-4 if args.dtype == "float32" else 1e-1
        print(f"verify: max |logit difference| transformers vs scaleinv_dist = {diff:.2e} "
              f"({'ok' if diff <= tol else 'MISMATCH'})")
        if diff > tol:
            return 1
    print("load it with:\n"
          "  from transformers import AutoModelForCausalLM, AutoTokenizer\n"
          f"  model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
          f"  tok = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
