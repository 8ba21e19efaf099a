"""What the scale-invariant transform costs inside FlashAttention-4's Hopper kernels, per variant.

    python benchmarks/hopper_variants.py [--n 16384,65536] [--d 128,64] [--variants mufu,swlog,...]

For each head dim and length, in bf16, causal, on one sm90 GPU in one run: FA4's SM90 forward and
backward plain (no score_mod) and with each variant of our transform (kernels/flash_si_hopper.py:
which of log2 and sqrt run on the special-function unit and which in FMA software), called
directly (no autograd). Each variant is first checked against the float64 reference at N = 8192
(relative error of out, lse, dq, dk, dv). The table gives TFLOP/s (same FLOP count as
benchmarks/attention.py) and each variant's speed as a fraction of plain FA4, and the extra time
per score element in picoseconds. Appended to benchmarks/RESULTS.md with date, card and command.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from attention import (TAU, append_results, check_case, fwd_flops, guarded,  # noqa: E402
                       results_header, shape_for, tflops)
from scaleinv_dist.kernels import flash_si_hopper as hopper  # noqa: E402


def run(variant, transform, q, k, v, do, rep):
    """(forward ms, backward ms) of FA4's kernels with the variant, called directly."""
    from triton.testing import do_bench

    hopper.VARIANT = variant
    opts = dict(scale=q.shape[-1] ** -0.5, tau=TAU, causal=True, transform=transform)
    out, lse = hopper.forward(q, k, v, **opts)
    hopper.backward(do, q, k, v, out, lse, **opts)  # compiled before timing
    t_f = do_bench(lambda: hopper.forward(q, k, v, **opts), rep=rep, return_mode="median")
    t_b = do_bench(lambda: hopper.backward(do, q, k, v, out, lse, **opts), rep=rep,
                   return_mode="median")
    return t_f, t_b


def check(variant, d, device):
    """Relative errors (out, lse, dq, dk, dv) of the variant against float64 at N = 8192 (long
    enough for tile_lin's degree-1 tiles, distance >= 4054)."""
    hopper.VARIANT = variant
    pos = torch.arange(8192, device=device)
    return check_case(8192, d, 2, 2, pos, pos, device, d, "hopper")


def fwd_tile_options(spec: str) -> dict:
    """'128x176/rs/ol' -> FA4 forward options (tile_mn; rs|ss: P@V from registers or shared
    memory; ol|nool: intra-warpgroup overlap); '' -> {} (FA4's own choice)."""
    if not spec:
        return {}
    tile, *flags = spec.split("/")
    m, n = (int(x) for x in tile.split("x"))
    opts = {"tile_mn": (m, n)}
    for f in flags:
        if f not in ("rs", "ss", "ol", "nool"):
            raise SystemExit(f"--fwd-tiles: unknown flag {f!r} in {spec!r}; use rs|ss and ol|nool")
        opts["mma_pv_is_rs" if f in ("rs", "ss") else "intra_wg_overlap"] = f in ("rs", "ol")
    return opts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", default="16384,65536")
    ap.add_argument("--d", default="128,64")
    ap.add_argument("--variants", default=",".join(hopper.VARIANTS))
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    ap.add_argument("--fwd-tiles", default="",
                    help="comma list of forward tile options for the variants, e.g. "
                         "128x128/rs/ol,128x176/rs/ol ('' = FA4's own choice; plain FA4 keeps it)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = ap.parse_args(argv)
    if hopper.IMPORT_ERROR is not None or not torch.cuda.is_available():
        sys.exit(f"benchmarks/hopper_variants.py needs an sm90 GPU and flash-attn-4 "
                 f"({hopper.IMPORT_ERROR or 'no CUDA'})")
    device = torch.device("cuda")
    ns, dims = [int(x) for x in args.n.split(",")], [int(x) for x in args.d.split(",")]
    tiles = args.fwd_tiles.split(",")
    variants = [(x, t) for x in args.variants.split(",") if x for t in tiles]

    def label(variant, tile):
        return f"{variant} [{tile}]" if tile else variant
    lines = ["| D | variant | out | lse | dq | dk | dv |", "|---|---|---|---|---|---|---|"]
    for d in dims:
        for variant, tile in variants:
            hopper.FWD_TILE_OPTIONS = fwd_tile_options(tile)
            errs = guarded(check, variant, d, device)  # a failing variant must not hide the others
            errs = f"{errs} | | | |" if isinstance(errs, str) else " | ".join(f"{e:.2e}" for e in errs)
            lines.append(f"| {d} | {label(variant, tile)} | {errs} |")
            print(lines[-1], flush=True)
    lines += ["", "| D | N (BxH) | kernel | fwd TFLOP/s | bwd TFLOP/s | fwd / plain | bwd / plain "
              "| extra fwd ps/elem | extra bwd ps/elem |", "|---|---|---|---|---|---|---|---|---|"]
    for d in dims:
        for n in ns:
            b, h = shape_for(n)
            g = torch.Generator(device=device).manual_seed(n + d)
            q, k, v, do = (torch.randn(b, h, n, d, device=device, generator=g, dtype=torch.bfloat16)
                           for _ in range(4))
            flops, elems = fwd_flops(b, h, n, d), b * h * n * n / 2
            hopper.FWD_TILE_OPTIONS = {}
            plain = run("mufu", "none", q, k, v, do, args.rep)
            for name, vname, tile in [("fa4 plain", None, "")] + [(f"si {label(x, t)}", x, t)
                                                                  for x, t in variants]:
                hopper.FWD_TILE_OPTIONS = fwd_tile_options(tile)
                times = plain if vname is None else guarded(run, vname, "scale_invariant", q, k, v,
                                                            do, args.rep)
                if isinstance(times, str):
                    lines.append(f"| {d} | {n} ({b}x{h}) | {name} | {times} | | | | | |")
                    print(lines[-1], flush=True)
                    continue
                t_f, t_b = times
                lines.append(
                    f"| {d} | {n} ({b}x{h}) | {name} | {tflops(flops, t_f):.0f} | "
                    f"{tflops(flops, t_b, backward=True):.0f} | {plain[0] / t_f:.3f} | {plain[1] / t_b:.3f} | "
                    f"{(t_f - plain[0]) * 1e9 / elems:.3f} | {(t_b - plain[1]) * 1e9 / elems:.3f} |")
                print(lines[-1], flush=True)
    text = results_header(argv) + "\nHopper transform variants (benchmarks/hopper_variants.py)\n\n" \
        + "\n".join(lines) + "\n"
    print(text)
    append_results(Path(args.out), text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "hopper_variants.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
