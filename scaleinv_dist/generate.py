"""Incremental decoding with a KV cache, for every positional scheme and logit transform.

    model, cfg, folder = load_model("runs/tiny")                  # eval mode; bf16 on GPU, fp32 on CPU
    out = generate(model, [[5, 17, 42], [9, 3]], max_new_tokens=32)   # new tokens per prompt (greedy)

The decoder reuses the model's own submodules (Attention.qkv / proj, QK-norm, rotary tables, MLP,
head) and the public `scale_invariant_attention`, so there is no second copy of the maths. Every
token carries its absolute position: a decoded query at position p attends to the cached keys with
their own positions, t = p - k_pos, so the scale-invariant transform, ALiBi and the LogN scale
(which uses the query's position) need no special case for decoding.

Batched prompts of different lengths are right-aligned (left-padded) in one cache: every row
appends at the same cache slot, while positions are per row (0 .. len_i - 1 for the prompt, then
len_i, len_i + 1, ...). Padding slots get document id -1 and real tokens 0, so padding keys are
invisible to every real query through the attention's q_seg / k_seg masking.

Prefill runs the model's configured attention backend (auto: the fused Triton kernel on CUDA when
it is available, else FlexAttention; reference on CPU); single-token decode steps use the chunked
reference backend by default (one query row: no kernel launch tuning and no FlexAttention
recompilation as the cache grows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .attention import scale_invariant_attention
from .device import resolve_device
from .model import GPT, apply_rotary, rms_norm, rotary_tables
from .run_dir import IncompatibleCheckpointError, load_trained_model  # noqa: F401 (re-exported)

PAD_SEG = -1  # document id of padding / unwritten cache slots (real tokens have 0)


class GenerationError(ValueError):
    """A user-facing generation mistake (empty prompt, too long, bad sampling settings)."""


# ----------------------------------------------------------------------------- loading
def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast parameters only: the float64 rotary frequencies and float32 ALiBi slopes stay exact."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def load_model(run_dir: str | Path, checkpoint: str | Path | None = None, *, device="auto",
               dtype: torch.dtype | None = None, overrides: Sequence[str] = ()):
    """(model in eval mode on device, config, checkpoint folder) from a run directory.

    run_dir.load_trained_model (IncompatibleCheckpointError when the checkpoint does not fit the
    config), then parameters cast to dtype: default bf16 on CUDA, fp32 on CPU.
    """
    model, cfg, folder = load_trained_model(run_dir, checkpoint, overrides)
    device = resolve_device(device)
    cast_parameters(model, dtype or default_dtype(device))
    return model.to(device).eval(), cfg, folder


# ----------------------------------------------------------------------------- the cache
class KVCache:
    """Per-layer keys/values (B, Hkv, max_len, D), key positions and document ids (B, max_len).

    Slots [0, length) are written; every row appends at the same slot. seg is -1 for padding and
    unwritten slots, 0 for real tokens.
    """

    def __init__(self, model: GPT, batch: int, max_len: int, device=None, dtype=None):
        p = next(model.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        attn = model.blocks[0].attn
        shape = (batch, attn.n_kv_head, max_len, attn.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in model.blocks]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in model.blocks]
        self.pos = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.seg = torch.full((batch, max_len), PAD_SEG, dtype=torch.long, device=device)
        self.batch, self.max_len, self.length = batch, max_len, 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def _attention_step(attn, x, rotary, positions, seg, cache: KVCache, layer: int, start: int,
                    opts: dict) -> torch.Tensor:
    """model.Attention.forward for new tokens x (B, n, d) against the cache (writes their k, v)."""
    b, n, _ = x.shape
    q, k, v = attn.qkv(x).split(
        [attn.n_head * attn.head_dim, attn.n_kv_head * attn.head_dim, attn.n_kv_head * attn.head_dim], -1)
    q = rms_norm(q.view(b, n, attn.n_head, attn.head_dim)).transpose(1, 2)
    k = rms_norm(k.view(b, n, attn.n_kv_head, attn.head_dim)).transpose(1, 2)
    v = v.view(b, n, attn.n_kv_head, attn.head_dim).transpose(1, 2)
    if rotary is not None:
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
    if attn.logn:  # the decoded query uses its own position
        q = q * (attn.logn_scale.to(q.dtype)[None, :, None, None]
                 * torch.log1p(positions.to(q.dtype))[:, None, :, None])
    end = start + n
    cache.k[layer][:, :, start:end] = k
    cache.v[layer][:, :, start:end] = v
    if start == 0:  # first chunk: attend to the fresh (contiguous) tensors
        keys, values, k_pos, k_seg = k, v, positions, seg
    else:
        keys, values = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
        k_pos, k_seg = cache.pos[:, :end], cache.seg[:, :end]
        if opts["backend"] != "reference":
            keys, values = keys.contiguous(), values.contiguous()
    y = scale_invariant_attention(q, keys, values, positions, k_pos, q_seg=seg, k_seg=k_seg, **opts)
    return attn.proj(y.transpose(1, 2).reshape(b, n, -1))


@torch.no_grad()
def forward_cached(model: GPT, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                   valid: torch.Tensor | None = None, *, backend: str | None = None,
                   all_logits: bool = False) -> torch.Tensor:
    """Run new tokens (B, n) at positions (B, n) through the model, appending them to the cache.

    valid (B, n) bool marks real tokens (False: padding, invisible to every real query).
    Returns logits (B, n, V) with all_logits, else those of the last column (B, V), in float32.
    backend None: the model's configured attention backend.
    """
    if tokens.shape != positions.shape or tokens.dim() != 2 or tokens.shape[0] != cache.batch:
        raise ValueError(f"tokens {tuple(tokens.shape)} and positions {tuple(positions.shape)} must "
                         f"both be (batch={cache.batch}, n)")
    n = tokens.shape[1]
    start = cache.length
    if start + n > cache.max_len:
        raise GenerationError(f"the KV cache holds {cache.max_len} tokens; {start} are used and "
                              f"{n} more were given")
    positions = positions.to(torch.long)
    seg = (torch.zeros_like(positions) if valid is None
           else torch.where(valid, 0, PAD_SEG).to(torch.long))
    cache.pos[:, start:start + n] = positions
    cache.seg[:, start:start + n] = seg
    opts = model.attention_options()
    if backend is not None:
        opts["backend"] = backend
    x = rms_norm(model.wte(tokens))
    rotary = None if model.inv_freq is None else rotary_tables(positions, model.inv_freq, x.dtype)
    for i, block in enumerate(model.blocks):
        x = x + _attention_step(block.attn, rms_norm(x), rotary, positions, seg, cache, i, start, opts)
        x = x + block.mlp(rms_norm(x))
    cache.length = start + n
    h = rms_norm(x if all_logits else x[:, -1:])
    logits = model.lm_head(h).float()
    return logits if all_logits else logits[:, -1]


def prefill(model: GPT, tokens: torch.Tensor, positions: torch.Tensor, valid=None, *,
            max_len: int | None = None, cache: KVCache | None = None, backend: str | None = None,
            chunk_size: int | None = None, all_logits: bool = False):
    """(logits, cache) after running a (padded) prompt batch through the model.

    A new cache of max_len slots (default: the prompt length) is made unless one is given. With
    chunk_size, the prompt goes through in chunks of that many tokens (bounded activation memory;
    each chunk attends to the cache). Logits: (B, V) of the last column, or (B, N, V) with all_logits.
    """
    if cache is None:
        cache = KVCache(model, tokens.shape[0], max_len or tokens.shape[1])
    step = chunk_size or tokens.shape[1]
    outs = []
    for s in range(0, tokens.shape[1], step):
        sl = slice(s, s + step)
        outs.append(forward_cached(model, tokens[:, sl], positions[:, sl], cache,
                                   None if valid is None else valid[:, sl],
                                   backend=backend, all_logits=all_logits))
    return (torch.cat(outs, 1) if all_logits else outs[-1]), cache


def decode_step(model: GPT, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, *,
                backend: str | None = "reference") -> torch.Tensor:
    """Logits (B, V) float32 for one new token per row (tokens, positions: (B,)), appended to the cache."""
    return forward_cached(model, tokens.view(-1, 1), positions.view(-1, 1), cache, backend=backend)


# ----------------------------------------------------------------------------- sampling
def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): greedy at temperature 0, else nucleus sampling.

    top_p keeps the smallest set of most likely tokens whose probability reaches top_p (always at
    least the most likely one, so top_p -> 0 is greedy).
    """
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        before = sorted_p.cumsum(-1) - sorted_p  # probability mass strictly before each token
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the first token is always kept
        choice = torch.multinomial(sorted_p, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- generate
@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def check_prompts(prompts, vocab_size: int, max_new_tokens: int, max_length: int | None) -> None:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise GenerationError("prompts must be a non-empty list of token-id lists")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if len(p) == 0:
            raise GenerationError(f"prompt {i + 1} is empty: give at least one token (e.g. the BOS token)")
        if max_length is not None and len(p) + max_new_tokens > max_length:
            raise GenerationError(
                f"prompt {i + 1} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(p) + max_new_tokens} > the configured maximum of {max_length} tokens "
                f"(raise the maximum with --max-length / max_length=, or shorten the prompt)")
        bad = [t for t in p if not (0 <= int(t) < vocab_size)]
        if bad:
            raise GenerationError(f"prompt {i + 1} has token ids outside the vocabulary [0, {vocab_size}): "
                                  f"{bad[:5]}")


def pad_prompts(prompts, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-aligned (left-padded) tokens, positions, valid mask (B, Lmax) and lengths (B,)."""
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    width = int(lengths.max())
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
    col = torch.arange(width)
    pad = (width - lengths)[:, None]
    valid = col[None, :] >= pad
    positions = torch.where(valid, col[None, :] - pad, 0)
    return tokens.to(device), positions.to(device), valid.to(device), lengths.to(device)


@torch.no_grad()
def generate(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
             temperature: float = 0.0, top_p: float = 1.0, eos_id: int | None = None,
             seed: int = 0, stream: Callable[[int, int], None] | None = None,
             max_length: int | None = None, prefill_backend: str | None = None,
             decode_backend: str | None = "reference", prefill_chunk: int | None = None,
             stats: GenerationStats | None = None) -> list[list[int]]:
    """New tokens for each prompt (the prompt is not repeated), as lists of ints.

    prompts: lists of token ids (any lengths), or a (B, N) / (N,) integer tensor.

    temperature 0: greedy; otherwise softmax(logits / temperature) restricted to the top_p
    nucleus, sampled with a generator seeded by `seed` (same seed, same output). A row stops after
    emitting eos_id (which is included). stream(row, token) is called for each new token as soon
    as it is chosen. max_length bounds prompt + new tokens (GenerationError beyond it).
    prefill_backend None: the model's attention backend (auto: fused kernel on GPU).
    """
    if not (0.0 < top_p <= 1.0):
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0 or not math.isfinite(temperature):
        raise GenerationError(f"temperature must be >= 0, got {temperature}")
    if isinstance(prompts, torch.Tensor):  # (N,) one prompt or (B, N) equal-length prompts
        prompts = [prompts.tolist()] if prompts.dim() == 1 else prompts.tolist()
    check_prompts(prompts, model.cfg.vocab_size, max_new_tokens, max_length)
    prompts = [p.tolist() if isinstance(p, torch.Tensor) else [int(t) for t in p] for p in prompts]
    was_training = model.training
    model.eval()
    try:
        return _generate(model, prompts, max_new_tokens, temperature, top_p, eos_id, seed, stream,
                         prefill_backend, decode_backend, prefill_chunk, stats)
    finally:
        model.train(was_training)


def _generate(model, prompts, max_new_tokens, temperature, top_p, eos_id, seed, stream,
              prefill_backend, decode_backend, prefill_chunk, stats) -> list[list[int]]:
    import time

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens, positions, valid, lengths = pad_prompts(prompts, device)
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return out
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    logits, cache = prefill(model, tokens, positions, valid, max_len=tokens.shape[1] + max_new_tokens,
                            backend=prefill_backend, chunk_size=prefill_chunk)
    sync()
    t1 = time.perf_counter()
    done = [False] * len(prompts)
    n_new = 0
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)
        for row, tok in enumerate(nxt.tolist()):
            if done[row]:
                continue
            out[row].append(tok)
            n_new += 1
            done[row] = eos_id is not None and tok == eos_id
            if stream is not None:
                stream(row, tok)
        if all(done) or step == max_new_tokens - 1:
            break
        logits = decode_step(model, cache, nxt, lengths + step, backend=decode_backend)
    sync()
    if stats is not None:
        stats.prompt_tokens += int(lengths.sum())
        stats.new_tokens += n_new
        stats.prefill_s += t1 - t0
        stats.decode_s += time.perf_counter() - t1
    return out
