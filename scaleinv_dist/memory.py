"""Peak training memory per activation-checkpointing mode, and `auto`: the cheapest mode that fits.

    est = estimate_peak(cfg, vocab_size, bf16=True)        # {mode: Estimate(device, host)} in bytes
    mode, line = choose_checkpointing(est, device_bytes=80e9, host_bytes=..., cuda=True)

Notation: d = model.d_model, H = n_head, K = n_kv_head, D = head_dim, f = mlp_ratio * d, L = n_layer,
V = vocabulary, e = bytes of an activation element (2 under bf16 autocast, 4 in fp32), r = 4 (the
residual stream is fp32 under autocast). Per token and layer, in bytes:

  S_none = 2 r d              inputs of the two RMSNorms (the residual stream)
         + 2 e d              the normalised inputs of the QKV and MLP-in matmuls
         + e (H + K) D        QK-norm inputs (q, k before the norm)
         + e (H + 2K) D       q, k, v as the attention saves them
         + 2 e H D + 4 H      attention out, its copy as the out-projection input, and lse (fp32)
         + 2 e f              MLP hidden: ReLU out (the square's input), the square (proj input)
  S_sel  = S_none - e d - 2 e f   selective: the MLP's normalised input and hidden are recomputed
  R      = r d                full / offload: one fp32 block input per layer
  A      = e (H + 2K) D + e H D + 4 H
                              full / offload: what a recomputed block keeps for the whole sequence
                              (its halves run in checkpointed token chunks): the attention's q, k,
                              v, out and lse
  G      = 2 r d + 4 (H + 2K) D + e H D
                              one layer's backward in flight: residual gradients, fp32 dq / dk / dv,
                              the attention-out gradient
  E      = 3 r d + e d + 4 D + 32
                              outside the blocks: embedding out, final norm in, its gradient (the
                              fused loss stores it), the head's matmul input, fp32 rotary tables,
                              int64 tokens / labels / positions / document ids

Device activation bytes per token, T tokens per device (micro_batch_size * seq_len / CP size):

  none      L S_none + G + E
  selective L S_sel + (S_none - S_sel) + G + E      (+ the recomputed MLP of one layer)
  full      L R + A + G + E - r d                   (the embedding output is recomputed too)
  offload   R + A + G + E - r d, and L R in pinned host memory

plus the loss chunk, min(train.loss_chunk_tokens, T) * V * 8 (fp32 logits and softmax), for full
and offload one recomputed token chunk, min(RECOMPUTE_CHUNK_TOKENS, T) * S_none, and the
states: P parameters, 4 P weights + 4 P gradients (fp32) + optimizer (AdamW: 8 P; Muon: 4 P for the
blocks' matrices, 8 P for the rest) + 2 P_mm bf16 copies of the matmul weights under autocast.
Peak = (states + T * activations + loss chunk + recompute chunk) * (1 + MARGIN) + RESERVE. ZeRO
sharding is ignored (the estimate is high under ZeRO, never low from it).

Checked against the peaks recorded in benchmarks/RESULTS.md for `none` and `selective`
(configs/paper-162m.yaml, vocabulary 50304, AdamW, H100s, blocks not compiled): the estimate is
1.01x-1.28x the measured peak (tests/test_memory.py lists them). Compiled blocks (train.compile, the
CUDA default) keep less: the estimate is 1.27x-1.42x their measured peaks (1.68x and 1.51x for
`offload` at 1M and 2M tokens), so `auto` errs towards more recompute. The `full` and `offload`
terms describe the token-chunked recompute of the blocks' halves (2026-12-05); the peaks measured
before it (eager `offload` 69.7 GiB at 1M tokens, compiled 37.9 GiB) held one whole block's
intermediates (about 36 KB per token, measured on CPU), which ran the 2M-token step out of memory
on an 80 GB card.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

MODES = ("none", "selective", "full", "offload")  # least recompute first
MARGIN = 0.10  # allocator fragmentation, temporaries the model does not name
RESERVE = 3 * 2**30  # bytes: CUDA context, NCCL and cuBLAS workspaces, allocator slack
HOST_FRACTION = 0.5  # of host RAM: what CPU training, or offload's pinned inputs, may use
GiB = 2**30
RECOMPUTE_CHUNK_TOKENS = 1 << 16  # full / offload: tokens per recomputed chunk of a block's halves


@dataclass(frozen=True)
class Estimate:
    """Peak bytes of one checkpointing mode: on the training device and in (pinned) host memory."""
    device: float
    host: float = 0.0


def per_token_bytes(mcfg, bf16: bool) -> dict[str, float]:
    """The docstring's S_none, S_sel, R, A, G, E (bytes per token; the first four per layer)."""
    d, h = mcfg.d_model, mcfg.n_head
    k = mcfg.n_kv_head or h
    hd = mcfg.head_dim or d // h
    f = int(mcfg.mlp_ratio * d)
    e, r = (2 if bf16 else 4), 4
    s_none = (2 * r * d + 2 * e * d + e * (h + k) * hd + e * (h + 2 * k) * hd + 2 * e * h * hd + 4 * h
              + 2 * e * f)
    return dict(S_none=s_none, S_sel=s_none - e * d - 2 * e * f, R=r * d,
                A=e * (h + 2 * k) * hd + e * h * hd + 4 * h,
                G=2 * r * d + 4 * (h + 2 * k) * hd + e * h * hd, E=3 * r * d + e * d + 4 * hd + 32)


