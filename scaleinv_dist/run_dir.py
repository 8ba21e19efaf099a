"""The layout of a run directory, and loading a trained model from it without executing code.

    <out_dir>/config.yaml               the resolved config of the run
    <out_dir>/tokenizer.model           the sentencepiece model it was trained with
    <out_dir>/metrics.jsonl             one JSON object per logged step / evaluation
    <out_dir>/checkpoints/step_XXXXXXXX/  one published checkpoint (DeepSpeed state, model.safetensors,
                                          manifest.json: size and sha256 of every other file)
    <out_dir>/checkpoints/latest        the tag of the newest published checkpoint, written last

Every reader of a run's checkpoint (resume, evaluation, generation, export) picks it with
`newest_intact_checkpoint`: the one `latest` names if its files match its manifest, else the newest
older one that does. Checkpoints written before manifests existed (no manifest.json) can only be
checked for readability: their JSON parses, their safetensors headers match the file sizes and
their torch zip archives pass their CRC checks.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ConfigError, load_config
from .model import GPT, build_model

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
TRAINER_STATE = "trainer_state.json"
TAG_RE = re.compile(r"^step_(\d{8})$")


class IncompatibleCheckpointError(ConfigError):
    """A checkpoint whose tensors do not fit the model its run's config builds."""


class DamagedCheckpointError(ConfigError):
    """No intact checkpoint to load (files truncated, altered or missing); the message says which."""


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_pointer(run_dir: str | Path) -> Path:
    """<run_dir>/checkpoints/latest: the file naming the newest published checkpoint."""
    return checkpoints_dir(run_dir) / "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(folder: Path) -> int | None:
    """The step of a checkpoint folder named step_XXXXXXXX, else None."""
    m = TAG_RE.match(folder.name)
    return int(m.group(1)) if m else None


def published_steps(run_dir: str | Path) -> list[int]:
    """Steps of the checkpoint folders step_XXXXXXXX under <run_dir>/checkpoints, ascending."""
    ck = checkpoints_dir(run_dir)
    if not ck.is_dir():
        return []
    return sorted(s for p in ck.iterdir() if p.is_dir() and (s := step_of(p)) is not None)


def _latest_tag(run_dir: str | Path) -> str | None:
    """The folder name `checkpoints/latest` holds ("" when unreadable), or None without a pointer."""
    pointer = latest_pointer(run_dir)
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    return name if name and Path(name).name == name and name not in (".", "..") else ""


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint folder `checkpoints/latest` names, or None (no pointer, or no such folder).

    Unverified: loaders use newest_intact_checkpoint.
    """
    tag = _latest_tag(run_dir)
    path = checkpoints_dir(run_dir) / tag if tag else None
    return path if path is not None and path.is_dir() else None


# ----------------------------------------------------------------------------- integrity
def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sha256_many(paths: list[Path]) -> list[str]:
    """sha256 of each file, several at once (hashlib releases the GIL while it hashes)."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(_sha256, paths))


