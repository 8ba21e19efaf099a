"""Which unit binds the Hopper kernels: hardware pipe utilisation read with Nsight Compute.

    python benchmarks/hopper_pipes.py [--n 16384] [--d 128] [--variants plain,mufu,tile]
    python benchmarks/hopper_pipes.py --stalls      # why warps wait, instead of pipe use

For FA4's SM90 forward and backward, plain (no score_mod) and with each named variant of our
transform (kernels/flash_si_hopper.py), one bf16 causal call of each under `ncu` (Nsight Compute):
per kernel, the share of its peak that the special-function pipe (XU, the MUFU), the FMA pipes,
the integer/logic pipe (ALU) and the tensor-core pipe (GMMA) were busy, and the issue slots used,
all as % of peak over the cycles the SMs were active. ncu fixes the clocks at base while it
measures, so durations are longer than in benchmarks/attention.py; the shares are what to read.
With --stalls: for each forward kernel, the cycles its warps spent stalled per issued instruction,
by reason (ncu's warp-state sampling), which tells a latency limit from a throughput one.
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
STALL_PREFIX, STALL_SUFFIX = "smsp__average_warps_issue_stalled_", "_per_issue_active"
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


def available(ncu: str, stalls: bool = False) -> dict[str, str]:
    """{column: metric} of the PIPES (or, with stalls, every stall reason) this GPU's ncu knows (a
    name it lacks would fail the whole measurement)."""
    listed = subprocess.run([ncu, "--query-metrics"], capture_output=True, text=True).stdout
    names = {line.split()[0] for line in listed.splitlines() if line.strip()}
    if stalls:
        return {n[len(STALL_PREFIX):-len(STALL_SUFFIX)]: n + ".ratio" for n in sorted(names)
                if n.startswith(STALL_PREFIX) and n.endswith(STALL_SUFFIX)}
    return {col: base + PCT for col, base in PIPES.items() if base in names}


def kernel_label(name: str) -> str:
    """A short name for one of FA4's kernels (its generated names are hundreds of characters)."""
    low = name.lower()
    for key, label in (("preprocess", "bwd pre"), ("postprocess", "bwd post"), ("convert", "bwd post"),
                       ("backward", "bwd"), ("bwd", "bwd"), ("forward", "fwd"), ("fwd", "fwd")):
        if key in low:
            return label
    return name[:30]


def measure(ncu: str, variant: str, n: int, d: int, metrics: dict[str, str]) -> list[dict]:
    """Rows {kernel, ms, <column>: value} of the variant's profiled kernels (one ncu run)."""
    cmd = [ncu, "--profile-from-start", "off", "--csv", "--metrics",
           ",".join(list(metrics.values()) + [DURATION]),
           sys.executable, __file__, "--worker", variant, "--n", str(n), "--d", str(d)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    rows = parse_ncu_csv(proc.stdout, metrics)
    if proc.returncode != 0 or not rows:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"ncu failed for {variant}: {' | '.join(tail)}")
    return rows


MS_PER_UNIT = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0,
               "second": 1e3, "s": 1e3}


def parse_ncu_csv(text: str, metrics: dict[str, str]) -> list[dict]:
    """ncu --csv output (one line per kernel and metric, mixed with the program's own output) ->
    one row per kernel in launch order: {kernel: short label, ms, <column>: value}."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    kernels: dict[str, dict] = {}
    for rec in csv.DictReader(lines):
        row = kernels.setdefault(rec["ID"], {"kernel": kernel_label(rec["Kernel Name"])})
        value = float(rec["Metric Value"].replace(",", ""))
        if rec["Metric Name"] == DURATION:
            row["ms"] = value * MS_PER_UNIT[rec["Metric Unit"]]
        for col, metric in metrics.items():
            if rec["Metric Name"] == metric:
                row[col] = value
    return list(kernels.values())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--variants", default="plain,mufu,tile", help="plain and/or transform variants")
    ap.add_argument("--stalls", action="store_true",
                    help="stall reasons of the forward kernels (cycles per issued instruction)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.n, args.d)
        return
    from attention import append_results, results_header

    ncu = find_ncu()
    metrics = available(ncu, args.stalls)
    variants = args.variants.split(",")
    results = {}
    for variant in variants:
        try:
            results[variant] = measure(ncu, variant, args.n, args.d, metrics)
        except RuntimeError as e:
            results[variant] = [{"kernel": f"failed: {e}"[:200]}]
    text = (stall_table if args.stalls else pipe_table)(results, list(metrics), args.n, args.d)
    print(text, flush=True)
    append_results(Path(args.out), results_header(argv) + "\n" + text + "\n")


def pipe_table(results: dict, cols: list[str], n: int, d: int) -> str:
    """One row per (variant, kernel): duration and % of peak per pipe."""
    lines = [f"Nsight Compute pipe use, % of peak over active cycles, N = {n}, D = {d}, bf16, causal "
             "(ncu fixes clocks at base: durations are not comparable with other tables)",
             "", "| variant | kernel | ms | " + " | ".join(cols) + " |", "|" + "---|" * (3 + len(cols))]
    for variant, rows in results.items():
        for r in rows:
            lines.append(f"| {variant} | {r['kernel']} | {r.get('ms', float('nan')):.2f} | "
                         + " | ".join(f"{r[c]:.1f}" if c in r else "" for c in cols) + " |")
    return "\n".join(lines)


def stall_table(results: dict, reasons: list[str], n: int, d: int) -> str:
    """One row per stall reason (those at >= 0.05 cycles per instruction somewhere), one column per
    variant's forward kernel."""
    fwd = {v: next((r for r in rows if r["kernel"] == "fwd"), rows[0]) for v, rows in results.items()}
    shown = [c for c in reasons if any(r.get(c, 0.0) >= 0.05 for r in fwd.values())]
    lines = [f"Nsight Compute warp stalls of the forward, cycles per issued instruction, N = {n}, "
             f"D = {d}, bf16, causal (all warps: producer, both consumer warpgroups)", "",
             "| stall reason | " + " | ".join(fwd) + " |", "|" + "---|" * (1 + len(fwd))]
    lines.append("| (kernel ms) | " + " | ".join(f"{r.get('ms', float('nan')):.2f}" for r in fwd.values()) + " |")
    for c in sorted(shown, key=lambda c: -max(r.get(c, 0.0) for r in fwd.values())):
        lines.append(f"| {c} | " + " | ".join(f"{r[c]:.2f}" if c in r else "" for r in fwd.values()) + " |")
    if any("failed" in r["kernel"] for r in fwd.values()):
        lines += [""] + [f"{v}: {r['kernel']}" for v, r in fwd.items() if "failed" in r["kernel"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
