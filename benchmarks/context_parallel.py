"""Context-parallel attention: scaling efficiency and bf16 parity, ours vs PyTorch's built-in CP.

    torchrun --nproc_per_node 4 benchmarks/context_parallel.py --tokens-per-gpu 16384,65536 \
        --strategies zigzag,hybrid,ring,ulysses

For each number of tokens per GPU T (sequence N = T x W on W GPUs) it times forward + backward of
the sharded attention (bf16, causal, --heads heads of --head-dim, batch 1):
  ours/<strategy>    scaleinv_dist.parallel.ContextParallelAttention, scale-invariant transform,
                     backend triton if it imports (else --backend)
  torch-cp/<sdpa>    torch.distributed.tensor.experimental.context_parallel around SDPA (flash and
                     cuDNN), head-tail load balancing: what torchtitan users get (no transform)
Efficiency = (one-GPU time of the whole sequence / W) / measured time, where the one-GPU time is
the same attention (ours: the backend on all N tokens; torch-cp: SDPA with the same kernel) measured
in the same run on rank 0. Times: CUDA events, warmup, then the median over repeats of the slowest
rank. With W = 1 only the one-GPU times are measured. Before timing, each of our strategies is
checked against one-GPU attention in bf16 on --parity-tokens tokens per GPU with packed documents
(relative error ||a - b|| / ||b|| of out, dq, dk, dv; pass <= 2e-2).
Prints a table; appends it with date, card, versions, W and the command to benchmarks/RESULTS.md
and writes it to $OUT/context_parallel.md when OUT is set. NCCL_NVLS_ENABLE is left as set.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import statistics
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from scaleinv_dist.attention import resolve_backend, scale_invariant_attention  # noqa: E402
from scaleinv_dist.parallel import (ContextParallelAttention, destroy_topology, init_topology,  # noqa: E402
                                    layout_for, shard_batch, shard_index)

PARITY_TOL = 2e-2


def log(*a):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


SPREAD: dict = {}  # the last timed() call's per-rank medians: fastest, slowest


def timed(fn, warmup: int, repeats: int, world: int) -> float:
    """Median over repeats of the slowest rank's milliseconds for fn() (forward + backward)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times, mine = [], []
    for _ in range(repeats):
        if world > 1:
            dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        mine.append(start.elapsed_time(end))
        t = torch.tensor([mine[-1]], device="cuda")
        if world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(t.item())
    med = torch.tensor([statistics.median(mine), -statistics.median(mine)], device="cuda")
    if world > 1:
        dist.all_reduce(med, op=dist.ReduceOp.MIN)
    SPREAD.update(fastest=med[0].item(), slowest=-med[1].item())
    return statistics.median(times)


def make_qkvd(b, hq, hkv, n, d, seed, device="cuda", dtype=torch.bfloat16):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, hq, n, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(b, hkv, n, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(b, hkv, n, d, device=device, dtype=dtype, generator=g)
    do = torch.randn(b, hq, n, d, device=device, dtype=dtype, generator=g)
    return q, k, v, do


def fwd_bwd(attend, q, k, v, do, *args):
    def step():
        for t in (q, k, v):
            t.grad = None
        out = attend(q, k, v, *args)
        out.backward(do)
    return step


# ----------------------------------------------------------------------------- one GPU
def one_gpu_ours(args, n, backend):
    q, k, v, do = make_qkvd(args.batch, args.heads, args.kv_heads, n, args.head_dim, 0)
    for t in (q, k, v):
        t.requires_grad_()
    pos = torch.arange(n, device="cuda")[None].expand(args.batch, n)

    def attend(q, k, v):
        return scale_invariant_attention(q, k, v, pos, pos, tau=args.tau, transform=args.transform,
                                         backend=backend)
    return timed(fwd_bwd(attend, q, k, v, do), args.warmup, args.repeats, 1)


def sdpa_backend(name):
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]


