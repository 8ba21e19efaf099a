"""Attention kernels on one GPU: our fused Triton kernel against FlexAttention and SDPA.

    python benchmarks/attention.py [--quick] [--n 4096,16384,65536] [--d 128,64] [--out PATH]
                                   [--no-check] [--sweep]

Times, in bf16, causal, on one GPU in one run: ours with the scale-invariant transform ("ours-si"),
ours with transform="none" ("ours-off"), FlexAttention (compiled) with the same transform as a
score_mod ("flex-si", t = q_idx - kv_idx) and plain causal ("flex"), SDPA flash and SDPA cuDNN.
Forward alone and forward+backward are timed with triton.testing.do_bench (median); backward is
the difference. FLOPs: forward 4 B H N^2 D / 2 (causal), backward 2.5x forward. B x H: 4 x 16 at
N = 4k, 1 x 16 at 16k, 1 x 8 at 64k (other N: 16k/N x 16 up to 16k, else 1 x 8).

Before timing, ours (bf16, through the public API with autograd) is checked against the float64
reference (scaleinv_dist.attention_reference, on the GPU, B = 1, H = 2) at N up to 16k for every
head dim: relative error ||x - ref|| / ||ref|| <= 1e-2 for out, dq, dk, dv.

The table (with ratios ours-si / flex-si, ours-si / ours-off, ours-si / cuDNN) is printed, appended
with date, card, versions and the command line to benchmarks/RESULTS.md (or --out), and written to
$OUT/attention.md when the environment variable OUT is set; --plot (default $OUT/attention.png
when OUT is set) draws the TFLOP/s as bars. --sweep instead times a few tile
configurations (--fwd-configs, --bwd-configs) and Taylor degrees (--degrees) of our kernels alone
(written to $OUT/attention_sweep.md).
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from scaleinv_dist.kernels import flash_si, flash_si_hopper  # noqa: E402  (a source checkout works too)
from scaleinv_dist import attention_reference  # noqa: E402
from scaleinv_dist.attention import scale_invariant_attention  # noqa: E402

TAU = 10.0
CHECK_TOL = 1e-2
IMPLS = ("hopper-si", "hopper-off", "ours-si", "ours-off", "flex-si", "flex", "fa4", "fa4-flex",
         "fa4-flex-si", "sdpa-flash", "sdpa-cudnn")
SI_IMPLS = ("hopper-si", "ours-si")  # our scale-invariant kernels: the faster one is "ours"
PLAIN_IMPLS = ("fa4", "fa4-flex", "sdpa-cudnn", "sdpa-flash", "flex", "hopper-off", "ours-off")


def shape_for(n: int) -> tuple[int, int]:
    """(B, H) for sequence length n, as in the reference measurements."""
    return {4096: (4, 16), 16384: (1, 16), 65536: (1, 8)}.get(
        n, (max(1, 16384 // n), 16) if n <= 16384 else (1, 8))


def fwd_flops(b, h, n, d):
    return 4.0 * b * h * n * n * d / 2.0


def tflops(flops: float, ms: float, backward: bool = False) -> float:
    """TFLOP/s of a pass that took ms, given the forward's FLOP count (fwd_flops); the backward
    counts 2.5x the forward's FLOPs."""
    return (2.5 if backward else 1.0) * flops / ms / 1e9


