"""Training-step throughput, MFU, peak memory and where the step time goes, at long sequence lengths.

    python benchmarks/train_throughput.py --config configs/paper-162m.yaml --lengths 4096,16384,65536
    python benchmarks/train_throughput.py --lengths 16384,65536 --impls ours,sdpa-rope --compile on,off \
        --ckpt 16384:none,16384:selective,65536:selective,65536:full --out /tmp/tt
    torchrun --nproc_per_node 4 benchmarks/train_throughput.py --lengths 262144 --cp-strategy zigzag
    python benchmarks/train_throughput.py --smoke          # seconds, CPU or GPU: does the script run?

Per length it times a full training step (forward, backward, AdamW) of max(1, 65536 // length)
sequences (--tokens-per-step; one sequence split over the GPUs with --cp-strategy), bf16 autocast,
with three attention implementations in the same run:
  ours       scale-invariant p-RoPE through the fused Triton kernel (or the config's backend)
  ours-hopper  the same through FlashAttention-4's Hopper kernels with our transform (backend hopper)
  flex-si    the same model with FlexAttention + the scale-invariant score_mod (the paper's route)
  sdpa-rope  RoPE, no transform, torch SDPA cuDNN (the cost floor)
each with the blocks compiled or not (--compile on|off|on,off; scaleinv_dist.model.compile_model,
Inductor) and each activation-checkpointing mode --ckpt names for that length. Memory recipe:
activation checkpointing (--ckpt none|selective|full|offload; the --longest probes use
--probe-ckpt, default offload), the fused chunked linear cross-entropy, bf16 autocast, fused AdamW.
MFU = flops_per_token x tokens/s / peak, flops_per_token = 6 x non-embedding parameters
+ 7 x layers x seq_len x heads x head_dim (causal attention, forward 4 N^2 H D / 2 and backward
2.5x forward). With torchrun and --cp-strategy the sequence is split over the GPUs by
scaleinv_dist.parallel (ours only). "--longest" probes increasing lengths until a step fails (out of
memory) or would exceed --max-step-seconds.

The split: after the timed steps one more step runs under torch.profiler with the attention call
wrapped in ranges (its forward directly; its backward between two identity autograd markers), so
attention forward + backward vs the rest comes out of the profile whatever the kernels are called.
--out also gets step_split.png: the split as one stacked bar per profiled row, with its MFU.
The top kernels by self time of each profiled step go to --out/top_kernels_<impl>_<len>_<ckpt>_<compiled|eager>.txt
(on CUDA followed by the top host-side ops); the split also gives the step's idle GPU time and the
graphs torch.compile built during it. A profiled step that built a graph (a recompile the profiler's
markers can trigger) measured the compiler, not the step: it is profiled again, its guard failures
are printed, and the split comes from the repeat.
The kernel column names the attention backend each row's model ran (for `ours`, what the config's
backend resolved to: a fallback from `hopper` to `triton` shows, and is printed when the first
attention call starts); --probe-impl ours-hopper makes the --longest probes fail instead.
Prints the tables; appends them with date, card and command to benchmarks/RESULTS.md (--results).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaleinv_dist.config import load_config  # noqa: E402
from scaleinv_dist.device import prefer_expandable_segments  # noqa: E402
from scaleinv_dist.kernels.flash_si_hopper import variant_env_prefix  # noqa: E402
from scaleinv_dist.model import build_model, compile_model  # noqa: E402

import memory_peak  # noqa: E402  (beside this script)

CKPT_MODES = ("none", "selective", "full", "offload")
SMOKE_OVERRIDES = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.n_kv_head=2"]


def peak_tflops(device: torch.device) -> float:
    """Dense bf16 peak of this GPU in TFLOP/s (the training loop's table), NaN when unknown."""
    from scaleinv_dist.train.metrics import peak_flops

    peak = peak_flops(device, bf16=True) if device.type == "cuda" else None
    return float("nan") if peak is None else peak / 1e12


def sdpa_cudnn_attend(q, k, v, q_pos, k_pos, q_seg, k_seg):
    """RoPE baseline's attention: torch SDPA, cuDNN (else flash) on CUDA; the math kernel on CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = k.shape[1] != q.shape[1]
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


def parse_ckpt(spec: str, lengths: list[int]) -> dict[int, list[str]]:
    """'selective' | 'none,selective' | '4096:none,65536:full' -> {length: [modes]}.

    An entry without a length applies to every length that has no entry of its own."""
    per, every = {}, []
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        length, _, mode = entry.rpartition(":")
        if mode not in CKPT_MODES or (length and not length.isdigit()):
            usage_error(f"--ckpt entry {entry!r} must be MODE or LENGTH:MODE with MODE one of "
                        f"{', '.join(CKPT_MODES)} (e.g. --ckpt 16384:selective,65536:full)")
        if length:
            per.setdefault(int(length), []).append(mode)
        else:
            every.append(mode)
    return {n: per.get(n, every) or ["selective"] for n in lengths}


def usage_error(message: str) -> None:
    """A user mistake: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def build(cfg, impl: str, vocab: int, ckpt: str, compiled: bool, device: torch.device):
    overrides = {"ours": {}, "ours-hopper": {"backend": "hopper"}, "flex-si": {"backend": "flex"}, "sdpa-rope": {"position": "rope", "transform": "none"}}
    for k, v in overrides[impl].items():
        setattr(cfg.attention, k, v)
    cfg.train.activation_checkpointing = ckpt
    model = build_model(cfg, vocab_size=vocab).to(device)
    if impl == "sdpa-rope":
        model.attend = sdpa_cudnn_attend
    if compiled:  # Inductor on CUDA; on CPU (smoke runs) AOTAutograd without code generation
        torch._dynamo.reset()  # a fresh cache per model: no recompile limit across rows
        compile_model(model, "inductor" if device.type == "cuda" else "aot_eager")
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_batch(batch: int, seq_len: int, vocab: int, device: torch.device, cp=None):
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq_len), device=device, generator=gen)
    positions = torch.arange(seq_len, device=device)[None].expand(batch, -1)
    labels = torch.roll(tokens, -1, 1)
    if cp is not None:
        tokens, labels, positions = cp(tokens, labels, positions)
    return tokens, positions, labels