def one_gpu_sdpa(args, n, kernel):
    from torch.nn.attention import sdpa_kernel
    q, k, v, do = make_qkvd(args.batch, args.heads, args.kv_heads, n, args.head_dim, 0)
    for t in (q, k, v):
        t.requires_grad_()
    gqa = args.kv_heads != args.heads

    def attend(q, k, v):
        with sdpa_kernel(sdpa_backend(kernel)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return timed(fwd_bwd(attend, q, k, v, do), args.warmup, args.repeats, 1)


# ----------------------------------------------------------------------------- ours, W GPUs
def ulysses_for(strategy, world, args):
    if strategy in ("ring", "zigzag"):
        return 1
    if strategy == "ulysses":
        return world
    return args.ulysses_degree or (2 if world >= 4 and world % 2 == 0 else world)


def parity_ours(args, topo, strategy, backend):
    """bf16 relative errors of out, dq, dk, dv vs one-GPU attention (packed documents)."""
    world = topo.cp_size
    n = args.parity_tokens * world
    q, k, v, do = make_qkvd(1, args.heads, args.kv_heads, n, args.head_dim, 1234)
    g = torch.Generator(device="cuda").manual_seed(99)
    docs = (torch.rand(1, n, device="cuda", generator=g) < 4.0 / args.parity_tokens).long().cumsum(1)
    idx = torch.arange(n, device="cuda")[None]
    first = torch.ones_like(docs, dtype=torch.bool)
    first[:, 1:] = docs[:, 1:] != docs[:, :-1]
    starts = torch.cummax(torch.where(first, idx, torch.zeros_like(idx)), 1).values
    pos = idx - starts  # positions restart at every document
    full = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_ref = scale_invariant_attention(*full, pos, pos, q_seg=docs, k_seg=docs, tau=args.tau,
                                        transform=args.transform, backend=backend)
    out_ref.backward(do)
    layout = layout_for(strategy)
    sh = dict(rank=topo.cp_rank, cp_size=world, layout=layout)
    loc = [t.detach().clone().requires_grad_() for t in shard_batch(q, k, v, dim=2, **sh)]
    do_l = shard_batch(do, dim=2, **sh)
    pos_l, docs_l = shard_batch(pos, docs, **sh)
    attend = ContextParallelAttention(topo, strategy, args.transform, args.tau, backend)
    out = attend(*loc, pos_l, pos_l, docs_l, docs_l)
    out.backward(do_l)
    errs = {"out": rel(out, shard_batch(out_ref.detach(), dim=2, **sh))}
    for name, a, b in zip(("dq", "dk", "dv"), loc, full):
        errs[name] = rel(a.grad, shard_batch(b.grad, dim=2, **sh))
    t = torch.tensor([max(errs.values())], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item(), errs


def time_ours(args, topo, strategy, tokens, backend):
    world = topo.cp_size
    n = tokens * world
    layout = layout_for(strategy)
    idx = shard_index(n, world, layout)[topo.cp_rank].cuda()
    pos = idx[None].expand(args.batch, tokens).contiguous()  # global positions of my tokens
    q, k, v, do = make_qkvd(args.batch, args.heads, args.kv_heads, tokens, args.head_dim,
                            100 + topo.rank)
    for t in (q, k, v):
        t.requires_grad_()
    attend = ContextParallelAttention(topo, strategy, args.transform, args.tau, backend)
    return timed(fwd_bwd(attend, q, k, v, do, pos, pos, None, None), args.warmup, args.repeats,
                 world)


# ----------------------------------------------------------------------------- torch's CP
def time_torch_cp(args, tokens, kernel, mesh):
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import sdpa_kernel
    try:  # head-tail load balancing (the default in recent torch; set it explicitly)
        from torch.distributed.tensor.experimental._attention import _cp_options
        if hasattr(_cp_options, "enable_load_balance"):
            _cp_options.enable_load_balance = True
    except ImportError:
        pass
    if args.torch_cp_rotate:
        from torch.distributed.tensor.experimental._attention import set_rotate_method
        set_rotate_method(args.torch_cp_rotate)
    world = mesh.size()
    n = tokens * world
    q, k, v, do = make_qkvd(args.batch, args.heads, args.kv_heads, n, args.head_dim, 7)
    gqa = args.kv_heads != args.heads
    bufs = [q, k, v, do]
    with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2, 2],
                          no_restore_buffers=set(bufs)):
        ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))

        def attend(q, k, v):
            with sdpa_kernel(sdpa_backend(kernel)):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return timed(fwd_bwd(attend, ql, kl, vl, do), args.warmup, args.repeats, world)


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens-per-gpu", default="16384,65536")
    ap.add_argument("--strategies", default="zigzag,hybrid,ring,ulysses")
    ap.add_argument("--torch-cp", default="flash,cudnn", help="SDPA kernels for torch's CP ('' = skip)")
    ap.add_argument("--torch-cp-rotate", default="", help="allgather | alltoall ('' = torch's default)")
    ap.add_argument("--backend", default="auto", help="auto (triton, else reference) | triton | reference")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=0, help="0 = --heads (no GQA)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--transform", default="scale_invariant")
    ap.add_argument("--tau", type=float, default=10.0)
    ap.add_argument("--ulysses-degree", type=int, default=0, help="hybrid's all-to-all degree (0: 2)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--parity-tokens", type=int, default=2048, help="tokens per GPU of the parity check (0 = skip)")
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = ap.parse_args()
    args.kv_heads = args.kv_heads or args.heads
    sizes = [int(s) for s in args.tokens_per_gpu.split(",") if s]
    strategies = [s for s in args.strategies.split(",") if s]
    kernels = [s for s in args.torch_cp.split(",") if s]

    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    if world > 1:
        dist.init_process_group("nccl", device_id=torch.device("cuda", local),
                                timeout=dt.timedelta(minutes=10))
    rank = dist.get_rank() if world > 1 else 0
    probe = torch.empty(1, device="cuda", dtype=torch.bfloat16)
    backend = args.backend
    if backend == "auto":
        backend = resolve_backend("auto", probe)
        if backend != "triton":
            log("ERROR: the Triton kernel does not import (see the warning above); pass --backend "
                "reference to time the slow reference backend anyway (small --tokens-per-gpu)")
            sys.exit(2)
    log(f"W={world} backend={backend} heads={args.heads}/{args.kv_heads}x{args.head_dim} "
        f"sizes={sizes} strategies={strategies} torch-cp={kernels}")

    # one-GPU times of the whole sequence, on rank 0 while the others wait
    single: dict = {}
    if rank == 0:
        for tokens in sizes:
            n = tokens * world
            for name, fn in [("ours", lambda n=n: one_gpu_ours(args, n, backend))] + \
                    [(f"torch-cp/{k}", lambda n=n, k=k: one_gpu_sdpa(args, n, k)) for k in kernels]:
                try:
                    single[(name, tokens)] = fn()
                    log(f"  one GPU {name:16s} N={n:8d}: {single[(name, tokens)]:9.2f} ms")
                except Exception as err:
                    log(f"  one GPU {name} N={n} failed: {err}")
                torch.cuda.empty_cache()
    SPREAD.clear()
    if world > 1:
        box = [single]
        dist.broadcast_object_list(box, src=0)
        single = box[0]

    rows = []

    def add(method, tokens, ms, parity=""):
        base = single.get(("ours" if method.startswith("ours") else method, tokens))
        eff = (base / world) / ms if (base and ms and not math.isnan(ms)) else float("nan")
        spread = (f"{SPREAD['fastest']:.1f}-{SPREAD['slowest']:.1f}"
                  if SPREAD and not math.isnan(ms) else "-")
        SPREAD.clear()
        rows.append(dict(method=method, tokens=tokens, n=tokens * world, ms=ms, base=base, eff=eff,
                         parity=parity, spread=spread))
        log(f"  {method:18s} T={tokens:6d}: {ms:9.2f} ms  one-GPU {base or float('nan'):9.2f} ms  "
            f"efficiency {100 * eff:5.1f}%  ranks {spread} ms  {parity}")

    if world > 1:
        for strategy in strategies:
            try:
                topo = init_topology(world, ulysses_for(strategy, world, args), 600)
            except Exception as err:
                log(f"{strategy}: cannot build the topology: {err}")
                continue
            label = f"ours/{strategy}" + (f" {topo.ulysses_size}x{topo.ring_size}"
                                          if strategy == "hybrid" else "")
            parity = ""
            if args.parity_tokens:
                try:
                    worst, errs = parity_ours(args, topo, strategy, backend)
                    parity = ("PASS" if worst <= PARITY_TOL else "FAIL") + f" {worst:.1e}"
                    log(f"  parity {strategy}: " + " ".join(f"{k}={e:.1e}" for k, e in errs.items())
                        + f" (max over ranks {worst:.1e})")
                except Exception as err:
                    parity = "error"
                    log(f"  parity {strategy} failed: {err}\n{traceback.format_exc()}")
                torch.cuda.empty_cache()
            for tokens in sizes:
                try:
                    ms = time_ours(args, topo, strategy, tokens, backend)
                except Exception as err:
                    log(f"  {label} T={tokens} failed: {err}\n{traceback.format_exc()}")
                    ms = float("nan")
                add(label, tokens, ms, parity)
                torch.cuda.empty_cache()
            destroy_topology()
        if kernels:
            try:
                from torch.distributed.device_mesh import init_device_mesh
                mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("cp",))
            except Exception as err:
                log(f"torch CP: no device mesh: {err}")
                kernels = []
            for kernel in kernels:
                for tokens in sizes:
                    try:
                        ms = time_torch_cp(args, tokens, kernel, mesh)
                    except Exception as err:
                        log(f"  torch-cp/{kernel} T={tokens} failed: {err!r}")
                        ms = float("nan")
                    add(f"torch-cp/{kernel}", tokens, ms)
                    torch.cuda.empty_cache()
    else:
        for (name, tokens), ms in single.items():
            add(name, tokens, ms)

    if rank == 0:
        report(args, rows, world, backend)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def report(args, rows, world, backend) -> None:
    try:
        import triton
        triton_v = triton.__version__
    except Exception:
        triton_v = "none"
    card = torch.cuda.get_device_name()
    cmd = (f"torchrun --nproc_per_node {world} " if world > 1 else "python ") + " ".join(sys.argv)
    header = (f"\n## Context-parallel attention, W={world} ({dt.datetime.now():%Y-%m-%d %H:%M})\n\n"
              f"{world} x {card}, torch {torch.__version__}, triton {triton_v}, backend {backend}, "
              f"bf16, causal, batch {args.batch}, {args.heads} heads ({args.kv_heads} KV) of "
              f"{args.head_dim}, transform {args.transform} (ours; torch-cp has none), "
              f"NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE', 'unset')}\n\n"
              f"Command: `{cmd}`\n\n"
              "Efficiency = (one-GPU time of the whole sequence / W) / time; one-GPU = the same "
              "attention on one GPU in this run; ms = median of the slowest rank per repeat; rank "
              "medians = fastest-slowest rank's own median. Parity: bf16 max relative error of out/dq/dk/dv vs "
              f"one GPU, packed documents, {args.parity_tokens} tokens per GPU (pass <= {PARITY_TOL}).\n\n")
    table = ("| method | tokens/GPU | sequence | ms (fwd+bwd) | rank medians ms | one-GPU ms | "
             "efficiency | parity |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n")
    for r in rows:
        base = f"{r['base']:.1f}" if r["base"] else "-"
        eff = f"{100 * r['eff']:.1f}%" if not math.isnan(r["eff"]) else "-"
        table += (f"| {r['method']} | {r['tokens']} | {r['n']} | {r['ms']:.1f} | {r['spread']} | "
                  f"{base} | {eff} | {r['parity'] or '-'} |\n")
    ours = {(r["method"].split()[0], r["tokens"]): r["ms"] for r in rows}
    notes = []
    for tokens in sorted({r["tokens"] for r in rows}):
        cudnn = ours.get(("torch-cp/cudnn", tokens))
        for m, ms in ours.items():
            if m[1] == tokens and m[0].startswith("ours/") and cudnn and ms == ms:
                notes.append(f"{m[0]} at {tokens}/GPU: {ms / cudnn:.2f}x torch-cp/cudnn wall time")
    text = header + table + ("\n" + "; ".join(notes) + "\n" if notes else "")
    print(text, flush=True)
    with open(args.results, "a") as f:
        f.write(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "context_parallel.md").write_text(text)


if __name__ == "__main__":
    main()
