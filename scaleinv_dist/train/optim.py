"""Optimizers: AdamW with weight-decay groups, and Muon for the hidden matrices (+ AdamW for the rest).

Both are plain `torch.optim.Optimizer`s that DeepSpeed takes as client optimizers
(`deepspeed.initialize(optimizer=...)`). Both honour `optimizer.skip_updates = True`: `step()` then
leaves parameters and optimizer state untouched (the training loop's nan_policy=skip sets it for one
step; DeepSpeed's ZeRO wrappers call the inner `step()` once per parameter group, so the flag is a
plain attribute that the loop resets, not a one-shot).

Muon (Jordan et al. 2024; the paper's optimizer for hidden matrices): SGD momentum (0.95, Nesterov)
whose update is orthogonalised by a quintic Newton-Schulz iteration, scaled by
sqrt(max(1, rows / cols)). It needs each 2-D matrix whole, so it runs with ZeRO stage 0 only:
ZeRO 1-3 hand the client optimizer flattened 1-D partitions.
"""
from __future__ import annotations

import torch
from torch import nn

NO_DECAY_NAMES = ("norm", "gain", "scale", "bias")  # substrings of a parameter's own name


def _is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """2-D weights of the transformer blocks (not the embedding or the output head)."""
    return p.dim() == 2 and not (name.startswith("wte.") or name.startswith("lm_head."))


def _decays(name: str, p: torch.Tensor) -> bool:
    """Weight decay applies to matrices only: never to 1-D params, norms, gains, biases."""
    own = name.rsplit(".", 1)[-1] if not name.endswith(".weight") else name.rsplit(".", 2)[-2]
    return p.dim() >= 2 and not any(s in own for s in NO_DECAY_NAMES)


def adamw_param_groups(named_params, lr: float, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in named_params:
        if p.requires_grad:
            (decay if _decays(name, p) else no_decay).append(p)
    groups = [dict(params=decay, lr=lr, weight_decay=weight_decay, name="adamw_decay"),
              dict(params=no_decay, lr=lr, weight_decay=0.0, name="adamw_no_decay")]
    return [g for g in groups if g["params"]]


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW with `skip_updates` (see module docstring)."""

    skip_updates = False

    def step(self, closure=None):
        if self.skip_updates:
            return None
        return super().step(closure)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise a matrix (U S V^T -> ~U V^T), Keller Jordan's quintic iteration.

    bf16 on CUDA (as in modded-nanogpt), float32 elsewhere; deterministic for a given device.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.t()
    x = x / (x.norm() + eps)
    for _ in range(steps):
        s = x @ x.t()
        x = a * x + (b * s + c * s @ s) @ x
    return (x.t() if transposed else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups with use_muon=True, AdamW for the others; one optimizer for DeepSpeed.

    Muon groups: lr, momentum, nesterov, weight_decay. AdamW groups: lr, betas, eps, weight_decay.
    """

    skip_updates = False

    def __init__(self, param_groups: list[dict], momentum: float = 0.95, nesterov: bool = True,
                 betas=(0.9, 0.95), eps: float = 1e-8, ns_steps: int = 5):
        defaults = dict(lr=0.02, momentum=momentum, nesterov=nesterov, betas=betas, eps=eps,
                        weight_decay=0.0, use_muon=False, ns_steps=ns_steps)
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.skip_updates:
            return loss
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict) -> None:
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.dim() != 2:
                raise RuntimeError(
                    f"Muon got a parameter of shape {tuple(p.shape)}: it orthogonalises whole 2-D "
                    f"matrices. DeepSpeed ZeRO stages >= 1 flatten parameters; use "
                    f"train.zero_stage=0 with train.optimizer=muon (or train.optimizer=adamw)")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
            buf = state["momentum_buffer"]
            g = p.grad.float()
            buf.lerp_(g, 1 - mom)  # buf = mom * buf + (1 - mom) * g
            update = g.lerp_(buf, mom) if group["nesterov"] else buf
            update = newton_schulz(update, group["ns_steps"])
            update = update * max(1.0, p.size(0) / p.size(1)) ** 0.5
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(update.to(p.dtype), alpha=-lr)

    def _adamw_group(self, group: dict) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
            t = state["step"].item()
            g = p.grad.float()
            state["exp_avg"].lerp_(g, 1 - b1)
            state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (state["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(eps)
            if wd:
                p.mul_(1 - lr * wd)
            p.addcdiv_(state["exp_avg"].to(p.dtype), denom.to(p.dtype), value=-lr / (1 - b1 ** t))


def muon_param_groups(named_params, cfg) -> list[dict]:
    """Hidden 2-D matrices on Muon (lr muon_lr); embeddings, head and 1-D params on AdamW (lr)."""
    t = cfg.train
    muon, adam_decay, adam_no_decay = [], [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if _is_hidden_matrix(name, p):
            muon.append(p)
        elif _decays(name, p):
            adam_decay.append(p)
        else:
            adam_no_decay.append(p)
    groups = [
        dict(params=muon, lr=t.muon_lr, weight_decay=t.weight_decay, use_muon=True, name="muon"),
        dict(params=adam_decay, lr=t.lr, weight_decay=t.weight_decay, use_muon=False, name="adamw_decay"),
        dict(params=adam_no_decay, lr=t.lr, weight_decay=0.0, use_muon=False, name="adamw_no_decay"),
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """The client optimizer for `deepspeed.initialize` from cfg.train (optimizer, lr, betas, ...)."""
    t = cfg.train
    if t.optimizer == "muon":
        if t.zero_stage != 0:
            from ..config import ConfigError
            raise ConfigError(
                f"train.optimizer=muon needs train.zero_stage=0 (ZeRO stage {t.zero_stage} hands the "
                f"optimizer flattened 1-D shards, but Muon orthogonalises whole matrices); set "
                f"train.zero_stage=0, or train.optimizer=adamw to use ZeRO")
        return Muon(muon_param_groups(model.named_parameters(), cfg), betas=(t.beta1, t.beta2))
    groups = adamw_param_groups(model.named_parameters(), t.lr, t.weight_decay)
    return AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, weight_decay=t.weight_decay)
