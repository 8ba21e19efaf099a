"""Training metrics: <out_dir>/metrics.jsonl, console lines, a progress bar and wandb (rank 0 only).

metrics.jsonl holds one JSON object per line (schema in docs/training.md):
    training step   {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens", "mfu",
                     "peak_gpu_mem_gb", "elapsed_s", ...}            (every run.log_every steps)
    evaluation      {"split": "val", "context_length", "loss", "step", "tokens"}
A resumed run first drops the records of steps after the checkpoint it resumes from, so the file
holds one consistent history. Non-finite numbers are written as null.

MFU = model.flops_per_token(seq_len) x tokens/s / (number of GPUs x peak bf16 FLOP/s), with
flops_per_token = 6 x non-embedding parameters + 7 x n_layer x seq_len x n_head x head_dim
(matmuls forward + backward, plus causal attention with backward = 2.5 x forward). null on CPU or
for an unknown GPU.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from ..config import to_dict

# dense bf16 peak FLOP/s by GPU name (datasheets, no sparsity)
PEAK_BF16_FLOPS = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("RTX 4090", 165e12), ("L4", 121e12),
)


def peak_flops(device: torch.device, bf16: bool) -> float | None:
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def peak_gpu_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, torch.Tensor):
        return _clean(value.item())
    return value


def truncate_after(path: Path, step: int) -> None:
    """Drop records with "step" > step (written by a run that died after its last checkpoint)."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1  # a line cut short by a crash
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def _init_wandb(cfg, out_dir: Path):
    """A wandb run (mode run.wandb, files under out_dir/wandb), or None if disabled or failing.

    Only the config tree is sent: no environment, no code, no console capture (so secrets such as
    WANDB_API_KEY, which wandb itself reads, never reach logs or the run's files).
    """
    if cfg.run.wandb == "disabled":
        return None
    try:
        import wandb
        run_id = hashlib.sha1(str(out_dir.resolve()).encode()).hexdigest()[:16]
        (out_dir / "wandb").mkdir(parents=True, exist_ok=True)
        try:  # x_disable_meta: no host / argv / environment metadata
            settings = wandb.Settings(console="off", save_code=False, disable_git=True,
                                      silent=True, x_disable_meta=True)
        except Exception:  # older / newer wandb without some of these fields
            settings = wandb.Settings(console="off", save_code=False)
        return wandb.init(project=cfg.run.wandb_project, dir=str(out_dir), mode=cfg.run.wandb,
                          id=run_id, resume="allow", name=out_dir.name, config=to_dict(cfg),
                          settings=settings)
    except Exception as err:  # no network, bad credentials, wandb missing: train anyway
        print(f"warning: wandb disabled ({type(err).__name__}: {str(err).splitlines()[0][:200]})",
              file=sys.stderr)
        return None


class Window:
    """Seconds, tokens and finite losses of the steps since the last logged one."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.seconds, self.tokens, self.losses = 0.0, 0, []

    def add(self, seconds: float, tokens: int, loss: float | None) -> None:
        self.seconds += seconds
        self.tokens += tokens
        if loss is not None:
            self.losses.append(loss)

    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def loss_avg(self) -> float | None:
        return sum(self.losses) / len(self.losses) if self.losses else None


class Metrics:
    """Rank-0 sink for step and evaluation records; other ranks get a no-op instance."""

    def __init__(self, cfg, out_dir: str | Path, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.file = self.bar = self.wandb = None
        self.t0 = time.time()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_after(self.path, start_step)
        self.file = open(self.path, "a")
        if cfg.run.progress and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                                desc="train", file=sys.stderr)
            except Exception:
                self.bar = None
        self.wandb = _init_wandb(cfg, Path(out_dir))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            try:
                data = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
                if "split" in record:
                    data = {f"{record['split']}/loss@{record['context_length']}": record["loss"]}
                self.wandb.log(data, step=record.get("step"))
            except Exception:
                pass

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def log_step(self, record: dict) -> None:
        self.write(record)
        r = record
        parts = [f"step {r['step']:>6}", f"loss {r['loss']:.4f}" if r.get("loss") is not None
                 and math.isfinite(r["loss"]) else "loss nan (skipped)",
                 f"lr {r['lr']:.2e}"]
        if r.get("grad_norm") is not None and math.isfinite(r["grad_norm"]):
            parts.append(f"grad {r['grad_norm']:.3f}")
        parts.append(f"{r['tokens_per_s'] / 1e3:.1f}k tok/s")
        if r.get("mfu") is not None:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        if r.get("peak_gpu_mem_gb") is not None:
            parts.append(f"mem {r['peak_gpu_mem_gb']:.1f} GB")
        self.print(" | ".join(parts))

    def log_eval(self, record: dict) -> None:
        self.write(record)
        self.print(f"eval step {record['step']:>6} | {record['split']} loss {record['loss']:.4f} "
                   f"@ {record['context_length']} tokens")

    def advance(self, step: int, loss: float | None) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if loss is not None and math.isfinite(loss):
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:
                pass
