"""Learning-rate schedules as a multiplier of each group's base lr, a function of the step.

`step` counts completed optimizer steps, so the k-th update (k = 0, 1, ...) uses lr * f(k):

    warmup     f = (k + 1) / warmup_steps for k < warmup_steps (never 0 on the first update)
    cosine     after warmup, min + (1 - min) * (1 + cos(pi * p)) / 2, p = (k - warmup) / (steps - warmup)
    wsd        1 (stable), then over the last cooldown_fraction * steps a linear decay:
               min + (1 - min) * (steps - k) / cooldown_steps  (1 at the first cooldown step)
    constant   1 after warmup

min = train.min_lr_ratio. `build_scheduler` wraps it in a LambdaLR, which DeepSpeed steps once per
optimizer step and saves in its checkpoint (its step counter and base lrs; the schedule's shape
always comes from the current config, so a resumed run may change train.steps).
"""
from __future__ import annotations

import math

import torch


class LRSchedule:
    """f(step) -> lr multiplier."""

    def __init__(self, kind: str, steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
                 cooldown_fraction: float = 0.0):
        if kind not in ("cosine", "wsd", "constant"):
            raise ValueError(f"unknown schedule {kind!r}; choose cosine, wsd or constant")
        self.kind, self.steps = kind, max(1, int(steps))
        self.warmup_steps = max(0, int(warmup_steps))
        self.min_lr_ratio = float(min_lr_ratio)
        self.cooldown_steps = int(round(cooldown_fraction * self.steps)) if kind == "wsd" else 0

    def __call__(self, step: int) -> float:
        warm = (step + 1) / self.warmup_steps if step < self.warmup_steps else 1.0
        lo = self.min_lr_ratio
        if self.kind == "cosine":
            span = max(1, self.steps - self.warmup_steps)
            p = min(1.0, max(0.0, (step - self.warmup_steps) / span))
            decay = lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p))
        elif self.kind == "wsd" and self.cooldown_steps > 0:
            start = self.steps - self.cooldown_steps
            decay = 1.0 if step < start else lo + (1 - lo) * max(0, self.steps - step) / self.cooldown_steps
        else:
            decay = 1.0
        return min(warm, decay)


def schedule_from_config(cfg) -> LRSchedule:
    t = cfg.train
    return LRSchedule(t.schedule, t.steps, t.warmup_steps, t.min_lr_ratio, t.cooldown_fraction)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = schedule_from_config(cfg)
    # a plain function (not the object) so that LambdaLR.state_dict() does not store the shape
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))


def reset_lrs(optimizer: torch.optim.Optimizer, scheduler, cfg) -> None:
    """After loading a checkpoint: base lrs from the current config, and the lr of the next step
    recomputed from the current schedule (the checkpoint stores the lrs of the run that wrote it)."""
    schedule = schedule_from_config(cfg)
    step = scheduler.last_epoch
    bases = []
    for group in optimizer.param_groups:
        base = cfg.train.muon_lr if group.get("use_muon") else cfg.train.lr
        group["initial_lr"] = base
        group["lr"] = base * schedule(step)
        bases.append(base)
    scheduler.base_lrs = bases
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