def train_step(model, opt, tokens, positions, labels, progress=None) -> None:
    """One optimizer step; progress(phase), if given, is called after the forward and the backward."""
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16):
        loss_sum, n = model(tokens, positions, labels=labels)
    if progress:
        progress("forward")
    (loss_sum / n).backward()
    if progress:
        progress("backward")
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_time(model, opt, batch: int, seq_len: int, vocab: int, repeats: int, device: torch.device,
              cp=None) -> tuple[float, float]:
    """(median seconds per training step, peak GiB (NaN on CPU)) for batch sequences of seq_len.

    The first step (compilation, autotuning) is not timed unless repeats is 0: then the one step
    taken is the figure (the longest-sequence probe, where a step can take minutes), and the time
    and peak memory at the end of its forward and backward are printed to stderr as it goes.
    """
    tokens, positions, labels = make_batch(batch, seq_len, vocab, device, cp)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def progress(phase: str) -> None:
        sync(device)
        peak = (f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda"
                else "")
        print(f"  {seq_len} tokens: {phase} done at {time.perf_counter() - t0:.1f} s{peak}",
              file=sys.stderr, flush=True)

    for i in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        train_step(model, opt, tokens, positions, labels, None if repeats else progress)
        sync(device)
        if i or not repeats:  # the first step compiles / autotunes
            times.append(time.perf_counter() - t0)
        if not repeats:
            break
    times.sort()
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return times[len(times) // 2], mem


def oom_detail(err: BaseException, device: torch.device) -> dict:
    """What an out-of-memory row records: the allocator's message without its closing advice
    (what was asked for, what was in use), and on CUDA the peak allocated before the failure (GiB)."""
    message = " ".join(str(err).split()).split(" If reserved but unallocated")[0]
    detail = {"oom": message[:400]}
    if device.type == "cuda":
        detail["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return detail


# ----------------------------------------------------------------------------- profile split
class _AttnBackwardStart(torch.autograd.Function):
    """Identity on the attention output; its backward opens the "attention backward" range."""

    @staticmethod
    def forward(ctx, out, state):
        ctx.state = state
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.state["handle"] = torch.ops.profiler._record_function_enter_new("attention_backward", None)
        return grad, None


class _AttnBackwardEnd(torch.autograd.Function):
    """Identity on q, k, v; its backward (after all of dq, dk, dv) closes the range."""

    @staticmethod
    def forward(ctx, state, q, k, v):
        ctx.state = state
        return q.view_as(q), k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        handle = ctx.state.pop("handle", None)
        if handle is not None:
            torch.ops.profiler._record_function_exit(handle)
        return None, dq, dk, dv


def marked_attend(attend, state: dict, kernel_of):
    """attend wrapped in profiler ranges "attention_forward" / "attention_backward" while
    state["on"]: the split needs no kernel names (ours, cuDNN, FlexAttention, the CP ring alike).
    Autograd runs the attention's backward nodes between the two markers' backward calls (nothing
    else in the block is ready then), and a checkpoint's recompute of the attention counts as
    attention forward. kernel_of(q, k, v, *rest) names the backend of the first call into
    state["kernel"] (printed at once: a fallback shows before a long step ends)."""
    def attend_marked(q, k, v, *rest):
        if "kernel" not in state:
            state["kernel"] = kernel_of(q, k, v, *rest)
            print(f"attention runs on: {state['kernel']}", file=sys.stderr, flush=True)
        if not state["on"]:
            return attend(q, k, v, *rest)
        q, k, v = _AttnBackwardEnd.apply(state, q, k, v)
        with torch.profiler.record_function("attention_forward"):
            out = attend(q, k, v, *rest)
        return _AttnBackwardStart.apply(out, state)
    return attend_marked


def kernel_reporter(model, impl: str, cp):
    """kernel_of for marked_attend: the attention backend the model's own call resolves to (the
    config's backend, "auto" included); the replaced attentions name themselves."""
    if impl == "sdpa-rope":
        return lambda *_: "sdpa-cudnn"
    if cp is not None:
        return lambda *_: "context-parallel ring"
    from scaleinv_dist.attention import attention_backend_for

    def kernel_of(q, k, v, q_pos, k_pos, q_seg, k_seg):
        return attention_backend_for(q, k, v, q_pos, k_pos, q_seg=q_seg, k_seg=k_seg,
                                     **model.attention_options())
    return kernel_of


RANGES = ("attention_forward", "attention_backward", "train_step")


def split_times(events, device: torch.device) -> tuple[float, float, float]:
    """(attention forward, attention backward, all work) in microseconds from profiler events.

    CUDA: kernel time; a range's kernels are those launched inside it on its thread (the backward
    runs on autograd's device thread, where its range is opened too); all work = every kernel,
    memcpy and memset once (not the GPU-side copies of the ranges). CPU: CPU time of the ranges."""
    from torch.autograd import DeviceType

    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    if device.type == "cuda":
        def span(name):
            return sum(e.device_time_total for e in cpu if e.name == name)
        busy = sum(e.time_range.elapsed_us() for e in events
                   if e.device_type != DeviceType.CPU and e.name not in RANGES
                   and not getattr(e, "is_user_annotation", False))
    else:
        def span(name):
            return sum(e.cpu_time_total for e in cpu if e.name == name)
        busy = span("train_step")
    return span("attention_forward"), span("attention_backward"), busy


def profile_step(model, opt, batch: int, seq_len: int, vocab: int, device: torch.device, state: dict,
                 top_file: Path | None, cp=None) -> dict:
    """One profiled training step (after the timed ones): milliseconds of attention forward and
    backward (inside the marker ranges) and of everything else. On CUDA these are GPU kernel times
    (`busy_ms` in all, `idle_ms` the step's wall time with no kernel running); on CPU, CPU time.
    A profiled step during which torch.compile built a graph measured the compiler, not the
    training step: it is profiled once more and the split comes from the repeat.
    `graphs_compiled`: graphs built during the reported step; `graphs_compiled_before`: those
    built by a first profiled step that was repeated (their guard failures go to stderr).
    Writes the top kernels (ops on CPU) by self time to top_file, and on CUDA the top host-side
    ops too, which show what the CPU did while the GPU idled."""
    row, prof, reasons = _profiled_step(model, opt, batch, seq_len, vocab, device, state, cp)
    if row["graphs_compiled"]:
        print(f"profiled step: torch.compile built {row['graphs_compiled']} graph(s) during it "
              f"({'; '.join(reasons) or 'first compile'}); profiling one more step",
              file=sys.stderr, flush=True)
        before = row["graphs_compiled"]
        row, prof, _ = _profiled_step(model, opt, batch, seq_len, vocab, device, state, cp)
        row["graphs_compiled_before"] = before
    wall = row["prof_wall_ms"]
    if top_file is not None:
        sorts = ["self_cuda_time_total", "self_cpu_time_total"] if device.type == "cuda" else ["self_cpu_time_total"]
        top_file.parent.mkdir(parents=True, exist_ok=True)
        top_file.write_text("\n".join(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=100)
                                      for sort in sorts) + "\n")
    if device.type == "cuda" and row["idle_ms"] > 0.1 * wall:
        print(f"profiled step: the GPU idled {row['idle_ms']:.0f} ms of {wall:.0f}; torch.compile built "
              f"{row['graphs_compiled']} graph(s) during it" + (f"; host-side ops in {top_file}" if top_file else ""),
              file=sys.stderr, flush=True)
    return row


def _profiled_step(model, opt, batch: int, seq_len: int, vocab: int, device: torch.device, state: dict,
                   cp=None) -> tuple[dict, object, list[str]]:
    """profile_step's measurement of one step: (its split and the graphs torch.compile built
    during it, the profile, the guard failures that made it build them)."""
    from torch._dynamo.utils import counters, guard_failures
    from torch.profiler import ProfilerActivity, profile

    tokens, positions, labels = make_batch(batch, seq_len, vocab, device, cp)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    graphs_before = counters["stats"]["unique_graphs"]
    failures_before = {code: len(reasons) for code, reasons in guard_failures.items()}
    state["on"] = True
    try:
        sync(device)
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            with torch.profiler.record_function("train_step"):
                train_step(model, opt, tokens, positions, labels)
            sync(device)
            wall = time.perf_counter() - t0
    finally:
        state["on"] = False
        state.pop("handle", None)
    reasons = [f"{code.co_name}: {str(reason).strip()[:300]}" for code, rs in list(guard_failures.items())
               for reason in rs[failures_before.get(code, 0):]]
    fwd, bwd, busy = split_times(prof.events(), device)
    row = dict(prof_wall_ms=wall * 1e3, busy_ms=busy / 1e3, attn_fwd_ms=fwd / 1e3, attn_bwd_ms=bwd / 1e3,
               rest_ms=(busy - fwd - bwd) / 1e3, idle_ms=max(0.0, wall * 1e3 - busy / 1e3),
               graphs_compiled=counters["stats"]["unique_graphs"] - graphs_before)
    return row, prof, reasons


def cp_setup(strategy: str, ulysses_degree: int):
    """(ParallelConfig, topology, shard fn) for context parallelism over all WORLD_SIZE ranks."""
    from scaleinv_dist.config import ParallelConfig
    from scaleinv_dist.parallel.layouts import layout_for, shard_batch
    from scaleinv_dist.parallel.topology import init_topology_from_config

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    pcfg = ParallelConfig(context_parallel_size=int(os.environ["WORLD_SIZE"]), cp_strategy=strategy,
                          ulysses_degree=ulysses_degree)
    topo = init_topology_from_config(pcfg, 600)

    def shard(*tensors):
        return shard_batch(*tensors, rank=topo.cp_rank, cp_size=topo.cp_size, layout=layout_for(strategy))

    return pcfg, topo, shard


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/paper-162m.yaml")
    ap.add_argument("--lengths", default="4096,16384,65536")
    ap.add_argument("--impls", default="ours,flex-si,sdpa-rope")
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--ckpt", default="selective",
                    help="activation checkpointing: a mode (none|selective|full|offload), several "
                         "(none,selective: each is run), or per length (4096:none,65536:full)")
    ap.add_argument("--compile", default="on", help="on | off | on,off (each is run): torch.compile the blocks")
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the profiled step (the attention / rest split and the top kernels)")
    ap.add_argument("--out", default="", help="folder for the top-kernel tables and a copy of the report "
                                              "(default $OUT when set)")
    ap.add_argument("--probe-ckpt", default="offload", choices=CKPT_MODES,
                    help="activation checkpointing of the --longest probes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens-per-step", type=int, default=65536,
                    help="batch = max(1, this // seq_len) sequences per step (1 under --cp-strategy)")
    ap.add_argument("--cp-strategy", default="", help="ring|zigzag|ulysses|hybrid under torchrun")
    ap.add_argument("--ulysses-degree", type=int, default=2, help="hybrid only")
    ap.add_argument("--longest", default="", help="comma list of lengths to probe for ours, e.g. 262144,524288,1048576")
    ap.add_argument("--max-step-seconds", type=float, default=240.0)
    ap.add_argument("--probe-impl", default="ours", choices=("ours", "ours-hopper"),
                    help="implementation of the --longest probes (ours-hopper: fail, not fall back, "
                         "where the Hopper kernels cannot run)")
    ap.add_argument("--probe-repeats", type=int, default=0,
                    help="timed steps per --longest length after an untimed first; 0: time the one step")
    ap.add_argument("--memory-trace", action="store_true",
                    help="record the CUDA allocator's history in each measured row and write, to --out, "
                         "the allocations alive at its peak by line of code (memory_peak_*.txt; "
                         "a diagnostic: recording slows the step, and a 2M-token step with it failed "
                         "with a SystemError inside autograd that the step without it did not show)")
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    ap.add_argument("--smoke", action="store_true",
                    help="a check that the script runs, in seconds, on CPU or GPU: a 2-layer model of "
                         "configs/tiny.yaml at 64 (selective) and 128 (full) tokens, ours and sdpa-rope, "
                         "compile off and on; results go to --out (never to benchmarks/RESULTS.md)")
    args = ap.parse_args()
    prefer_expandable_segments()  # as training does (before the first CUDA allocation)
    overrides = []
    if args.smoke:
        overrides = SMOKE_OVERRIDES
        args.config = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
        args.lengths, args.impls, args.vocab = "64,128", "ours,sdpa-rope", 256
        args.tokens_per_step, args.repeats, args.compile, args.longest = 256, 1, "off,on", ""
        args.ckpt = "64:selective,128:full"
        args.out = args.out or os.environ.get("OUT") or "runs/train_throughput_smoke"
        args.results = str(Path(args.out, "RESULTS.md"))
    out = Path(args.out or os.environ.get("OUT") or "") if (args.out or os.environ.get("OUT")) else None
    compiles = []
    for c in args.compile.split(","):
        if c not in ("on", "off"):
            usage_error(f"--compile takes on, off or on,off; got {args.compile!r}")
        compiles.append(c == "on")
    lengths = [int(x) for x in args.lengths.split(",") if x]
    ckpts = parse_ckpt(args.ckpt, lengths)

    cp, rank, world = None, 0, 1
    if args.cp_strategy:
        pcfg, topo, cp = cp_setup(args.cp_strategy, args.ulysses_degree)
        rank, world = topo.rank, topo.world_size
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    peak = peak_tflops(device)
    rows = []

    def measure(impl: str, seq_len: int, ckpt: str, compiled: bool, repeats: int, profile: bool) -> dict:
        cfg = load_config(args.config, [*overrides, f"train.seq_len={seq_len}"])
        model = build(cfg, impl, args.vocab, ckpt, compiled, device)
        if cp is not None:
            from scaleinv_dist.parallel.context_parallel import apply_cp

            apply_cp(model, topo, pcfg)
        state = {"on": False}
        model.attend = marked_attend(model.attend, state, kernel_reporter(model, impl, cp))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        row = dict(impl=impl, seq_len=seq_len, gpus=world, ckpt=ckpt, compile=compiled)

        def row_file(kind: str) -> Path | None:
            """--out/<kind>_<impl>_<len>_<ckpt>_<compiled|eager>.txt on rank 0, else None."""
            mode = "compiled" if compiled else "eager"
            return out / f"{kind}_{impl}_{seq_len}_{ckpt}_{mode}.txt" if out is not None and rank == 0 else None

        try:
            batch = 1 if cp is not None else max(1, args.tokens_per_step // seq_len)
            with memory_peak.recorded(row_file("memory_peak") if args.memory_trace else None, device):
                sec, mem = step_time(model, opt, batch, seq_len, args.vocab, repeats, device, cp)
            tok_s = batch * seq_len / sec
            mfu = model.flops_per_token(seq_len) * tok_s / world / (peak * 1e12)
            row.update(batch=batch, step_s=sec, tokens_per_s=tok_s, mfu=mfu, peak_gib=mem, status="ok")
            if profile:
                row.update(profile_step(model, opt, batch, seq_len, args.vocab, device, state,
                                        row_file("top_kernels"), cp))
        except torch.cuda.OutOfMemoryError as err:
            row.update(status="OOM", **oom_detail(err, device))
            print(f"{impl} {seq_len} {ckpt} compile={compiled}: out of memory: {row['oom']}", file=sys.stderr)
        except Exception as err:  # noqa: BLE001 - a failing row is reported; the others still run
            traceback.print_exc()
            row["status"] = f"failed: {type(err).__name__}: {str(err)[:160]}"
            print(f"{impl} {seq_len} {ckpt} compile={compiled}: {row['status']}", file=sys.stderr)
        row["kernel"] = state.get("kernel", "")
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row

    impls = args.impls.split(",") if cp is None else ["ours"]
    for n in lengths:
        for ckpt in ckpts[n]:
            for compiled in compiles:
                for impl in impls:
                    rows.append(measure(impl, n, ckpt, compiled, args.repeats, not args.no_profile))
                    if rank == 0:
                        print(json.dumps(rows[-1]), flush=True)
    for n in [int(x) for x in args.longest.split(",") if x]:
        row = measure(args.probe_impl, n, args.probe_ckpt, compiles[0], args.probe_repeats, False)
        row["probe"] = "longest"
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
        if row["status"] != "ok" or row["step_s"] > args.max_step_seconds:
            break

    if rank == 0:
        report(rows, args, peak, device, out)


def report(rows, args, peak, device: torch.device, out: Path | None) -> None:
    def key(r):
        return r["seq_len"], r["ckpt"], r["compile"]

    base = {key(r): r for r in rows if r["impl"] == "sdpa-rope" and r["status"] == "ok" and "probe" not in r}
    lines = ["| impl | kernel | seq_len | batch | GPUs | ckpt | compile | step s | tokens/s | MFU | peak GiB "
             "| vs sdpa-rope |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        comp = "on" if r["compile"] else "off"
        if r["status"] != "ok":
            before = f"{r['peak_gib']:.1f} before failing" if "peak_gib" in r else ""
            lines.append(f"| {r['impl']} | {r['kernel']} | {r['seq_len']} | | {r['gpus']} | {r['ckpt']} | {comp} | "
                         f"{r['status']} | | | {before} | |")
            continue
        b = base.get(key(r))
        ratio = f"{r['step_s'] / b['step_s']:.2f}x" if b and "probe" not in r else ""
        lines.append(f"| {r['impl']}{' (longest probe)' if 'probe' in r else ''} | {r['kernel']} | "
                     f"{r['seq_len']} | {r['batch']} | "
                     f"{r['gpus']} | {r['ckpt']} | {comp} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | {ratio} |")
    table = "\n".join(lines)
    ooms = [f"- {r['impl']} at {r['seq_len']} tokens, {r['ckpt']}: {r['oom']}" for r in rows if "oom" in r]
    if ooms:
        table += "\n\nOut of memory (the allocator's message):\n" + "\n".join(ooms)
    prof = [r for r in rows if r["status"] == "ok" and "busy_ms" in r]
    if prof:
        unit = "GPU kernel time" if device.type == "cuda" else "CPU time"
        split = [f"\nStep split from one profiled step ({unit}, ms; attention = forward + backward "
                 f"of the attention call, checkpoint recomputes included; idle = wall - kernels; "
                 f"graphs compiled = by torch.compile during that step; a step that built any is "
                 f"profiled again, and the first step's count follows in brackets):\n",
                 "| impl | seq_len | ckpt | compile | wall | kernels | attn fwd | attn bwd | rest | "
                 "attn share | idle | graphs compiled |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in prof:
            share = (r["attn_fwd_ms"] + r["attn_bwd_ms"]) / r["busy_ms"] if r["busy_ms"] > 0 else float("nan")
            split.append(f"| {r['impl']} | {r['seq_len']} | {r['ckpt']} | {'on' if r['compile'] else 'off'} | "
                         f"{r['prof_wall_ms']:.1f} | {r['busy_ms']:.1f} | {r['attn_fwd_ms']:.1f} | "
                         f"{r['attn_bwd_ms']:.1f} | {r['rest_ms']:.1f} | {100 * share:.0f}% | {r['idle_ms']:.1f} | "
                         f"{graphs_cell(r)} |")
        table += "\n" + "\n".join(split)
    print(table)
    if device.type == "cuda":
        import triton

        card, versions = torch.cuda.get_device_name(), f"torch {torch.__version__}, triton {triton.__version__}"
    else:
        card, versions = "CPU", f"torch {torch.__version__}"
    header = (f"\n## train_throughput — {dt.date.today()} — {card} x{rows[0]['gpus']}\n"
              f"{versions}, peak {peak} TFLOP/s; command: `{variant_env_prefix()}{' '.join(sys.argv)}`\n\n")
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(header + table + "\n")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_throughput.md").write_text(header + table + "\n")
        (out / "train_throughput.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if prof:
            plot_step_split(prof, f"{card} x{rows[0]['gpus']}, {dt.date.today()}", out / "step_split.png")


def graphs_cell(row: dict) -> str:
    """The split table's "graphs compiled": the reported step's count, and in brackets that of the
    first profiled step when it built graphs and was repeated."""
    before = row.get("graphs_compiled_before")
    return f"{row.get('graphs_compiled', '')}" + (f" ({before} before)" if before else "")


SEGMENTS = (("attn_fwd_ms", "attention forward"), ("attn_bwd_ms", "attention backward"),
            ("rest_ms", "rest (matmuls, norms, loss, optimizer)"), ("idle_ms", "idle (no kernel running)"))


def plot_step_split(rows: list[dict], title: str, path: Path) -> Path:
    """One stacked bar per profiled row: its step split (ms), and the row's MFU at the bar's end."""
    from scaleinv_dist.evaluate.plots import plt  # matplotlib, set up for files (Agg)

    def tokens(n: int) -> str:
        return f"{n // 1024}k" if n % 1024 == 0 else str(n)

    labels = [f"{r['impl']} {tokens(r['seq_len'])} {r['ckpt']} {'compiled' if r['compile'] else 'eager'}"
              for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 2.2))
    left = [0.0] * len(rows)
    for key, name in SEGMENTS:
        width = [r[key] for r in rows]
        ax.barh(range(len(rows)), width, left=left, label=name)
        left = [a + b for a, b in zip(left, width)]
    for i, r in enumerate(rows):
        if r.get("mfu") == r.get("mfu"):  # not NaN (no MFU on CPU)
            ax.text(left[i], i, f"  {100 * r['mfu']:.1f}% MFU", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (one profiled step)")
    ax.set_title(f"where the step time goes: {title}", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.6 / (len(rows) + 4)), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
