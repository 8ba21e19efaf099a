"""A short fine-tune on synthetic needle tasks, as in the paper (App. G.2) before scoring retrieval.

Contexts of the training length with needles at uniformly random depths; the loss is on the answer
tokens only. Plain torch AdamW in this process, schedule warmup / constant / linear decay in thirds
(the paper: 100 / 100 / 100 of 300 steps). The model is changed in place.

Optionally each step also takes one batch of ordinary language-model windows (`lm_batches`, e.g.
the training loader continued past the windows pretraining consumed, so no token repeats) and
minimises the sum of both mean losses: the model keeps its language modelling while it learns
the task.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

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
                        progress: bool = True, lm_batches: Iterator | None = None) -> list[float]:
    """Fine-tune `model` in place; returns the per-step answer-token losses (nats/token).

    lm_batches: optional iterator of data.Batch (tokens, labels, positions, doc_ids); the first
    batch_size rows of one are added to every step's loss (see the module docstring).
    """
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
        task_loss = loss
        if lm_batches is not None:  # as many LM rows as task rows
            lm = next(lm_batches)
            lm = type(lm)(*(t[:batch_size] for t in (lm.tokens, lm.labels, lm.positions, lm.doc_ids))).to(device)
            with autocast(device):
                lm_sum, lm_n = model(lm.tokens, lm.positions, lm.doc_ids, lm.labels)
            loss = loss + lm_sum / lm_n.clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        value = float(task_loss.detach())
        losses.append(value if math.isfinite(value) else float("nan"))
        if progress and hasattr(it, "set_postfix"):
            it.set_postfix(loss=f"{value:.3f}")
    model.eval()
    return losses


def finetune_until(model, builder: NeedleBuilder, length: int, steps: int, lr: float,
                   probe: Callable[[], float], target: float | None, max_steps: int,
                   **kwargs) -> tuple[list[float], list[float]]:
    """Rounds of `finetune_on_needles(steps)` (each a full warmup / constant / decay schedule)
    until `probe()` (accuracy in [0, 1] on contexts that are not scored) reaches `target`, or
    `max_steps` have run; target None: one round. Returns (per-step losses, probe after each round).

    The rule is the same for every model, so methods that learn the task slowly get more steps,
    and none is scored before it can do the task at the fine-tune length.
    """
    losses, probes = [], []
    while True:
        losses += finetune_on_needles(model, builder, length, steps, lr, **kwargs)
        if target is None:
            return losses, probes
        probes.append(float(probe()))
        if probes[-1] >= target or len(losses) + steps > max_steps:
            return losses, probes


def unseen_train_batches(bundle, checkpoint) -> Iterator:
    """The run's training loader (bundle.train_loader) continued from where pretraining stopped at
    `checkpoint` (its rank-0 loader state), so the fine-tune's LM batches are tokens the model has
    not seen; from the start of the order when the checkpoint has no loader state."""
    from pathlib import Path

    from ..train.checkpoint import load_state_files

    loader = bundle.train_loader
    try:
        state = load_state_files(Path(checkpoint), "rank_00000").get("loader")
    except Exception:  # an exported or foreign checkpoint: no data state
        state = None
    if state and [state.get(k) for k in ("n_windows", "seq_len", "dp_size")] == [
            loader.n_windows, loader.seq_len, loader.dp_size]:
        loader.epoch, loader.index = int(state["epoch"]), int(state["index"])
    return iter(loader)
