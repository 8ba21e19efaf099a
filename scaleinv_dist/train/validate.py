"""Validation during training: the mean loss over up to train.eval_tokens held-out tokens.

Length generalisation is measured separately by launch/eval.py (scaleinv_dist/evaluate/).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from ..loss import IGNORE_INDEX


def evaluate_loss(engine, val_store, cfg, local_batch: Callable, device, dp_rank: int,
                  dp_size: int) -> tuple[float, int]:
    """(mean validation loss, scored tokens) over up to train.eval_tokens tokens (0 = all) in
    windows of train.seq_len; `local_batch(batch)` gives this rank's device tensors.

    Batches are dealt round-robin to data-parallel ranks; every rank runs the same number of
    forwards (padding ones score nothing), which ZeRO-3's parameter gathering needs.
    """
    from ..data import count_validation_tokens, validation_windows
    t = cfg.train
    n_windows = count_validation_tokens(val_store, t.seq_len, t.eval_tokens) // t.seq_len
    per_rank = math.ceil(math.ceil(n_windows / t.micro_batch_size) / dp_size)
    totals = torch.zeros(2, dtype=torch.float64, device=device)

    def score(batch) -> None:
        tokens, labels, positions, doc_ids = local_batch(batch)
        loss_sum, n = engine(tokens, positions, doc_ids, labels)
        totals[0] += loss_sum.double()
        totals[1] += n

    engine.eval()
    try:
        with torch.no_grad():
            done, first = 0, None
            for i, batch in enumerate(validation_windows(val_store, t.seq_len, t.eval_tokens,
                                                         t.micro_batch_size)):
                first = batch if first is None else first
                if i % dp_size == dp_rank:
                    score(batch)
                    done += 1
            while done < per_rank and first is not None:
                score(dataclasses.replace(first, labels=torch.full_like(first.labels, IGNORE_INDEX)))
                done += 1
    finally:
        engine.train()
    import torch.distributed as dist
    dist.all_reduce(totals)  # dp ranks hold different windows, cp ranks different tokens
    n = int(totals[1].item())
    return (totals[0].item() / n if n else float("nan")), n


class Validator:
    """Runs evaluate_loss every train.eval_every steps and at the last step, logging each result;
    a DataError (e.g. too little validation text) disables it with one warning."""

    def __init__(self, engine, val_store, cfg, local_batch: Callable, device, dp: tuple[int, int]):
        self.engine, self.val_store, self.cfg = engine, val_store, cfg
        self.local_batch, self.device, self.dp = local_batch, device, dp
        self.enabled = cfg.train.eval_every > 0
        self.last_loss: float | None = None

    def due(self, step: int) -> bool:
        t = self.cfg.train
        return self.enabled and (step % t.eval_every == 0 or step == t.steps)

    def run(self, step: int, metrics) -> None:
        from ..data.errors import DataError
        try:
            loss, n = evaluate_loss(self.engine, self.val_store, self.cfg, self.local_batch,
                                    self.device, *self.dp)
        except DataError as err:
            metrics.print(f"warning: evaluation disabled: {err}")
            self.enabled = False
            return
        self.last_loss = loss
        metrics.log_eval({"split": "val", "context_length": self.cfg.train.seq_len, "loss": loss,
                          "step": step, "tokens": n})
