"""A GPT like the paper's (a modded-nanogpt variant), readable top to bottom.

RMSNorm on the embeddings, before attention and MLP and at the output; QK-norm; squared-ReLU MLP;
untied output head. Every token carries its absolute position and document id: the forward takes
`positions` (B, N) and `doc_ids` (B, N) with the tokens, and the attention reads them through an
injected `attend(q, k, v, q_pos, k_pos, q_seg, k_seg)` callable, which sequence parallelism swaps
for a distributed one (scaleinv_dist.parallel.apply_cp). Nothing here imports torch.distributed.
Each block is two halves around that call, which `compile_model` compiles (train.compile, CUDA);
the attention itself always runs eagerly, whatever it is.

Positional schemes (AttentionConfig.position): rope, p_rope (RoPE on a fraction of the channel
pairs, frequencies 1 .. 1/p_rope_base; the rest carry no position), nope, alibi.
Logit transforms (AttentionConfig.transform): scale_invariant, none, logn (q scaled by a learned
per-head s times log(q_pos + 1), the paper's LogN baseline).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import memory
from .attention import scale_invariant_attention
from .config import AttentionConfig, ModelConfig
from .device import computes_in_bf16
from .loss import chunked_cross_entropy
from .offload import HostOffload
from .transform import alibi_slopes

Attend = Callable[..., torch.Tensor]


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],))


def rotary_inv_freq(head_dim: int, cfg: AttentionConfig) -> torch.Tensor | None:
    """Angular frequencies (radians per token), shape (head_dim // 2,) float64, or None (no RoPE).

    rope: base^(-2i/D). p_rope: round(fraction * D/2) pairs with frequencies spaced geometrically
    from 1 down to 1/p_rope_base, the remaining pairs frequency 0 (position-free channels).
    """
    half = head_dim // 2
    if cfg.position == "rope":
        return cfg.rope_base ** (-torch.arange(half, dtype=torch.float64) / half)
    if cfg.position == "p_rope":
        n_rot = round(cfg.p_rope_fraction * half)
        freqs = torch.zeros(half, dtype=torch.float64)
        if n_rot:
            freqs[:n_rot] = (1.0 / cfg.p_rope_base) ** torch.linspace(0, 1, n_rot, dtype=torch.float64)
        return freqs
    return None


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B, 1, N, D/2) from absolute positions (B, N), computed in float64."""
    angles = positions.to(torch.float64)[:, None, :, None] * inv_freq.to(positions.device)
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x (B, H, N, D) by the angles in cos/sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def autocast_dtype(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """xs in autocast's dtype when autocast is on (as SDPA does), else unchanged.

    Under autocast, rms_norm and the float32 rotary tables leave q, k in float32 while v is bf16;
    the fused kernel takes one 16-bit dtype, so cast here rather than fall back to a slower backend.
    """
    device = xs[0].device.type
    if not torch.is_autocast_enabled(device):
        return xs
    dtype = torch.get_autocast_dtype(device)
    return tuple(x.to(dtype) for x in xs)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, attn: AttentionConfig, train_seq_len: int):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.head_dim or cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=False)
        self.logn = attn.transform == "logn"
        if self.logn:  # s * log(N): s learned per head, initialised so that s log(L_train) = 1
            self.logn_scale = nn.Parameter(torch.full((self.n_head,), 1.0 / math.log(train_seq_len)))

    def heads(self, x, rotary, positions):
        """q (B, Hq, N, D), k, v (B, Hkv, N, D) from the normalised block input x (B, N, d_model):
        QK-norm, rotary, LogN scaling, and autocast's dtype for all three."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], -1
        )
        q = rms_norm(q.view(b, n, self.n_head, self.head_dim)).transpose(1, 2)
        k = rms_norm(k.view(b, n, self.n_kv_head, self.head_dim)).transpose(1, 2)
        v = v.view(b, n, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if self.logn:
            n_visible = torch.log1p(positions.to(q.dtype))[:, None, :, None]  # log(q_pos + 1)
            q = q * (self.logn_scale.to(q.dtype)[None, :, None, None] * n_visible)
        return autocast_dtype(q, k, v)

    def out(self, y):
        """The output projection of the attention result y (B, Hq, N, D) -> (B, N, d_model)."""
        b, _, n, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


MAX_HIDDEN_ELEMENTS = 2**30  # MLP hidden activation per chunk (elements)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, hidden, bias=False)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x):
        """x (B, N, d_model). Long sequences go through in token chunks so that the hidden
        activation never exceeds MAX_HIDDEN_ELEMENTS (at 1M tokens a (N, 4 d_model) bf16 tensor has
        more than 2^31 elements, past what some CUDA kernels index; it is also 6 GiB)."""
        hidden = self.fc.out_features
        if x.shape[0] * x.shape[1] * hidden <= MAX_HIDDEN_ELEMENTS:
            return self.proj(F.relu(self.fc(x)).square())
        step = max(1, MAX_HIDDEN_ELEMENTS // (x.shape[0] * hidden))
        return torch.cat([self.proj(F.relu(self.fc(c)).square()) for c in x.split(step, dim=1)], 1)


class Block(nn.Module):
    """x + attention(norm(x)), then x + MLP(norm(x)).

    The attention call sits between two halves, `pre` (norm, QKV, QK-norm, rotary) and `post`
    (output projection, residual, MLP, residual), which `compile_model` compiles; the attention
    itself runs eagerly in between, so whatever `attend` is (fused kernel, FlexAttention, the
    context-parallel ring) is never traced.
    """

    def __init__(self, cfg: ModelConfig, attn: AttentionConfig, train_seq_len: int):
        super().__init__()
        self.attn = Attention(cfg, attn, train_seq_len)
        self.mlp = MLP(cfg)
        self.checkpoint_mlp = False  # "selective" activation checkpointing
        self.checkpoint_halves = False  # "full" / "offload": halves recomputed in token chunks

    def pre(self, x, rotary, positions):
        return self.attn.heads(rms_norm(x), rotary, positions)

    def post(self, x, y):
        x = x + self.attn.out(y)
        if self.checkpoint_mlp and torch.is_grad_enabled():
            return x + checkpoint(self._mlp, x, use_reentrant=False)
        return x + self._mlp(x)

    def _mlp(self, x):
        return self.mlp(rms_norm(x))

    def forward(self, x, rotary, positions, doc_ids, attend):
        """x (B, N, d_model) -> (B, N, d_model); rotary (cos, sin) (B, 1, N, D/2) or None."""
        if self.checkpoint_halves and torch.is_grad_enabled():
            return self._forward_in_checkpointed_chunks(x, rotary, positions, doc_ids, attend)
        q, k, v = self.pre(x, rotary, positions)
        return self.post(x, attend(q, k, v, positions, positions, doc_ids, doc_ids))

    def _forward_in_checkpointed_chunks(self, x, rotary, positions, doc_ids, attend):
        """forward, with `pre` and `post` each run on token chunks of at most
        memory.RECOMPUTE_CHUNK_TOKENS tokens (all rows together) under activation checkpointing.

        Used by full / offload, whose recompute of a whole block would otherwise keep every
        intermediate of both halves for the whole sequence (about 36 KB per token at width 768,
        measured on CPU: 70 GiB at 2M tokens). This way the block keeps its input and what the
        attention saves (q, k, v, out), and the backward holds one chunk's intermediates at a time;
        each half is computed once more (a few percent of a step at these lengths, where attention
        dominates)."""
        step = max(1, memory.RECOMPUTE_CHUNK_TOKENS // x.shape[0])
        spans = [(s, min(s + step, x.shape[1])) for s in range(0, x.shape[1], step)]

        def rotary_span(s, e):
            return None if rotary is None else tuple(t[:, :, s:e] for t in rotary)

        heads = [checkpoint(self.pre, x[:, s:e], rotary_span(s, e), positions[:, s:e], use_reentrant=False)
                 for s, e in spans]
        q, k, v = (torch.cat(parts, dim=2) for parts in zip(*heads))
        del heads
        y = attend(q, k, v, positions, positions, doc_ids, doc_ids)
        return torch.cat([checkpoint(self.post, x[:, s:e], y[:, :, s:e], use_reentrant=False)
                          for s, e in spans], dim=1)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, attn: AttentionConfig, train_seq_len: int,
                 loss_chunk_tokens: int = 8192):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (0 means: take it from the tokenizer)")
        self.cfg, self.attn_cfg = cfg, attn
        self.loss_chunk_tokens = loss_chunk_tokens
        self.loss_compile_backend: str | None = None  # set by compile_model
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, attn, train_seq_len) for _ in range(cfg.n_layer))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        head_dim = cfg.head_dim or cfg.d_model // cfg.n_head
        # float64 and deliberately not a buffer: model.to(bfloat16) must not round the frequencies
        # (at position 1e5 a bf16-rounded frequency is off by hundreds of radians)
        self.inv_freq = rotary_inv_freq(head_dim, attn)
        slopes = alibi_slopes(cfg.n_head) if attn.position == "alibi" else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        self.activation_checkpointing = "none"  # the mode in force (never "auto")
        self.checkpoint_blocks = False  # "full" / "offload" activation checkpointing
        self.offload_checkpoints = False  # "offload": block inputs wait in host memory
        self.attend: Attend = self.local_attend
        self._init_weights(cfg)

    def _init_weights(self, cfg: ModelConfig) -> None:
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = cfg.init_std / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else cfg.init_std
                nn.init.normal_(p, mean=0.0, std=std)

    def attention_options(self) -> dict:
        """The attention function's keyword options (shared with distributed attention)."""
        a = self.attn_cfg
        transform = "scale_invariant" if a.transform == "scale_invariant" else (
            "alibi" if a.position == "alibi" else "none")
        return dict(transform=transform, tau=a.tau, backend=a.backend, alibi_slopes=self.alibi_slopes)

    def local_attend(self, q, k, v, q_pos, k_pos, q_seg, k_seg):
        return scale_invariant_attention(q, k, v, q_pos, k_pos, q_seg=q_seg, k_seg=k_seg,
                                         **self.attention_options())

    def set_activation_checkpointing(self, mode: str) -> None:
        """none | selective (recompute the MLPs) | full (recompute whole blocks; inside a block's
        recompute, its two halves are recomputed once more, in token chunks: Block.
        _forward_in_checkpointed_chunks) | offload (full, with each block's input kept in pinned
        host memory until its backward: the longest sequences). `auto` is resolved before this call
        (resolve_auto_checkpointing)."""
        if mode not in memory.MODES:
            raise ValueError(f"activation checkpointing mode {mode!r}: choose one of "
                             f"{', '.join(memory.MODES)} (resolve auto with resolve_auto_checkpointing)")
        self.activation_checkpointing = mode
        self.checkpoint_blocks = mode in ("full", "offload")
        self.offload_checkpoints = mode == "offload"
        for block in self.blocks:
            block.checkpoint_mlp = mode == "selective"
            block.checkpoint_halves = self.checkpoint_blocks

    def hidden_states(self, tokens, positions, doc_ids=None):
        """Final normalised hidden states (B, N, d_model) for tokens/positions/doc_ids (B, N)."""
        if tokens.shape != positions.shape:
            raise ValueError(f"positions {tuple(positions.shape)} must match tokens {tuple(tokens.shape)}")
        recompute = self.checkpoint_blocks and torch.is_grad_enabled()  # full / offload
        # recomputed, the embedding keeps only the tokens, not the norm's fp32 input (6 GiB at 2M
        # tokens of width 768)
        x = checkpoint(self._embed, tokens, use_reentrant=False) if recompute else self._embed(tokens)
        rotary = None
        if self.inv_freq is not None:
            if self.inv_freq.device != positions.device:  # once, not a blocking host copy per step
                self.inv_freq = self.inv_freq.to(positions.device)
            rotary = rotary_tables(positions, self.inv_freq, x.dtype)
        for block in self.blocks:
            if recompute:
                # offload: the reentrant form keeps its inputs through save_for_backward, which the
                # HostOffload hooks move to host memory (the non-reentrant form keeps them on GPU)
                offload = self.offload_checkpoints
                with HostOffload(pin_memory=x.is_cuda) if offload else contextlib.nullcontext():
                    x = checkpoint(block, x, rotary, positions, doc_ids, self.attend,
                                   use_reentrant=offload)
            else:
                x = block(x, rotary, positions, doc_ids, self.attend)
        return rms_norm(x)

    def _embed(self, tokens):
        return rms_norm(self.wte(tokens))

    def forward(self, tokens, positions, doc_ids=None, labels=None):
        """Logits (B, N, V), or with labels (B, N; loss.IGNORE_INDEX ignored) the pair (loss_sum fp32, n_tokens)."""
        h = self.hidden_states(tokens, positions, doc_ids)
        if labels is None:
            return self.lm_head(h)
        return chunked_cross_entropy(h, self.lm_head.weight, labels, self.loss_chunk_tokens,
                                     self.loss_compile_backend)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul parameters + causal attention 7 * L * N * H * D.

        Attention counts forward 4 * N^2 * H * D / 2 per layer and sequence (causal) and backward 2.5x
        forward, the convention of benchmarks/attention.py.
        """
        head_dim = self.cfg.head_dim or self.cfg.d_model // self.cfg.n_head
        attn = 7.0 * self.cfg.n_layer * seq_len * self.cfg.n_head * head_dim
        return 6.0 * self.num_params(non_embedding=True) + attn


def compile_model(model: GPT, backend: str = "inductor") -> GPT:
    """torch.compile each block's two halves around its attention call, and the loss's per-chunk
    softmax / gradient arithmetic (in place; parameter names and the state dict are unchanged).
    The attention runs eagerly between the compiled halves, so `model.attend` stays swappable
    (apply_cp) before or after this call, and activation checkpointing (applied around or inside
    the halves) keeps working. Returns the model."""
    for block in model.blocks:
        block.pre = torch.compile(block.pre, backend=backend)
        block.post = torch.compile(block.post, backend=backend)
    model.loss_compile_backend = backend
    return model


def compile_wanted(cfg, device) -> bool:
    """train.compile on CUDA: never on CPU (compile time dominates a small CPU run), under
    TRITON_INTERPRET (kernels interpreted on the CPU) or with ZeRO-3 (its parameter gathering hooks
    into every submodule call, which compiled code would trace)."""
    return (cfg.train.compile and torch.device(device).type == "cuda" and cfg.train.zero_stage < 3
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


def resolve_auto_checkpointing(cfg, vocab_size: int, device) -> str:
    """train.activation_checkpointing=auto as a mode: without a training device (evaluation, export,
    generation build models that never train) `none`; else the cheapest mode whose estimated peak
    memory fits the device (scaleinv_dist.memory), with one line saying why, printed by rank 0."""
    if device is None:
        return "none"
    bf16 = computes_in_bf16(cfg.run.dtype, torch.device(device).type)
    mode, reason = memory.auto_checkpointing(cfg, vocab_size, device, bf16)
    if os.environ.get("RANK", "0") == "0":
        print(reason, flush=True)
    return mode


def build_model(cfg, vocab_size: int | None = None, device=None) -> GPT:
    """A GPT from a full Config; vocab_size fills model.vocab_size when that is 0. With the device
    it will train on, the blocks are compiled when compile_wanted (compilation itself happens at the
    first forward) and train.activation_checkpointing=auto picks its mode (else `none`)."""
    mcfg = cfg.model
    if vocab_size is not None and mcfg.vocab_size == 0:
        mcfg = type(mcfg)(**{**mcfg.__dict__, "vocab_size": vocab_size})
    model = GPT(mcfg, cfg.attention, cfg.train.seq_len, cfg.train.loss_chunk_tokens)
    mode = cfg.train.activation_checkpointing
    model.set_activation_checkpointing(
        resolve_auto_checkpointing(cfg, mcfg.vocab_size, device) if mode == "auto" else mode)
    if device is not None and compile_wanted(cfg, device):
        compile_model(model)
    return model
