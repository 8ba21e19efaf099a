"""Cross-entropy of the output head, chunked over tokens: the full (tokens x vocabulary) logits of
a long sequence never exist.

`chunked_cross_entropy` (training) is a fused linear + cross-entropy: each chunk's logits are
computed once, reduced to the loss and, when gradients are wanted, turned at once into that chunk's
gradients with respect to the hidden states and the head weight (d loss / d logits = softmax - one
hot). Backward only scales the stored gradients, so nothing is recomputed. Peak extra memory is
one chunk's logits (chunk_tokens x vocab, fp32) plus a gradient the size of the hidden states and
one the size of the weight (fp32).

`token_cross_entropy` (evaluation) gives every token's loss through the same chunked logits.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on (as nn.Linear would run), else h's."""
    device = h.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype


def _chunks(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int):
    """Yield (start, h chunk, labels chunk, logits (T, V), log-sum-exp (T,)) over token chunks.

    Logits are computed in the compute dtype (autocast's) and held in float32 (float64 when the
    inputs are float64); autocast is off inside, the casts are explicit. h (T, d), weight (V, d).
    """
    dtype = _compute_dtype(hidden)
    acc = torch.promote_types(dtype, torch.float32)
    w = weight.to(dtype)
    step = max(1, int(chunk_tokens))
    with torch.autocast(hidden.device.type, enabled=False):
        for s in range(0, hidden.shape[0], step):
            hs = hidden[s:s + step].to(dtype)
            logits = (hs @ w.t()).to(acc)
            yield s, hs, w, labels[s:s + step], logits, torch.logsumexp(logits, dim=-1)


def _token_losses(logits: torch.Tensor, lse: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """lse - logit of the label, 0 where y == IGNORE_INDEX; (T,) in logits' dtype."""
    valid = y != IGNORE_INDEX
    target = logits.gather(1, torch.where(valid, y, 0)[:, None])[:, 0]
    return torch.where(valid, lse - target, 0.0)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits = h @ weight.T; gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk_tokens):
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                             device=weight.device) if want_w else None
        total = None
        for s, hs, w, y, logits, lse in _chunks(h, weight, labels, chunk_tokens):
            loss = _token_losses(logits, lse, y).sum()
            total = loss if total is None else total + loss
            # d loss / d logits = softmax - one_hot(y), zero on ignored rows (in place on logits)
            valid = y != IGNORE_INDEX
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(g.shape[0], device=g.device), torch.where(valid, y, 0)] -= 1
            g = g.mul_(valid[:, None]).to(hs.dtype)
            if want_h:
                grad_h[s:s + hs.shape[0]] = g @ w
            if want_w:
                grad_w += (g.t() @ hs).to(grad_w.dtype)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        scale = (lambda g: None if g is None else g * grad_out.to(g.dtype))  # noqa: E731
        return scale(grad_h), scale(grad_w), None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token losses (fp32 scalar; fp64 for fp64 inputs) and the number of scored tokens
    (labels != IGNORE_INDEX).

    hidden (B, N, d), weight (V, d) the output head, labels (B, N) int64. Differentiable in hidden
    and weight (fused: gradients are formed chunk by chunk in the forward pass; no recompute).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    n = (y != IGNORE_INDEX).sum()
    if h.shape[0] == 0:
        return hidden.new_zeros((), dtype=torch.float32), n
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(h, weight, y, chunk_tokens), n
    total = sum(_token_losses(logits, lse, ys).sum()
                for _, _, _, ys, logits, lse in _chunks(h, weight, y, chunk_tokens))
    return total, n


@torch.no_grad()
def token_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        chunk_tokens: int = 8192) -> torch.Tensor:
    """Cross-entropy of every token, labels' shape, float32, 0 where labels == IGNORE_INDEX.

    hidden (..., d), weight (V, d), labels (...) int64. Not differentiable (evaluation).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    out = torch.zeros(y.shape, dtype=torch.float32, device=hidden.device)
    for s, hs, _, ys, logits, lse in _chunks(h, weight, y, chunk_tokens):
        out[s:s + hs.shape[0]] = _token_losses(logits, lse, ys)
    return out.view(labels.shape)
