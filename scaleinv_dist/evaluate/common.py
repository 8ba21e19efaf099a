"""Small helpers shared by the evaluation entry points: devices, autocast, lengths, metrics."""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..device import cuda_missing, resolve_device
from .distributed import local_device
from .errors import EvalError


def pick_device(name: str = "auto") -> torch.device:
    """device.resolve_device (auto -> cuda when available, else cpu), EvalError for CUDA without a GPU."""
    device = resolve_device(name)
    if cuda_missing(device):
        raise EvalError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere (CPU evaluation runs in float32)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def parse_int_list(text: str, flag: str) -> list[int]:
    """'256,1024,4k' -> [256, 1024, 4096] (k / m suffixes are powers of 2: 1k = 1024)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+)([kKmM]?)", part)
        if not m:
            raise EvalError(f"{flag}: cannot parse {part!r}; expected integers like 256,1024,4k")
        value = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
        out.append(value)
    if not out or min(out) < 2:
        raise EvalError(f"{flag} needs one or more integers >= 2, got {text!r}")
    return out


def parse_float_list(text: str, flag: str, fractions: bool = False) -> list[float]:
    """'1,4,16' -> [1.0, 4.0, 16.0]: positive numbers, or with fractions=True numbers in [0, 1]."""
    what, example = ("fractions in [0, 1]", "0,0.5,1") if fractions else ("positive numbers", "1,4,16")
    try:
        out = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise EvalError(f"{flag}: cannot parse {text!r}; expected {what} like {example}") from None
    ok = (lambda x: 0.0 <= x <= 1.0) if fractions else (lambda x: x > 0.0)
    if not out or not all(ok(x) for x in out):
        raise EvalError(f"{flag} needs one or more {what}, got {text!r}")
    return out


def load_run_model(run_dir: Path, args):
    """(model, cfg, checkpoint folder, device) for an evaluation command's --checkpoint, --device
    (default: the run's run.device) and config overrides; cuda:LOCAL_RANK under torchrun."""
    from ..config import check_device, load_config
    from ..run_dir import load_trained_model

    base = load_config(run_dir / "config.yaml", args.overrides)
    device = local_device(pick_device(args.device or base.run.device))
    check_device(base, device.type)
    model, cfg, ckpt = load_trained_model(run_dir, args.checkpoint, args.overrides, device)
    return model, cfg, ckpt, device


def lengths_from_args(args, train_seq_len: int, default_multiples: Sequence[float] | None = None,
                      cfg_lengths: Sequence[int] = (), cfg_multiples: Sequence[float] = ()) -> list[int]:
    """resolve_lengths for an evaluation command's --lengths / --multiples strings."""
    return resolve_lengths(
        train_seq_len,
        lengths=parse_int_list(args.lengths, "--lengths") if args.lengths else None,
        multiples=parse_float_list(args.multiples, "--multiples") if args.multiples else default_multiples,
        cfg_lengths=cfg_lengths, cfg_multiples=cfg_multiples)


def resolve_lengths(train_seq_len: int, lengths: Sequence[int] | None = None,
                    multiples: Sequence[float] | None = None,
                    cfg_lengths: Sequence[int] = (), cfg_multiples: Sequence[float] = ()) -> list[int]:
    """Evaluation lengths in tokens: explicit lengths, else multiples of train_seq_len, else the
    config's eval.context_lengths, else its eval.length_multiples. Sorted, deduplicated."""
    if lengths:
        out = list(lengths)
    elif multiples:
        out = [int(round(m * train_seq_len)) for m in multiples]
    elif cfg_lengths:
        out = list(cfg_lengths)
    else:
        out = [int(round(m * train_seq_len)) for m in (cfg_multiples or (1.0,))]
    out = sorted(set(out))
    if out[0] < 2:
        raise EvalError(f"evaluation lengths must be >= 2 tokens, got {out}")
    return out


def checkpoint_step(folder: Path | None) -> int | None:
    """The training step of a checkpoint folder: from a JSON sidecar if present, else its name."""
    if folder is None:
        return None
    folder = Path(folder)
    for name in ("meta.json", "state.json", "trainer_state.json", "checkpoint.json"):
        f = folder / name
        if f.is_file():
            try:
                step = json.loads(f.read_text()).get("step")
                if isinstance(step, int):
                    return step
            except (ValueError, AttributeError):
                pass
    digits = re.findall(r"\d+", folder.name)
    return int(digits[-1]) if digits else None


def read_metrics(path: Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl (bad lines skipped)."""
    records = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def append_metrics(path: Path, records: Iterable[dict]) -> None:
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def training_summary(metrics: list[dict]) -> dict:
    """Last training step and the mean training loss over the last few logged steps, from metrics."""
    train = [r for r in metrics if "split" not in r and isinstance(r.get("loss"), (int, float))]
    if not train:
        return {}
    last = train[-1]
    if isinstance(last.get("loss_avg"), (int, float)):  # mean over the last logging window
        loss = last["loss_avg"]
    else:
        tail = train[-3:]
        loss = sum(r["loss"] for r in tail) / len(tail)
    out = {"last_step": last.get("step"), "train_loss": loss}
    for key in ("epoch", "epochs", "tokens", "tokens_seen"):
        if key in last:
            out[key] = last[key]
    return out
