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

import functools

import torch

IGNORE_INDEX = -100  # a label that is not scored (cross_entropy's default ignore_index)


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on (as nn.Linear would run), else h's."""
    device = h.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype


def _chunks(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
            dtype: torch.dtype):
    """Yield (start, h chunk, weight, labels chunk, logits (T, V)) over token chunks, h, weight and
    the logits in `dtype` (the matmul dtype, `_compute_dtype`; explicit casts, autocast off for the
    matmul). hidden (T, d), weight (V, d)."""
    w = weight.to(dtype)
    step = max(1, int(chunk_tokens))
    for s in range(0, hidden.shape[0], step):
        hs = hidden[s:s + step].to(dtype)
        yield s, hs, w, labels[s:s + step], _matmul_t(hs, w)  # no local: the consumer frees it


def _matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T in the inputs' dtype, autocast off."""
    with torch.autocast(a.device.type, enabled=False):
        return a @ b.t()


def _token_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log-sum-exp - logit of the label, computed in float32 (float64 for float64 logits), 0 where
    y == IGNORE_INDEX. logits (T, V), y (T,) -> (T,)."""
    lf = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = y != IGNORE_INDEX
    target = lf.gather(1, torch.where(valid, y, 0)[:, None])[:, 0]
    with torch.autocast(logits.device.type, enabled=False):
        return torch.where(valid, torch.logsumexp(lf, dim=-1) - target, 0.0)


def _loss_and_dlogits(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and d loss / d logits = softmax - one_hot(y) (rows of ignored tokens 0), computed
    in float32 (float64 for float64 logits), the gradient returned in logits' dtype.

    logits (T, V), y (T,). Eager, the work happens in place on one float32 copy of the logits;
    compiled (`compiled_loss_and_dlogits`) it is two passes over the 16-bit logits."""
    lf = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = y != IGNORE_INDEX
    yc = torch.where(valid, y, 0)
    lse = torch.logsumexp(lf, dim=-1)
    loss = torch.where(valid, lse - lf.gather(1, yc[:, None])[:, 0], 0.0).sum()
    g = lf.sub_(lse[:, None]).exp_()
    g[torch.arange(g.shape[0], device=g.device), yc] -= 1
    return loss, g.mul_(valid[:, None]).to(logits.dtype)


@functools.lru_cache(maxsize=None)
def compiled_loss_and_dlogits(backend: str = "inductor"):
    """`_loss_and_dlogits` through torch.compile (static shapes: a full chunk and the last one)."""
    return torch.compile(_loss_and_dlogits, backend=backend, dynamic=False)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits = h @ weight.T; gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk_tokens, compile_backend):
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                             device=weight.device) if want_w else None
        fn = compiled_loss_and_dlogits(compile_backend) if compile_backend else _loss_and_dlogits
        total = None
        chunks = _chunks(h, weight, labels, chunk_tokens, _compute_dtype(h))
        with torch.autocast(h.device.type, enabled=False):  # explicit dtypes below
            for s, hs, w, y, logits in chunks:
                loss, g = fn(logits, y)
                del logits
                total = loss if total is None else total + loss
                if want_h:
                    grad_h[s:s + hs.shape[0]] = g @ w
                if want_w:
                    grad_w += (g.t() @ hs).to(grad_w.dtype)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        # scaled in place: no second tensor the size of the hidden states (6 GiB at 2M tokens)
        if getattr(ctx, "done", False):
            raise RuntimeError("the fused cross-entropy's backward runs once; retain_graph=True and "
                               "a second backward through it are not supported")
        ctx.done = True
        grad_h, grad_w = ctx.saved_tensors
        scale = (lambda g: None if g is None else g.mul_(grad_out.to(g.dtype)))  # noqa: E731
        return scale(grad_h), scale(grad_w), None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int = 8192, compile_backend: str | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token losses (fp32 scalar; fp64 for fp64 inputs) and the number of scored tokens
    (labels != IGNORE_INDEX).

    hidden (B, N, d), weight (V, d) the output head, labels (B, N) int64. Differentiable in hidden
    and weight (fused: gradients are formed chunk by chunk in the forward pass; no recompute).
    compile_backend (e.g. "inductor") compiles the per-chunk softmax / gradient arithmetic.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    n = (y != IGNORE_INDEX).sum()
    if h.shape[0] == 0:
        return hidden.new_zeros((), dtype=torch.float32), n
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(h, weight, y, chunk_tokens, compile_backend), n
    chunks = _chunks(h, weight, y, chunk_tokens, _compute_dtype(h))
    return sum(_token_losses(logits, ys).sum() for _, _, _, ys, logits in chunks), n


@torch.no_grad()
def token_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        chunk_tokens: int = 8192) -> torch.Tensor:
    """Cross-entropy of every token, labels' shape, float32, 0 where labels == IGNORE_INDEX.

    hidden (..., d), weight (V, d), labels (...) int64. Not differentiable (evaluation).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    out = torch.zeros(y.shape, dtype=torch.float32, device=hidden.device)
    for s, hs, _, ys, logits in _chunks(h, weight, y, chunk_tokens, _compute_dtype(h)):
        out[s:s + hs.shape[0]] = _token_losses(logits, ys)
    return out.view(labels.shape)
