"""The cost of padded head dims: our fused kernel at D = 48 ... 256 on one GPU.

    python benchmarks/head_dims.py [--n 8192] [--d 48,64,80,96,128,192,256] [--out PATH]

Head dims that are not a power of two run on tiles of the next power of two (BLOCK_D), with the
padding columns masked. For each D this times our forward and backward kernels alone (bf16,
causal, scale_invariant, triton.testing.do_bench median; B x H as benchmarks/attention.py) and
reports TFLOP/s counted at the real D (useful work) and at the padded BLOCK_D (work the tensor
cores do). "useful / padded" = D / BLOCK_D is the share of the matrix work that is not padding;
"time vs BLOCK_D" compares with the unpadded kernel of the same tile width when it is in --d.
The table is printed and appended with date, card and command to benchmarks/RESULTS.md (--out).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from attention import TAU, append_results, fwd_flops, results_header, shape_for, tflops  # noqa: E402

from scaleinv_dist.kernels import flash_si  # noqa: E402


def time_dim(n: int, d: int, rep: int) -> tuple[float, float]:
    """(forward ms, backward ms) of our kernels at sequence length n and head dim d."""
    from triton.testing import do_bench

    b, h = shape_for(n)
    g = torch.Generator(device="cuda").manual_seed(d)
    q, k, v, do = (torch.randn(b, h, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
                   for _ in range(4))
    pos = torch.arange(n, device="cuda").expand(b, n)
    opts = dict(scale=d ** -0.5, tau=TAU, causal=True, transform="scale_invariant")
    out, lse = flash_si.forward(q, k, v, pos, pos, **opts)
    t_f = do_bench(lambda: flash_si.forward(q, k, v, pos, pos, **opts), rep=rep,
                   return_mode="median")
    t_b = do_bench(lambda: flash_si.backward(do, q, k, v, out, lse, pos, pos, **opts), rep=rep,
                   return_mode="median")
    return t_f, t_b


def table(n: int, times: dict[int, tuple[float, float]]) -> list[str]:
    b, h = shape_for(n)
    lines = [f"Padded head dims at N={n} ({b}x{h}), bf16, causal, scale_invariant; TFLOP/s "
             f"counted at the real D / at the padded BLOCK_D", "",
             "| D | BLOCK_D | useful / padded | fwd ms | bwd ms | fwd TFLOP/s (D / BLOCK_D) | "
             "bwd TFLOP/s (D / BLOCK_D) | time vs BLOCK_D (fwd / bwd) |",
             "|---|---|---|---|---|---|---|---|"]
    for d, (t_f, t_b) in times.items():
        bd = flash_si.block_d(d)
        f_real, f_pad = fwd_flops(b, h, n, d), fwd_flops(b, h, n, bd)
        base = times.get(bd)
        vs = "-" if base is None or bd == d else f"{t_f / base[0]:.2f} / {t_b / base[1]:.2f}"
        lines.append(f"| {d} | {bd} | {d / bd:.2f} | {t_f:.3f} | {t_b:.3f} | "
                     f"{tflops(f_real, t_f):.0f} / {tflops(f_pad, t_f):.0f} | "
                     f"{tflops(f_real, t_b, backward=True):.0f} / {tflops(f_pad, t_b, backward=True):.0f} | {vs} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8192, help="sequence length")
    ap.add_argument("--d", default="48,64,80,96,128,192,256", help="comma-separated head dims")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"),
                    help="markdown file the results are appended to")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/head_dims.py needs a CUDA GPU")
    times = {}
    for d in (int(x) for x in args.d.split(",")):
        times[d] = time_dim(args.n, d, args.rep)
        print(f"D={d}: fwd {times[d][0]:.3f} ms, bwd {times[d][1]:.3f} ms", flush=True)
    text = results_header(argv) + "\n" + "\n".join(table(args.n, times)) + "\n"
    print(text)
    append_results(Path(args.out), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
