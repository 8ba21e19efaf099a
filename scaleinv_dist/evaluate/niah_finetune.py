"""A short fine-tune on synthetic needle tasks, as in the paper (App. G.2) before scoring retrieval.

Contexts of the training length with needles at uniformly random depths; the loss is on the answer
tokens only. Plain torch AdamW in this process, schedule warmup / constant / linear decay in thirds
(the paper: 100 / 100 / 100 of 300 steps). The model is changed in place.
"""
from __future__ import annotations

import math

import torch

from ..loss import IGNORE_INDEX
from .common import autocast
from .niah import NeedleBuilder


def needle_batch(builder: NeedleBuilder, length: int, batch_size: int, n_needles: int):
    """(tokens, labels) of shape (B, length - 1): inputs and targets, IGNORE_INDEX except on the answer."""
    rows, labels = [], []
    for _ in range(batch_size):
        e = builder.build(length, float(builder.rng.uniform(0.0, 1.0)), n_needles=n_needles)
        inp, tgt = e.tokens[:-1], e.tokens[1:].clone()
        mask = torch.zeros_like(tgt, dtype=torch.bool)
        mask[e.answer_start - 1:] = True  # target index t predicts token t + 1
        tgt[~mask] = IGNORE_INDEX
        rows.append(inp)
        labels.append(tgt)
    return torch.stack(rows), torch.stack(labels)


def lr_factor(step: int, steps: int) -> float:
    """Warmup for the first third, constant for the second, linear decay to 0 in the last third."""
    third = max(1, steps // 3)
    if step < third:
        return (step + 1) / third
    if step < steps - third:
        return 1.0
    return max(0.0, (steps - step) / third)


def finetune_on_needles(model, builder: NeedleBuilder, length: int, steps: int, lr: float,
                        batch_size: int = 8, n_needles: int = 1, device="cpu",
                        weight_decay: float = 0.0, grad_clip: float = 1.0,
                        progress: bool = True) -> list[float]:
    """Fine-tune `model` in place; returns the per-step answer-token losses (nats/token)."""
    device = torch.device(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="needle fine-tune", unit="step", leave=False, dynamic_ncols=True, disable=None)
    losses = []
    for _ in it:
        tokens, labels = needle_batch(builder, length, batch_size, n_needles)
        tokens, labels = tokens.to(device), labels.to(device)
        positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        doc_ids = torch.zeros_like(tokens)
        with autocast(device):
            loss_sum, n = model(tokens, positions, doc_ids, labels)
        loss = loss_sum / n.clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        value = float(loss.detach())
        losses.append(value if math.isfinite(value) else float("nan"))
        if progress and hasattr(it, "set_postfix"):
            it.set_postfix(loss=f"{value:.3f}")
    model.eval()
    return losses
