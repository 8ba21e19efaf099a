"""A scaleinv_dist GPT for Hugging Face transformers (remote code): standalone, plain PyTorch.

Imports only torch and transformers. Written by scaleinv_dist/export_hf.py next to the weights;
load with

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

The forward is the training model's (scaleinv_dist/model.py) with a reference attention that
materialises the (B, H, N_query, N_key) logits: simple and portable, O(N^2) memory, no fused kernel
and no sequence parallelism. Every token has an absolute position; for a query at position i and a
key at position j <= i, t = i - j and S = q.k / sqrt(D):

    scale_invariant   L = sqrt(1 + 2 log(1 + t/tau)) S - 2 log(1 + t/tau)
    none / logn       L = S                 (logn: q scaled by s_h log(i + 1) beforehand)
    alibi             L = S - slope_h t

Positions: `position_ids` if given, else derived from `attention_mask` (cumsum - 1, so left
padding works), else 0 .. N-1 (continuing after the cached tokens). With a cache (transformers'
DynamicCache), the cached keys' positions are derived the same way from the mask (or are
0 .. past-1): pass an attention_mask when you pass custom position_ids with a cache.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers >= 4.50 no longer mixes generation into every PreTrainedModel
    from transformers.generation import GenerationMixin
except ImportError:  # pragma: no cover
    from transformers.generation.utils import GenerationMixin
try:
    from transformers.cache_utils import DynamicCache
except ImportError:  # pragma: no cover
    DynamicCache = None

from .configuration_scaleinv import ScaleInvConfig

_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],))


def rotary_inv_freq(config: ScaleInvConfig) -> torch.Tensor | None:
    """Angular frequencies (head_dim // 2,) float64, or None (no rotary embedding)."""
    half = config.head_dim // 2
    if config.position == "rope":
        return config.rope_base ** (-torch.arange(half, dtype=torch.float64) / half)
    if config.position == "p_rope":
        n_rot = round(config.p_rope_fraction * half)
        freqs = torch.zeros(half, dtype=torch.float64)
        if n_rot:
            freqs[:n_rot] = (1.0 / config.p_rope_base) ** torch.linspace(0, 1, n_rot, dtype=torch.float64)
        return freqs
    return None


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's geometric head slopes (Press et al. 2021), (n_heads,) float32."""
    def power_of_two(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def apply_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def reference_attention(q, k, v, q_pos, k_pos, k_valid, *, transform: str, tau: float, slopes=None):
    """q (B, H, Nq, D), k/v (B, Hkv, Nk, D), positions (B, N) int, k_valid (B, Nk) bool -> (B, H, Nq, D).

    Causal by position (key visible when k_pos <= q_pos and valid); fp32 (fp64 for fp64 input)
    logits, materialised. A query that sees no key gets zeros.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * q.shape[-1] ** -0.5
    diff = q_pos[:, :, None].long() - k_pos[:, None, :].long()  # (B, Nq, Nk)
    visible = (diff >= 0) & k_valid[:, None, :]
    t = diff.clamp_min(0).to(acc)[:, None]  # (B, 1, Nq, Nk)
    if transform == "scale_invariant":
        g = torch.log1p(t / tau)
        scores = torch.sqrt(1.0 + 2.0 * g) * scores - 2.0 * g
    elif transform == "alibi":
        scores = scores - slopes.to(device=q.device, dtype=acc)[None, :, None, None] * t
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key: zeros
    return torch.matmul(probs, v.to(acc)).to(q.dtype)


class ScaleInvAttention(nn.Module):
    def __init__(self, config: ScaleInvConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                      config.head_dim)
        self.qkv = nn.Linear(config.hidden_size, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=False)
        self.logn = config.transform == "logn"
        if self.logn:
            self.logn_scale = nn.Parameter(torch.full((self.n_head,), 1.0 / math.log(config.train_seq_len)))

    def forward(self, x, rotary, q_pos, k_pos, k_valid, cache, layer_idx, attn_opts):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], -1)
        q = rms_norm(q.view(b, n, self.n_head, self.head_dim)).transpose(1, 2)
        k = rms_norm(k.view(b, n, self.n_kv_head, self.head_dim)).transpose(1, 2)
        v = v.view(b, n, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if self.logn:  # s_h * log(q_pos + 1), the query's own position
            q = q * (self.logn_scale.to(q.dtype)[None, :, None, None]
                     * torch.log1p(q_pos.to(q.dtype))[:, None, :, None])
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        y = reference_attention(q, k, v, q_pos, k_pos, k_valid, **attn_opts)
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


class ScaleInvMLP(nn.Module):
    def __init__(self, config: ScaleInvConfig):
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)).square())


class ScaleInvBlock(nn.Module):
    def __init__(self, config: ScaleInvConfig):
        super().__init__()
        self.attn = ScaleInvAttention(config)
        self.mlp = ScaleInvMLP(config)

    def forward(self, x, *attn_args):
        x = x + self.attn(rms_norm(x), *attn_args)
        return x + self.mlp(rms_norm(x))


class ScaleInvPreTrainedModel(PreTrainedModel):
    config_class = ScaleInvConfig
    base_model_prefix = "scaleinv"
    _no_split_modules = ["ScaleInvBlock"]
    supports_gradient_checkpointing = False
    _supports_cache_class = True
    _supports_static_cache = False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, ScaleInvAttention) and module.logn:
            nn.init.constant_(module.logn_scale, 1.0 / math.log(self.config.train_seq_len))


class ScaleInvForCausalLM(ScaleInvPreTrainedModel, GenerationMixin):
    """Parameter names match scaleinv_dist's GPT: wte, blocks.{i}.attn.qkv/proj(/logn_scale),
    blocks.{i}.mlp.fc/proj, lm_head."""

    def __init__(self, config: ScaleInvConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(ScaleInvBlock(config) for _ in range(config.num_hidden_layers))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _attention_options(self, device):
        c = self.config
        transform = "scale_invariant" if c.transform == "scale_invariant" else (
            "alibi" if c.position == "alibi" else "none")
        slopes = alibi_slopes(c.num_attention_heads).to(device) if transform == "alibi" else None
        return dict(transform=transform, tau=float(c.tau), slopes=slopes)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                return_dict=None, logits_to_keep=0, **kwargs):
        """Logits (B, N, V); with labels (B, N; -100 ignored), also the mean next-token loss
        (labels are shifted inside, as in transformers' causal LMs)."""
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        b, n = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if cache is None and use_cache and DynamicCache is not None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        total = past + n

        # key validity and positions over past + current tokens
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] == total:
            mask = attention_mask.to(device).bool()
            derived = (mask.long().cumsum(-1) - 1).clamp_min(0)
        else:
            mask = torch.ones(b, total, dtype=torch.bool, device=device)
            derived = torch.arange(total, device=device).expand(b, total)
        q_pos = position_ids.to(device).long().expand(b, n) if position_ids is not None else derived[:, past:]
        k_pos = torch.cat([derived[:, :past], q_pos], dim=1)

        x = rms_norm(inputs_embeds)
        inv_freq = rotary_inv_freq(self.config)
        rotary = None
        if inv_freq is not None:
            angles = q_pos.to(torch.float64)[:, None, :, None] * inv_freq.to(device)
            rotary = torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)
        opts = self._attention_options(device)
        for i, block in enumerate(self.blocks):
            x = block(x, rotary, q_pos, k_pos, mask, cache, i, opts)
        h = rms_norm(x)
        if logits_to_keep and labels is None:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].to(device).reshape(-1), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
        return out if return_dict is not False else out.to_tuple()