# ----------------------------------------------------------------------------- implementations
def flex_fns(n, device, fa4: bool):
    """FlexAttention (Triton lowering) plain and with the transform; with fa4 also its FLASH
    (FlashAttention-4 CuTe DSL) lowering, plain and with the transform."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def si_score_mod(score, b, h, q_idx, kv_idx):
        # No clamp/log1p: torch 2.11's FLASH lowering has neither (where and log(1 + x) instead).
        d = q_idx - kv_idx
        t = torch.where(d > 0, d, 0).to(torch.float32)
        g = torch.log(1.0 + t / TAU)
        return torch.sqrt(1.0 + 2.0 * g) * score - 2.0 * g

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    torch._dynamo.reset()  # a fresh compile cache per shape: stale entries would hit the recompile
    torch._dynamo.config.recompile_limit = 64  # limit and fall back to the unfused (N^2) path
    mask = create_block_mask(causal, None, None, n, n, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    fns = {"flex-si": lambda q, k, v: compiled(q, k, v, score_mod=si_score_mod, block_mask=mask),
           "flex": lambda q, k, v: compiled(q, k, v, block_mask=mask)}
    if fa4:
        flash = {"BACKEND": "FLASH"}
        fns["fa4-flex"] = lambda q, k, v: compiled(q, k, v, block_mask=mask, kernel_options=flash)
        fns["fa4-flex-si"] = lambda q, k, v: compiled(q, k, v, score_mod=si_score_mod,
                                                      block_mask=mask, kernel_options=flash)
    return fns


def fa4_available() -> bool:
    return flash_si_hopper.IMPORT_ERROR is None


def make_impls(n, device, names):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    pos = torch.arange(n, device=device)

    def ours(transform, backend="triton"):
        return lambda q, k, v: scale_invariant_attention(q, k, v, pos, pos, tau=TAU,
                                                         transform=transform, backend=backend)

    def fa4_own(q, k, v):  # FlashAttention-4's own interface, (B, N, H, D)
        from flash_attn.cute import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)

    def sdpa_with(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return sdpa(q, k, v, is_causal=True)
        return run

    fa4 = fa4_available()
    impls = {"ours-si": ours("scale_invariant"), "ours-off": ours("none")}
    if fa4:
        impls.update({"hopper-si": ours("scale_invariant", "hopper"),
                      "hopper-off": ours("none", "hopper"), "fa4": fa4_own})
    if any(name.startswith("flex") or name.startswith("fa4-flex") for name in names):
        impls.update(flex_fns(n, device, fa4))
    impls.update({"sdpa-flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
                  "sdpa-cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION)})
    return {name: fn for name, fn in impls.items() if name in names}


# ----------------------------------------------------------------------------- correctness
def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def check_case(n, d, hq, hkv, q_pos, k_pos, device, seed, backend):
    """Relative errors (out, lse, dq, dk, dv) of `backend` (bf16, autograd) against the float64
    reference on the GPU."""
    g = torch.Generator(device=device).manual_seed(seed)
    nq, nk = q_pos.numel(), k_pos.numel()
    q = torch.randn(1, hq, nq, d, device=device, generator=g).bfloat16()
    k = torch.randn(1, hkv, nk, d, device=device, generator=g).bfloat16()
    v = torch.randn(1, hkv, nk, d, device=device, generator=g).bfloat16()
    do = torch.randn(1, hq, nq, d, device=device, generator=g).bfloat16()
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out, lse = scale_invariant_attention(*leaves, q_pos, k_pos, tau=TAU, backend=backend,
                                         return_lse=True)
    out.backward(do)
    opts = dict(scale=d ** -0.5, tau=TAU, causal=True, transform="scale_invariant")
    qp, kp = q_pos[None], k_pos[None]
    r_out, r_lse = attention_reference.forward(q.double(), k.double(), v.double(), qp, kp, **opts)
    r_grads = attention_reference.backward(do.double(), q.double(), k.double(), v.double(),
                                           r_out, r_lse, qp, kp, **opts)
    return ([rel_err(out, r_out), rel_err(lse, r_lse)]
            + [rel_err(x.grad, r) for x, r in zip(leaves, r_grads)])


def guarded(check, *args):
    """check(*args), or the one-line error it raised (a failing backend must not hide the others)."""
    try:
        return check(*args)
    except Exception as err:  # noqa: BLE001
        return f"failed: {type(err).__name__}: {str(err)[:200]}"


def run_checks(ns, dims, device):
    """Every SI backend of this machine against float64, beside FlexAttention's error on the same
    inputs (the bar: ours may be no worse than flex)."""
    backends = ["triton"] + (["hopper"] if fa4_available() else [])
    rows = []
    for d in dims:
        for n in ns:
            pos = torch.arange(n, device=device)
            for backend in backends + ["flex"]:
                rows.append((f"contiguous N={n}", backend, d,
                             guarded(check_case, n, d, 2, 2, pos, pos, device, n + d, backend)))
        n = min(ns)  # a zigzag shard with GQA: queries hold chunks 0 and 3 of 4
        chunks = torch.arange(n, device=device).view(4, n // 4)
        q_pos = torch.cat([chunks[0], chunks[3]])
        k_pos = torch.cat([chunks[2], chunks[0], chunks[3], chunks[1]])
        for backend in ("triton", "flex"):
            rows.append((f"zigzag GQA 4/2 Nq={n // 2} Nk={n}", backend, d,
                         guarded(check_case, n, d, 4, 2, q_pos, k_pos, device, 7 * d, backend)))
    lines = ["| check (bf16 vs float64, scale_invariant) | backend | D | out | lse | dq | dk | dv "
             "| ok |", "|---|---|---|---|---|---|---|---|---|"]
    ok_all = True
    flex = {(name, d): errs for name, backend, d, errs in rows
            if backend == "flex" and not isinstance(errs, str)}
    for name, backend, d, errs in rows:
        if isinstance(errs, str):  # the check raised: reported, and the run is not ok
            ok_all = False
            lines.append(f"| {name} | {backend} | {d} | {errs} | | | | | NO |")
            continue
        bar = flex.get((name, d), [CHECK_TOL] * 5)
        ok = all(e <= max(CHECK_TOL, 1.25 * f) for e, f in zip(errs, bar))
        ok_all &= ok
        lines.append(f"| {name} | {backend} | {d} | " + " | ".join(f"{e:.2e}" for e in errs)
                     + f" | {'yes' if ok else 'NO'} |")
    return lines, ok_all


# ----------------------------------------------------------------------------- timing
def bench(fn, q, k, v, do, rep):
    from triton.testing import do_bench

    with torch.no_grad():
        t_fwd = do_bench(lambda: fn(q, k, v), warmup=max(25, rep // 4), rep=rep,
                         return_mode="median")
    t_all = do_bench(lambda: fn(q, k, v).backward(do), warmup=max(25, rep // 4), rep=rep,
                     grad_to_none=[q, k, v], return_mode="median")
    return t_fwd, t_all - t_fwd


def run_timing(ns, dims, device, rep, names):
    results = {}
    for d in dims:
        for n in ns:
            b, h = shape_for(n)
            g = torch.Generator(device=device).manual_seed(n + d)
            q, k, v, do = (torch.randn(b, h, n, d, device=device, generator=g,
                                       dtype=torch.bfloat16) for _ in range(4))
            for x in (q, k, v):
                x.requires_grad_(True)
            for name, fn in make_impls(n, device, names).items():
                try:
                    results[(d, n, name)] = bench(fn, q, k, v, do, rep)
                except Exception as err:  # an unavailable backend is reported, not fatal
                    print(f"{name} D={d} N={n}: {type(err).__name__}: {str(err)[:200]}")
                    results[(d, n, name)] = None
                torch.cuda.empty_cache()
                print(f"timed {name} D={d} N={n}: {results[(d, n, name)]}", flush=True)
    return results


def fastest(results, d, n, names, i):
    """(name, ms) of the fastest of `names` for pass i (0 forward, 1 backward), or None."""
    timed = [(results[(d, n, m)][i], m) for m in names if results.get((d, n, m))]
    return min(timed)[::-1] if timed else None


def timing_table(results, ns, dims):
    lines = ["| D | N (BxH) | impl | fwd ms | bwd ms | fwd TFLOP/s | bwd TFLOP/s |",
             "|---|---|---|---|---|---|---|"]
    ratios = ["| D | N | our fastest SI fwd / bwd | fastest plain fwd / bwd | SI / fastest plain fwd | "
              "bwd | SI / flex-si fwd | bwd | SI / cuDNN fwd | bwd |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for d in dims:
        for n in ns:
            b, h = shape_for(n)
            flops = fwd_flops(b, h, n, d)
            for name in IMPLS:
                if (d, n, name) not in results:
                    continue
                r = results[(d, n, name)]
                if r is None:
                    lines.append(f"| {d} | {n} ({b}x{h}) | {name} | n/a | n/a | n/a | n/a |")
                    continue
                f_ms, b_ms = r
                lines.append(f"| {d} | {n} ({b}x{h}) | {name} | {f_ms:.3f} | {b_ms:.3f} | "
                             f"{tflops(flops, f_ms):.0f} | {tflops(flops, b_ms, backward=True):.0f} |")
            si = [fastest(results, d, n, SI_IMPLS, i) for i in (0, 1)]
            plain = [fastest(results, d, n, PLAIN_IMPLS, i) for i in (0, 1)]

            def ratio(other, i):
                a, o = si[i], results.get((d, n, other))
                return "n/a" if a is None or o is None else f"{o[i] / a[1]:.2f}"

            best = ["n/a" if s is None or p is None else f"{p[1] / s[1]:.2f}" for s, p in zip(si, plain)]
            who = " / ".join("n/a" if s is None else s[0] for s in si)
            wins = " / ".join("n/a" if p is None else p[0] for p in plain)
            ratios.append(f"| {d} | {n} | {who} | {wins} | {best[0]} | {best[1]} | "
                          + " | ".join(ratio(o, i) for o in ("flex-si", "sdpa-cudnn") for i in (0, 1))
                          + " |")
    return lines + [""] + ["Speed ratios (time of the other / time of our fastest SI kernel; higher "
                           "is better for ours):", ""] + ratios


def plot_timing(results, ns, dims, title: str, path: Path) -> Path:
    """TFLOP/s of each timed implementation as grouped bars per N: a row of panels per head dim,
    forward left, backward right; the scale-invariant ones (ours and the score_mod routes) hatched."""
    from scaleinv_dist.evaluate.plots import plt  # matplotlib, set up for files (Agg)

    names = [m for m in IMPLS if any(results.get((d, n, m)) for d in dims for n in ns)]
    fig, axes = plt.subplots(len(dims), 2, figsize=(11, 3.4 * len(dims)), squeeze=False)
    width = 0.8 / max(1, len(names))
    for row, d in zip(axes, dims):
        for i, (ax, direction) in enumerate(zip(row, ("forward", "backward"))):
            for j, name in enumerate(names):
                speed = []
                for n in ns:
                    r = results.get((d, n, name))
                    b, h = shape_for(n)
                    speed.append(tflops(fwd_flops(b, h, n, d), r[i], backward=i == 1) if r else 0.0)
                ax.bar([x + j * width for x in range(len(ns))], speed, width, label=name,
                       color=plt.get_cmap("tab20")(IMPLS.index(name) / 20),  # same colour in every plot
                       hatch="//" if name.endswith("-si") else None, edgecolor="black", linewidth=0.3)
            ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(ns))],
                          [f"{n // 1024}k" for n in ns])
            ax.set_xlabel("sequence length N")
            ax.set_ylabel("TFLOP/s")
            ax.set_title(f"D = {d}, {direction}", fontsize=10)
    axes[0][1].legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"causal attention, bf16 (hatched: scale-invariant): {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- sweep
SWEEP = {  # tried after the module's defaults; --fwd-configs / --bwd-configs replace them
    "fwd": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
    "bwd": [(64, 128, 128, 64, 8, 3), (32, 128, 128, 64, 8, 3), (64, 128, 64, 64, 8, 3),
            (64, 128, 128, 64, 8, 2), (32, 64, 64, 64, 4, 3), (64, 64, 64, 64, 4, 2)],
}


def run_sweep(n, d, device, rep, fwd_cfgs, bwd_cfgs, degrees):
    """Times our forward and backward kernels alone for tile configs and Taylor degrees."""
    from triton.testing import do_bench

    b, h = shape_for(n)
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v, do = (torch.randn(b, h, n, d, device=device, generator=g, dtype=torch.bfloat16)
                   for _ in range(4))
    pos = torch.arange(n, device=device).expand(b, n)
    flops = fwd_flops(b, h, n, d)
    base = (flash_si.FWD_CONFIGS[d], flash_si.BWD_CONFIGS[d], flash_si.POLY_DEGREE)
    lines = [f"Sweep at N={n} ({b}x{h}), D={d}: TFLOP/s of our kernels alone "
             f"(module defaults: fwd {base[0]}, bwd {base[1]}, degree {base[2]})",
             "", "| transform | pass | config | degree | TFLOP/s |", "|---|---|---|---|---|"]
    runs = [("fwd", cfg, base[2]) for cfg in fwd_cfgs] + [("bwd", cfg, base[2]) for cfg in bwd_cfgs]
    runs += [("both", None, deg) for deg in degrees if deg != base[2]]
    for which, cfg, deg in runs:
        if which == "fwd":
            flash_si.FWD_CONFIGS[d] = tuple(cfg)
        elif which == "bwd":
            flash_si.BWD_CONFIGS[d] = tuple(cfg)
        flash_si.POLY_DEGREE = deg
        for transform in ("scale_invariant", "none"):
            if which == "both" and transform == "none":
                continue
            opts = dict(scale=d ** -0.5, tau=TAU, causal=True, transform=transform)
            try:
                out, lse = flash_si.forward(q, k, v, pos, pos, **opts)
                cells = []
                if which in ("fwd", "both"):
                    t_f = do_bench(lambda: flash_si.forward(q, k, v, pos, pos, **opts), rep=rep,
                                   return_mode="median")
                    cells.append(f"fwd {tflops(flops, t_f):.0f}")
                if which in ("bwd", "both"):
                    t_b = do_bench(lambda: flash_si.backward(do, q, k, v, out, lse, pos, pos,
                                                             **opts), rep=rep, return_mode="median")
                    cells.append(f"bwd {tflops(flops, t_b, backward=True):.0f}")
                cell = ", ".join(cells)
            except Exception as err:
                cell = f"failed: {type(err).__name__} {str(err)[:80]}"
            lines.append(f"| {transform} | {which} | {cfg or ''} | {deg} | {cell} |")
            print(lines[-1], flush=True)
        flash_si.FWD_CONFIGS[d], flash_si.BWD_CONFIGS[d], flash_si.POLY_DEGREE = base
    return lines


def kernel_stats():
    """Registers / spills / shared memory of every compiled variant of our two main kernels."""
    lines = []
    for fn in (flash_si._fwd_kernel, flash_si._bwd_kernel):
        for entry in getattr(fn, "device_caches", {}).values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for kern in cache.values():
                md = getattr(kern, "metadata", None)
                stats = [("regs", kern, "n_regs"), ("spills", kern, "n_spills"),
                         ("warps", md, "num_warps"), ("stages", md, "num_stages"),
                         ("shared", md, "shared")]
                lines.append(f"- {fn.__name__}: " + ", ".join(
                    f"{name} {getattr(obj, attr, '?')}" for name, obj, attr in stats))
    return lines


# ----------------------------------------------------------------------------- results file
def results_header(argv=None) -> str:
    """Markdown heading with date, card and versions, and the command line that ran."""
    import triton

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv or sys.argv[1:]))
    command = flash_si_hopper.variant_env_prefix() + command
    return (f"## {datetime.datetime.now():%Y-%m-%d %H:%M} — {torch.cuda.get_device_name()}, "
            f"torch {torch.__version__}, triton {triton.__version__}\n\nCommand: `{command}`\n")


def append_results(out: Path, text: str) -> None:
    """Append one section to the results file (created with a title if missing)."""
    if not out.exists():
        out.write_text("# Attention benchmark results\n\nAppended by `benchmarks/attention.py` "
                       "(see its docstring for the method). Newest last.\n\n")
    with out.open("a") as f:
        f.write(text + "\n")


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 4096 and 16384, D = 128, short reps")
    ap.add_argument("--n", default="4096,16384,65536", help="comma-separated sequence lengths")
    ap.add_argument("--d", default="128,64", help="comma-separated head dims")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"),
                    help="markdown file the results are appended to")
    ap.add_argument("--no-check", action="store_true", help="skip the float64 correctness check")
    ap.add_argument("--plot", default=None, metavar="PNG",
                    help="also draw the TFLOP/s as bars per N and D (default: $OUT/attention.png when "
                         "$OUT is set, else none)")
    ap.add_argument("--sweep", action="store_true",
                    help="time tile configs / Taylor degrees of our kernels at the first N, each D")
    ap.add_argument("--fwd-configs", default=None,
                    help="sweep: JSON list of (BLOCK_M, BLOCK_N, warps, stages)")
    ap.add_argument("--bwd-configs", default=None,
                    help="sweep: JSON list of (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, warps, stages)")
    ap.add_argument("--degrees", default="1,2,3", help="sweep: Taylor degrees to try")
    ap.add_argument("--impls", default=",".join(IMPLS),
                    help=f"comma-separated implementations to time (default all: {','.join(IMPLS)})")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU")
    ns = [int(x) for x in args.n.split(",")]
    dims = [int(x) for x in args.d.split(",")]
    rep = 100
    if args.quick:
        ns, dims, rep = [n for n in ns if n <= 16384] or [4096], dims[:1], 50
    device = torch.device("cuda")
    head = results_header(argv)
    out_dir = os.environ.get("OUT")
    if args.sweep:
        import json

        fwd_cfgs = json.loads(args.fwd_configs) if args.fwd_configs else SWEEP["fwd"]
        bwd_cfgs = json.loads(args.bwd_configs) if args.bwd_configs else SWEEP["bwd"]
        degrees = [int(x) for x in args.degrees.split(",") if x]
        lines = []
        for d in dims:
            lines += run_sweep(ns[0], d, device, rep, fwd_cfgs, bwd_cfgs, degrees) + [""]
        lines += kernel_stats()
        text = head + "\n" + "\n".join(lines) + "\n"
        print(text)
        if out_dir:
            Path(out_dir, "attention_sweep.md").write_text(text)
        return 0
    sections = [head]
    ok = True
    if not args.no_check:
        check_lines, ok = run_checks([n for n in ns if n <= 16384] or [4096], dims, device)
        sections.append("\n".join(check_lines) + "\n")
        print(sections[-1], flush=True)
    names = [x for x in args.impls.split(",") if x]
    unknown = sorted(set(names) - set(IMPLS))
    if unknown:
        sys.exit(f"unknown --impls {unknown}; choose from {','.join(IMPLS)}")
    results = run_timing(ns, dims, device, rep, names)
    sections.append("\n".join(timing_table(results, ns, dims)) + "\n")
    text = "\n".join(sections)
    print(text)
    append_results(Path(args.out), text)
    if out_dir:
        Path(out_dir, "attention.md").write_text(text)
    plot = args.plot or (str(Path(out_dir, "attention.png")) if out_dir else None)
    if plot:
        card = f"{torch.cuda.get_device_name()}, {datetime.date.today()}"
        print(f"wrote {plot_timing(results, ns, dims, card, Path(plot))}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
