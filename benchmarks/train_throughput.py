"""Training-step throughput, MFU and peak memory of a config's model at long sequence lengths.

    python benchmarks/train_throughput.py --config configs/paper-162m.yaml --lengths 4096,16384,65536
    torchrun --nproc_per_node 4 benchmarks/train_throughput.py --lengths 262144 --cp-strategy zigzag

Per length it times a full training step (forward, backward, AdamW) of max(1, 65536 // length)
sequences (--tokens-per-step; one sequence split over the GPUs with --cp-strategy), bf16 autocast, with three attention implementations in the same run:
  ours       scale-invariant p-RoPE through the fused Triton kernel (or the config's backend)
  flex-si    the same model with FlexAttention + the scale-invariant score_mod (the paper's route)
  sdpa-rope  RoPE, no transform, torch SDPA cuDNN (the cost floor)
Memory recipe: activation checkpointing (--ckpt none|selective|full|offload; the --longest probes
use --probe-ckpt, default offload), chunked cross-entropy, bf16 autocast, fused AdamW. MFU = flops_per_token x tokens/s / peak, flops_per_token =
6 x non-embedding parameters + 7 x layers x seq_len x heads x head_dim (causal attention, forward
4 N^2 H D / 2 and backward 2.5x forward). With torchrun and --cp-strategy the sequence is split over
the GPUs by scaleinv_dist.parallel (ours only). "--longest" probes increasing lengths until a step
fails (out of memory) or would exceed --max-step-seconds.
Prints a table; appends it with date, card and command to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaleinv_dist.config import load_config  # noqa: E402
from scaleinv_dist.model import build_model  # noqa: E402

def peak_tflops() -> float:
    """Dense bf16 peak of this GPU in TFLOP/s (the training loop's table), NaN when unknown."""
    from scaleinv_dist.train.metrics import peak_flops

    peak = peak_flops(torch.device("cuda"), bf16=True)
    return float("nan") if peak is None else peak / 1e12


def sdpa_cudnn_attend(q, k, v, q_pos, k_pos, q_seg, k_seg):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def build(cfg, impl: str, vocab: int, ckpt: str):
    overrides = {"ours": {}, "flex-si": {"backend": "flex"}, "sdpa-rope": {"position": "rope", "transform": "none"}}
    for k, v in overrides[impl].items():
        setattr(cfg.attention, k, v)
    cfg.train.activation_checkpointing = ckpt
    model = build_model(cfg, vocab_size=vocab).cuda()
    if impl == "sdpa-rope":
        model.attend = sdpa_cudnn_attend
    return model


def step_time(model, opt, batch: int, seq_len: int, vocab: int, repeats: int,
              cp=None) -> tuple[float, float]:
    """(median seconds per training step, peak GiB) for batch sequences of seq_len tokens.

    The first step (compilation, autotuning) is not timed unless repeats is 0: then the one step
    taken is the figure (the longest-sequence probe, where a step can take minutes).
    """
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq_len), device="cuda", generator=gen)
    positions = torch.arange(seq_len, device="cuda")[None].expand(batch, -1)
    labels = torch.roll(tokens, -1, 1)
    if cp is not None:
        tokens, labels, positions = cp(tokens, labels, positions)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_sum, n = model(tokens, positions, labels=labels)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i or not repeats:  # the first step compiles / autotunes
            times.append(time.perf_counter() - t0)
        if not repeats:
            break
    times.sort()
    return times[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


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
    ap.add_argument("--ckpt", default="selective", choices=["none", "full", "selective", "offload"])
    ap.add_argument("--probe-ckpt", default="offload", choices=["none", "full", "selective", "offload"],
                    help="activation checkpointing of the --longest probes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens-per-step", type=int, default=65536,
                    help="batch = max(1, this // seq_len) sequences per step (1 under --cp-strategy)")
    ap.add_argument("--cp-strategy", default="", help="ring|zigzag|ulysses|hybrid under torchrun")
    ap.add_argument("--ulysses-degree", type=int, default=2, help="hybrid only")
    ap.add_argument("--longest", default="", help="comma list of lengths to probe for ours, e.g. 262144,524288,1048576")
    ap.add_argument("--max-step-seconds", type=float, default=240.0)
    ap.add_argument("--probe-repeats", type=int, default=0,
                    help="timed steps per --longest length after an untimed first; 0: time the one step")
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = ap.parse_args()

    cp, rank, world = None, 0, 1
    if args.cp_strategy:
        pcfg, topo, cp = cp_setup(args.cp_strategy, args.ulysses_degree)
        rank, world = topo.rank, topo.world_size
    peak = peak_tflops()
    rows = []

    def measure(impl: str, seq_len: int, ckpt: str, repeats: int) -> dict:
        cfg = load_config(args.config, [f"train.seq_len={seq_len}"])
        model = build(cfg, impl, args.vocab, ckpt)
        if cp is not None:
            from scaleinv_dist.parallel.context_parallel import apply_cp

            apply_cp(model, topo, pcfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        try:
            batch = 1 if cp is not None else max(1, args.tokens_per_step // seq_len)
            sec, mem = step_time(model, opt, batch, seq_len, args.vocab, repeats, cp)
            tok_s = batch * seq_len / sec
            mfu = model.flops_per_token(seq_len) * tok_s / world / (peak * 1e12)
            row = dict(impl=impl, seq_len=seq_len, batch=batch, gpus=world, ckpt=ckpt, step_s=sec, tokens_per_s=tok_s,
                       mfu=mfu, peak_gib=mem, status="ok")
        except torch.cuda.OutOfMemoryError:
            row = dict(impl=impl, seq_len=seq_len, gpus=world, ckpt=ckpt, status="OOM")
        del model, opt
        torch.cuda.empty_cache()
        return row

    impls = args.impls.split(",") if cp is None else ["ours"]
    for n in [int(x) for x in args.lengths.split(",") if x]:
        for impl in impls:
            rows.append(measure(impl, n, args.ckpt, args.repeats))
            if rank == 0:
                print(json.dumps(rows[-1]), flush=True)
    for n in [int(x) for x in args.longest.split(",") if x]:
        row = measure("ours", n, args.probe_ckpt, args.probe_repeats)
        row["probe"] = "longest"
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
        if row["status"] != "ok" or row["step_s"] > args.max_step_seconds:
            break

    if rank == 0:
        report(rows, args, peak)


def report(rows, args, peak) -> None:
    by = {(r["impl"], r["seq_len"]): r for r in rows if r["status"] == "ok" and "probe" not in r}
    lines = ["| impl | seq_len | batch | GPUs | ckpt | step s | tokens/s | MFU | peak GiB | vs sdpa-rope |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['impl']} | {r['seq_len']} | | {r['gpus']} | {r['ckpt']} | {r['status']} | | | | |")
            continue
        base = by.get(("sdpa-rope", r["seq_len"]))
        ratio = f"{r['step_s'] / base['step_s']:.2f}x" if base else ""
        lines.append(f"| {r['impl']}{' (longest probe)' if 'probe' in r else ''} | {r['seq_len']} | {r['batch']} | "
                     f"{r['gpus']} | {r['ckpt']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
                     f"{r['peak_gib']:.1f} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    import triton

    header = (f"\n## train_throughput — {dt.date.today()} — {torch.cuda.get_device_name()} x{rows[0]['gpus']}\n"
              f"torch {torch.__version__}, triton {triton.__version__}, peak {peak} TFLOP/s; "
              f"command: `{' '.join(sys.argv)}`\n\n")
    with open(args.results, "a") as f:
        f.write(header + table + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "train_throughput.md").write_text(header + table + "\n")


if __name__ == "__main__":
    main()