def write_manifest(folder: str | Path) -> Path:
    """folder/manifest.json: {"format": 1, "files": {relative path: {"size": bytes, "sha256": hex}}}
    for every file under folder. Written (and fsynced) before the folder is published."""
    folder = Path(folder)
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": digest}
             for p, digest in zip(paths, _sha256_many(paths))}
    path = folder / MANIFEST
    with open(path, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return path


def verify_checkpoint(folder: str | Path) -> str | None:
    """None if the checkpoint folder is intact, else what is wrong (e.g. "model.safetensors: size
    12 != 4096"). Sizes are compared first (cheap: catches truncation), then sha256 checksums.
    A folder without a manifest (written before manifests existed) gets `check_readable`."""
    folder = Path(folder)
    if not folder.is_dir():
        return "folder missing"
    if not (folder / MANIFEST).is_file():
        return check_readable(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        listed = [(rel, int(e["size"]), str(e["sha256"])) for rel, e in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} unreadable"
    for rel, size, _ in listed:
        path = folder / rel
        if not path.is_file():
            return f"{rel} missing"
        if path.stat().st_size != size:
            return f"{rel}: size {path.stat().st_size} != {size}"
    digests = _sha256_many([folder / rel for rel, _, _ in listed])
    for (rel, _, digest), found in zip(listed, digests):
        if found != digest:
            return f"{rel}: sha256 differs from the manifest"
    return None


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, TypeError, KeyError, AttributeError, IndexError):
        return f"{path.name}: unreadable safetensors header"
    return None if size == 8 + n + end else f"{path.name}: size {size} != {8 + n + end} (its header)"


def check_readable(folder: Path) -> str | None:
    """The check for checkpoints without a manifest: model.safetensors (what every reader needs) is
    present, every JSON file parses, every safetensors file is as long as its header says and every
    torch zip archive (.pt) passes its CRC check. None if so, else the first problem."""
    if not (folder / WEIGHTS).is_file():
        return f"{WEIGHTS} missing"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if path.suffix == ".json":
            try:
                json.loads(path.read_text())
            except ValueError:
                return f"{rel}: not valid JSON"
        elif path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
            if problem:
                return problem
        elif path.suffix == ".pt":
            try:
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
            except (zipfile.BadZipFile, OSError, EOFError):
                return f"{rel}: not a readable torch zip archive"
            if bad is not None:
                return f"{rel}: CRC error in {bad}"
    return None


def checkpoint_label(folder: Path) -> str:
    """"step 40" for checkpoints/step_00000040, else the folder's name."""
    step = step_of(folder)
    return f"step {step}" if step is not None else str(folder.name or folder)


class CheckpointChoice(NamedTuple):
    """newest_intact_checkpoint's answer."""
    folder: Path | None                # the newest intact checkpoint; None: none intact / none at all
    skipped: list[tuple[Path, str]]    # newer checkpoints found damaged, newest first, with why
    verified: bool                     # False: `folder` has no manifest, only check_readable passed

    def report(self, using: str) -> str | None:
        """One line for the user, e.g. "checkpoint step 40 is damaged (model_states.pt: size 1234 !=
        5678); resuming from step 20"; None when there is nothing to say."""
        parts = [f"checkpoint {checkpoint_label(f)} is damaged ({why})" for f, why in self.skipped]
        if self.folder is None:
            return "; ".join(parts) or None
        if not self.verified:
            parts.append(f"checkpoint {checkpoint_label(self.folder)} predates checkpoint manifests "
                         f"(no {MANIFEST}): checked for readability only")
        return f"{'; '.join(parts)}; {using} {checkpoint_label(self.folder)}" if parts else None


def _candidates(run_dir: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Checkpoint folders newest first: the one `latest` names, then older published ones (all
    published ones when there is no pointer); plus a damaged pointer, if any."""
    ck = checkpoints_dir(run_dir)
    tag = _latest_tag(run_dir)
    steps = sorted(published_steps(run_dir), reverse=True)
    if tag is None:
        return [ck / tag_for(s) for s in steps], []
    if not tag:
        return [ck / tag_for(s) for s in steps], [(latest_pointer(run_dir),
                                                    "the pointer file is unreadable")]
    newest = step_of(Path(tag))
    older = [ck / tag_for(s) for s in steps if newest is not None and s < newest]
    return [ck / tag] + older, []


def newest_intact_checkpoint(run_dir: str | Path) -> CheckpointChoice:
    """The checkpoint to load from a run: the newest (from `checkpoints/latest` down) that passes
    verify_checkpoint. folder None with nothing skipped: the run has no checkpoint yet."""
    candidates, skipped = _candidates(run_dir)
    for folder in candidates:
        problem = verify_checkpoint(folder)
        if problem is None:
            return CheckpointChoice(folder, skipped, (folder / MANIFEST).is_file())
        skipped.append((folder, problem))
    return CheckpointChoice(None, skipped, False)


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


def intact_checkpoint_to_load(run_dir: str | Path) -> Path | None:
    """newest_intact_checkpoint for a loader: warns on stderr in one line when it skipped damaged
    ones; DamagedCheckpointError when checkpoints exist but none is intact; None when there are none."""
    choice = newest_intact_checkpoint(run_dir)
    line = choice.report("using")
    if choice.folder is None and choice.skipped:
        raise DamagedCheckpointError(f"{line}; no intact checkpoint is left under "
                                     f"{checkpoints_dir(run_dir)}")
    if line:
        print(f"warning: {line}", file=sys.stderr, flush=True)
    return choice.folder


def load_trained_model(run_dir: str | Path, checkpoint: str | Path | None = None,
                       overrides=(), device: str | torch.device = "cpu") -> tuple[GPT, object, Path]:
    """(model in eval mode, config, checkpoint folder) from a run directory's newest intact
    checkpoint (intact_checkpoint_to_load), or from `checkpoint` if given, which must be intact.

    A checkpoint whose tensors do not fit the config raises IncompatibleCheckpointError listing them.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml); pass the run.out_dir of a training run")
    cfg = load_config(run_dir / "config.yaml", overrides)
    folder = Path(checkpoint) if checkpoint else intact_checkpoint_to_load(run_dir)
    if folder is None or not (folder / WEIGHTS).is_file():
        raise ConfigError(f"no published checkpoint with {WEIGHTS} under {checkpoints_dir(run_dir)}; "
                          f"train first (launch/train.py) or pass a checkpoint folder")
    problem = verify_checkpoint(folder) if checkpoint else None
    if problem:
        raise DamagedCheckpointError(f"checkpoint {folder} is damaged ({problem}); pass another "
                                     f"checkpoint folder, or none for the run's newest intact one")
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
