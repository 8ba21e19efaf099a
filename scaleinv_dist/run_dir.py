"""The layout of a run directory, and loading a trained model from it without executing code.

    <out_dir>/config.yaml               the resolved config of the run
    <out_dir>/tokenizer.model           the sentencepiece model it was trained with
    <out_dir>/metrics.jsonl             one JSON object per logged step / evaluation
    <out_dir>/checkpoints/<tag>/        one published checkpoint (DeepSpeed state + model.safetensors)
    <out_dir>/checkpoints/latest        the tag of the newest complete checkpoint, written last
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError, load_config
from .model import GPT, build_model

WEIGHTS = "model.safetensors"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest published checkpoint folder of a run, or None."""
    pointer = checkpoints_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoints_dir(run_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def save_weights(model: torch.nn.Module, folder: str | Path) -> Path:
    """Model weights as float32 safetensors in folder/model.safetensors (written then renamed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(folder / WEIGHTS)
    return folder / WEIGHTS


def load_trained_model(run_dir: str | Path, checkpoint: str | Path | None = None,
                       overrides=(), device: str | torch.device = "cpu") -> tuple[GPT, object, Path]:
    """(model in eval mode, config, checkpoint folder) from a run directory's latest checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml); pass the run.out_dir of a training run")
    cfg = load_config(run_dir / "config.yaml", overrides)
    folder = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if folder is None or not (folder / WEIGHTS).is_file():
        raise ConfigError(f"no published checkpoint with {WEIGHTS} under {checkpoints_dir(run_dir)}; "
                          f"train first (launch/train.py) or pass a checkpoint folder")
    state = load_file(str(folder / WEIGHTS))
    model = build_model(cfg, vocab_size=state["wte.weight"].shape[0])
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, folder