def param_counts(mcfg, vocab_size: int) -> tuple[int, int]:
    """(all parameters, the blocks' matrices): the GPT of scaleinv_dist.model, LogN gains left out."""
    d, h = mcfg.d_model, mcfg.n_head
    k = mcfg.n_kv_head or h
    hd = mcfg.head_dim or d // h
    f = int(mcfg.mlp_ratio * d)
    blocks = mcfg.n_layer * (d * (h + 2 * k) * hd + h * hd * d + 2 * d * f)
    return blocks + 2 * vocab_size * d, blocks


def state_bytes(cfg, vocab_size: int, bf16: bool) -> float:
    """fp32 weights and gradients, optimizer state, bf16 weight copies under autocast (bytes)."""
    p, p_blocks = param_counts(cfg.model, vocab_size)
    optimizer = 4 * p_blocks + 8 * (p - p_blocks) if cfg.train.optimizer == "muon" else 8 * p
    casts = 2 * (p - vocab_size * cfg.model.d_model) if bf16 else 0  # every matrix but the embedding
    return 4 * p + 4 * p + optimizer + casts


def estimate_peak(cfg, vocab_size: int, bf16: bool, seq_len: int | None = None) -> dict[str, Estimate]:
    """{mode: Estimate} for one training device; seq_len defaults to train.seq_len."""
    t = cfg.train
    tokens = t.micro_batch_size * (seq_len or t.seq_len) / cfg.parallel.context_parallel_size
    b = per_token_bytes(cfg.model, bf16)
    n_layer = cfg.model.n_layer
    around = b["G"] + b["E"]
    recomputed = b["A"] + around - b["R"]  # full / offload: one block's keep, the embedding recomputed
    per_token = {
        "none": n_layer * b["S_none"] + around,
        "selective": n_layer * b["S_sel"] + (b["S_none"] - b["S_sel"]) + around,
        "full": n_layer * b["R"] + recomputed,
        "offload": b["R"] + recomputed,
    }
    fixed = state_bytes(cfg, vocab_size, bf16) + min(t.loss_chunk_tokens, tokens) * vocab_size * 8
    chunk = min(RECOMPUTE_CHUNK_TOKENS, tokens) * b["S_none"]
    out = {}
    for mode in MODES:
        host = n_layer * b["R"] * tokens if mode == "offload" else 0.0
        extra = chunk if mode in ("full", "offload") else 0.0
        out[mode] = Estimate((fixed + extra + tokens * per_token[mode]) * (1 + MARGIN) + RESERVE, host)
    return out


def choose_checkpointing(estimates: dict[str, Estimate], device_bytes: float, host_bytes: float,
                         cuda: bool) -> tuple[str, str]:
    """(mode, one line saying why): the first of MODES whose estimate fits device_bytes (and, for
    offload, whose host part fits host_bytes). On CPU offload is left out (it is `full` there) and
    device_bytes is the host budget. When nothing fits, the most frugal mode, said so."""
    modes = MODES if cuda else MODES[:-1]
    fits = [m for m in modes if estimates[m].device <= device_bytes and estimates[m].host <= host_bytes]
    mode = fits[0] if fits else modes[-1]
    where = "GPU" if cuda else f"{HOST_FRACTION:g} of host RAM"
    sizes = ", ".join(f"{m} {estimates[m].device / GiB:.1f}" for m in modes)
    host = f"; offload keeps {estimates['offload'].host / GiB:.1f} GiB in host memory (budget " \
           f"{host_bytes / GiB:.1f})" if cuda else ""
    verdict = "the least recompute that fits" if fits else "nothing fits; the most frugal mode"
    return mode, (f"train.activation_checkpointing=auto -> {mode} ({verdict}): estimated peak GiB "
                  f"{sizes} vs {device_bytes / GiB:.1f} available ({where}){host}")


def host_memory_bytes() -> float:
    """Physical host RAM (bytes) shared by this host's ranks: HOST_FRACTION of it, divided by
    LOCAL_WORLD_SIZE (set by torchrun / DeepSpeed; 1 otherwise)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return HOST_FRACTION * ram / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def device_memory_bytes(device) -> float:
    """The device's total memory (CUDA: get_device_properties; CPU: the host budget). Total, not
    free: every rank must choose the same mode (a context-parallel ring recomputed in the backward
    runs collectives), and the model is not on the device yet when the choice is made."""
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return host_memory_bytes()


def auto_checkpointing(cfg, vocab_size: int, device, bf16: bool) -> tuple[str, str]:
    """(mode, reason line) for train.activation_checkpointing=auto on `device`."""
    import torch
    cuda = torch.device(device).type == "cuda"
    return choose_checkpointing(estimate_peak(cfg, vocab_size, bf16), device_memory_bytes(device),
                                host_memory_bytes(), cuda)
