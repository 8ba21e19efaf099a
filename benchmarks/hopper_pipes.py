"""Which unit binds the Hopper kernels: hardware pipe utilisation read with Nsight Compute.

    python benchmarks/hopper_pipes.py [--n 16384] [--d 128] [--variants plain,mufu,tile]

For FA4's SM90 forward and backward, plain (no score_mod) and with each named variant of our
transform (kernels/flash_si_hopper.py), one bf16 causal call of each under `ncu` (Nsight Compute):
per kernel, the share of its peak that the special-function pipe (XU, the MUFU), the FMA pipes,
the integer/logic pipe (ALU) and the tensor-core pipe (GMMA) were busy, and the issue slots used,
all as % of peak over the cycles the SMs were active. ncu fixes the clocks at base while it
measures, so durations are longer than in benchmarks/attention.py; the shares are what to read.
The table is printed and appended with date, card and command to benchmarks/RESULTS.md (--out).
"""
from __future__ import annotations

import argparse
import csv
import glob
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# column -> ncu metric base name; each is read as <base>.avg.pct_of_peak_sustained_active
PIPES = {
    "XU (MUFU)": "sm__inst_executed_pipe_xu",
    "FMA": "sm__pipe_fma_cycles_active",
    "FMA heavy": "sm__pipe_fmaheavy_cycles_active",
    "ALU": "sm__pipe_alu_cycles_active",
    "tensor (GMMA)": "sm__pipe_tensor_op_gmma_cycles_active",
    "issue slots": "sm__inst_issued",
}
PCT = ".avg.pct_of_peak_sustained_active"
DURATION = "gpu__time_duration.sum"


def find_ncu() -> str:
    """Path of ncu: on PATH, else the newest under /opt/nvidia or /usr/local/cuda."""
    found = shutil.which("ncu") or next(iter(sorted(
        glob.glob("/opt/nvidia/nsight-compute/*/ncu") + glob.glob("/usr/local/cuda*/bin/ncu"),
        reverse=True)), None)
    if found is None:
        print("ncu (Nsight Compute) not found: install it or put it on PATH", file=sys.stderr)
        sys.exit(2)
    return found


def worker(variant: str, n: int, d: int) -> None:
    """One forward and one backward of the variant inside a profiled window (after warm-up)."""
    import torch

    from attention import TAU, shape_for
    from scaleinv_dist.kernels import flash_si_hopper as hopper

    b, h = shape_for(n)
    q, k, v, do = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    transform = "none" if variant == "plain" else "scale_invariant"
    if variant != "plain":
        hopper.VARIANT = variant
    opts = dict(scale=d ** -0.5, tau=TAU, causal=True, transform=transform)
    for profiled in (False, False, True):
        if profiled:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
        out, lse = hopper.forward(q, k, v, **opts)
        hopper.backward(do, q, k, v, out, lse, **opts)
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def available(ncu: str) -> dict[str, str]:
    """The PIPES this GPU's ncu knows (a name it lacks would fail the whole measurement)."""
    listed = subprocess.run([ncu, "--query-metrics"], capture_output=True, text=True).stdout
    names = {line.split()[0] for line in listed.splitlines() if line.strip()}
    return {col: base for col, base in PIPES.items() if base in names}


def kernel_label(name: str) -> str:
    """A short name for one of FA4's kernels (its generated names are hundreds of characters)."""
    low = name.lower()
    for key, label in (("preprocess", "bwd pre"), ("postprocess", "bwd post"), ("convert", "bwd post"),
                       ("backward", "bwd"), ("bwd", "bwd"), ("forward", "fwd"), ("fwd", "fwd")):
        if key in low:
            return label
    return name[:30]


def measure(ncu: str, variant: str, n: int, d: int, pipes: dict[str, str]) -> list[dict]:
    """Rows {kernel, duration ms, <column>: %} of the variant's profiled kernels."""
    metrics = [base + PCT for base in pipes.values()] + [DURATION]
    cmd = [ncu, "--profile-from-start", "off", "--csv", "--metrics", ",".join(metrics),
           sys.executable, __file__, "--worker", variant, "--n", str(n), "--d", str(d)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('"')]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"ncu failed for {variant}: {' | '.join(tail)}")
    kernels: dict[str, dict] = {}
    for rec in csv.DictReader(lines):
        row = kernels.setdefault(rec["ID"], {"kernel": kernel_label(rec["Kernel Name"])})
        value = float(rec["Metric Value"].replace(",", ""))
        if rec["Metric Name"] == DURATION:
            row["ms"] = value / (1e6 if rec["Metric Unit"] == "ns" else 1e3 if rec["Metric Unit"] == "us" else 1)
        for col, base in pipes.items():
            if rec["Metric Name"] == base + PCT:
                row[col] = value
    return list(kernels.values())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--variants", default="plain,mufu,tile", help="plain and/or transform variants")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.n, args.d)
        return
    from attention import append_results, results_header

    ncu = find_ncu()
    pipes = available(ncu)
    cols = list(pipes)
    lines = [f"Nsight Compute pipe use, % of peak over active cycles, N = {args.n}, D = {args.d}, "
             "bf16, causal (ncu fixes clocks at base: durations are not comparable with other tables)",
             "", "| variant | kernel | ms | " + " | ".join(cols) + " |", "|" + "---|" * (3 + len(cols))]
    print("\n".join(lines), flush=True)
    for variant in args.variants.split(","):
        try:
            rows = measure(ncu, variant, args.n, args.d, pipes)
        except RuntimeError as e:
            rows = [{"kernel": f"failed: {e}"[:200]}]
        for r in rows:
            lines.append(f"| {variant} | {r['kernel']} | {r.get('ms', float('nan')):.2f} | "
                         + " | ".join(f"{r[c]:.1f}" if c in r else "" for c in cols) + " |")
            print(lines[-1], flush=True)
    append_results(Path(args.out), results_header(argv) + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
