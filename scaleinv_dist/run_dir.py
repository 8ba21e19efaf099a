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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ConfigError, load_config
from .model import GPT, build_model

WEIGHTS = "model.safetensors"


class IncompatibleCheckpointError(ConfigError):
    """A checkpoint whose tensors do not fit the model its run's config builds."""


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


def describe_mismatch(model: torch.nn.Module, state: dict) -> list[str]:
    """Human-readable differences between a model's state dict and a loaded one (empty: compatible)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"missing tensor {k} (config expects shape {expected[k]})" for k in expected.keys() - found.keys()]
    problems += [f"unexpected tensor {k} {found[k]} (not built by the config)" for k in found.keys() - expected.keys()]
    problems += [f"{k}: checkpoint has shape {found[k]}, the config builds {expected[k]}"
                 for k in expected.keys() & found.keys() if expected[k] != found[k]]
    return sorted(problems)


def load_trained_model(run_dir: str | Path, checkpoint: str | Path | None = None,
                       overrides=(), device: str | torch.device = "cpu") -> tuple[GPT, object, Path]:
    """(model in eval mode, config, checkpoint folder) from a run directory's latest checkpoint.

    A checkpoint whose tensors do not fit the config raises IncompatibleCheckpointError listing them.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml); pass the run.out_dir of a training run")
    cfg = load_config(run_dir / "config.yaml", overrides)
    folder = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if folder is None or not (folder / WEIGHTS).is_file():
        raise ConfigError(f"no published checkpoint with {WEIGHTS} under {checkpoints_dir(run_dir)}; "
                          f"train first (launch/train.py) or pass a checkpoint folder")
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as err:  # a damaged or foreign file
        raise IncompatibleCheckpointError(
            f"{folder / WEIGHTS} cannot be read as safetensors ({str(err).splitlines()[0]}); the "
            f"checkpoint is damaged or not a scaleinv_dist checkpoint: pass another --checkpoint "
            f"or train again") from None
    if "wte.weight" not in state:
        raise IncompatibleCheckpointError(f"{folder / WEIGHTS} is not a scaleinv_dist GPT checkpoint "
                                          f"(no wte.weight tensor)")
    model = build_model(cfg, vocab_size=state["wte.weight"].shape[0])
    problems = describe_mismatch(model, state)
    if problems:
        shown = "\n  ".join(problems[:8]) + ("\n  ..." if len(problems) > 8 else "")
        m = cfg.model
        raise IncompatibleCheckpointError(
            f"checkpoint {folder} does not match the model that {run_dir / 'config.yaml'} builds "
            f"(model.n_layer={m.n_layer}, d_model={m.d_model}, n_head={m.n_head}, n_kv_head={m.n_kv_head}, "
            f"attention.transform={cfg.attention.transform}):\n  {shown}\n"
            f"Was config.yaml edited, or the checkpoint copied from another run?")
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, folder



def check_resume_shape(cfg) -> None:
    """Before training: IncompatibleCheckpointError when cfg.run.out_dir's latest checkpoint holds
    tensors of other shapes than cfg builds (a run resumes with the shape it started with).

    Reads only the safetensors header; the model is built on the meta device (no memory).
    """
    folder = latest_checkpoint(cfg.run.out_dir)
    if folder is None or not (folder / WEIGHTS).is_file():
        return
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            state = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except (SafetensorError, OSError):
        return  # a damaged checkpoint is the resume code's to report
    vocab = cfg.model.vocab_size or (state["wte.weight"].shape[0] if "wte.weight" in state else 0)
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=vocab or None)
    problems = describe_mismatch(model, state)
    if problems:
        more = f" (+{len(problems) - 2} more)" if len(problems) > 2 else ""
        raise IncompatibleCheckpointError(
            f"run.out_dir={cfg.run.out_dir!r} holds a checkpoint of another model: "
            f"{'; '.join(problems[:2])}{more}; a run resumes with the model it started with: "
            f"pass another run.out_dir, or drop the overrides that change the model")
