"""Atomic, prunable, exactly-resumable checkpoints under <out_dir>/checkpoints (run_dir.py layout).

One checkpoint folder `checkpoints/step_XXXXXXXX/` holds
    DeepSpeed's files           model / optimizer / LR-scheduler state (engine.save_checkpoint)
    model.safetensors           fp32 weights for evaluation and export (run_dir.load_trained_model)
    trainer_state.json          step, tokens seen, world layout (rank 0)
    rank_XXXXX.json/.safetensors  per rank: data-loader state and python / numpy / torch RNG states
    manifest.json               size and sha256 of every file above (run_dir.write_manifest)

Publishing protocol (a crash at any point leaves the previous checkpoint usable):
    1. every rank writes into `checkpoints/.tmp-step_XXXXXXXX/`
    2. barrier; rank 0 writes manifest.json into it, then renames it to `checkpoints/step_XXXXXXXX/`
       (os.replace: atomic)
    3. rank 0 rewrites `checkpoints/latest` (tmp file + fsync + os.replace) -- last
    4. rank 0 prunes to the newest `train.keep_checkpoints` and removes stale `.tmp-*` folders
Multi-node: `out_dir` must be on a filesystem that every node sees.

Resume (`Checkpointer.resume`): rank 0 picks the newest intact checkpoint (run_dir.
newest_intact_checkpoint: files checked against the manifest) and tells the other ranks. A damaged
newer one is reported in one line and `latest` is pointed back at the one resumed from (its step is
rewritten when the run gets there again); if checkpoints exist but none is intact, CheckpointError.

Trust boundary: our own files are JSON and safetensors (never pickle). DeepSpeed's files are torch
pickles; they are loaded with `torch.load(weights_only=True)` (forced for every torch.load during
`engine.load_checkpoint`) with an allowlist of a few DeepSpeed classes (DS_SAFE_GLOBALS) that are
reconstructed from plain data, so loading a checkpoint executes no code from the file.
"""
from __future__ import annotations

import base64
import contextlib
import importlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file

from ..run_dir import (TRAINER_STATE, checkpoints_dir, latest_checkpoint, latest_pointer,
                       newest_intact_checkpoint, published_steps, save_weights, tag_for, write_manifest)
from . import faults

TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1

# DeepSpeed classes found in its checkpoints, rebuilt from plain data by the weights-only unpickler
DS_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed from; the message says why and what to do."""


# ----------------------------------------------------------------------------- distributed helpers
def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def _world() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def _barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ----------------------------------------------------------------------------- pickle-free state
def pack_state(obj, arrays: dict, prefix: str = "t"):
    """A JSON-able tree for obj; tensors / arrays go to `arrays` (saved as safetensors)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(arrays)}"
        arrays[key] = obj.detach().cpu().contiguous().numpy()
        return {"__tensor__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, np.ndarray):
        key = f"{prefix}{len(arrays)}"
        arrays[key] = np.ascontiguousarray(obj)
        return {"__ndarray__": key}
    if isinstance(obj, bytes):
        return {"__bytes__": base64.b64encode(obj).decode()}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack_state(v, arrays, prefix) for v in obj]}
    if isinstance(obj, list):
        return [pack_state(v, arrays, prefix) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: pack_state(v, arrays, prefix) for k, v in obj.items()}
        return {"__items__": [[pack_state(k, arrays, prefix), pack_state(v, arrays, prefix)]
                              for k, v in obj.items()]}
    raise CheckpointError(f"cannot save trainer state of type {type(obj).__name__} without pickle; "
                          f"state_dict() must hold numbers, strings, lists, dicts, tensors or arrays")


def unpack_state(tree, arrays: dict):
    if isinstance(tree, list):
        return [unpack_state(v, arrays) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return torch.from_numpy(arrays[tree["__tensor__"]].copy())
    if "__ndarray__" in tree:
        return arrays[tree["__ndarray__"]].copy()
    if "__bytes__" in tree:
        return base64.b64decode(tree["__bytes__"])
    if "__tuple__" in tree:
        return tuple(unpack_state(v, arrays) for v in tree["__tuple__"])
    if "__items__" in tree:
        return {_hashable(unpack_state(k, arrays)): unpack_state(v, arrays) for k, v in tree["__items__"]}
    return {k: unpack_state(v, arrays) for k, v in tree.items()}


def _hashable(k):
    return tuple(k) if isinstance(k, list) else k


def save_state_files(state: dict, folder: Path, name: str) -> None:
    """folder/name.json (+ folder/name.safetensors when there are arrays)."""
    arrays: dict = {}
    tree = pack_state(state, arrays)
    if arrays:
        np_save_file(arrays, str(folder / f"{name}.safetensors"))
    with open(folder / f"{name}.json", "w") as f:
        json.dump({"format": FORMAT_VERSION, "state": tree}, f)
        f.flush()
        os.fsync(f.fileno())


def load_state_files(folder: Path, name: str) -> dict:
    path = folder / f"{name}.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete or was written with a "
                              f"different number of ranks")
    with open(path) as f:
        tree = json.load(f)["state"]
    arrays_path = folder / f"{name}.safetensors"
    arrays = np_load_file(str(arrays_path)) if arrays_path.is_file() else {}
    return unpack_state(tree, arrays)


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- listing / pruning
def write_latest(run_dir: str | Path, tag: str) -> None:
    _write_atomic(latest_pointer(run_dir), tag + "\n")


def prune(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` (>= 1) published checkpoints and any stale temporary folders.

    The folder `latest` points to is never deleted. Returns the deleted paths.
    """
    ck = checkpoints_dir(run_dir)
    latest = latest_checkpoint(run_dir)
    steps = published_steps(run_dir)
    doomed = [ck / tag_for(s) for s in steps[:-max(1, keep)]]
    doomed += [p for p in ck.iterdir() if p.is_dir() and p.name.startswith(TMP_PREFIX)] if ck.is_dir() else []
    removed = []
    for p in doomed:
        if latest is not None and p.resolve() == latest.resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# ----------------------------------------------------------------------------- save
def _save_model_weights(engine, folder: Path, zero_stage: int) -> None:
    module = engine.module
    if zero_stage == 3:  # parameters are partitioned: gather them (a collective) for rank 0
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if _rank() == 0:
                save_weights(module, folder)
    elif _rank() == 0:
        save_weights(module, folder)


def save_checkpoint(engine, run_dir: str | Path, step: int, trainer_state: dict, rank_state: dict,
                    keep: int, zero_stage: int = 0) -> Path:
    """Collective: every rank calls it. Returns the published folder."""
    run_dir = Path(run_dir)
    ck = checkpoints_dir(run_dir)
    tag = tag_for(step)
    tmp = ck / (TMP_PREFIX + tag)
    final = ck / tag
    rank = _rank()
    current = latest_checkpoint(run_dir)
    if current is not None and current.name == tag:
        raise CheckpointError(f"{final} is already the latest checkpoint; nothing new to save")
    if rank == 0:
        ck.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    _barrier()
    engine.save_checkpoint(str(ck), tag=tmp.name, save_latest=False)
    faults.inject("save:after_deepspeed", step)
    tmp.mkdir(parents=True, exist_ok=True)
    save_state_files(rank_state, tmp, f"rank_{rank:05d}")
    _save_model_weights(engine, tmp, zero_stage)
    if rank == 0:
        save_state_files({**trainer_state, "step": step, "world_size": _world()}, tmp,
                         TRAINER_STATE[:-len(".json")])
    _barrier()  # every rank's files are on disk
    if rank == 0:
        write_manifest(tmp)
    faults.inject("save:before_publish", step)
    if rank == 0:
        _fsync_dir(tmp)
        if final.exists():  # a leftover of a run that died between steps 2 and 3
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ck)
        write_latest(run_dir, tag)
        prune(run_dir, keep)
    _barrier()
    return final


# ----------------------------------------------------------------------------- load
def _safe_globals() -> list:
    found = []
    for dotted in DS_SAFE_GLOBALS:
        mod, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return found


@contextlib.contextmanager
def weights_only_loading():
    """Within the block, every torch.load runs with weights_only=True and the DeepSpeed allowlist."""
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(*args, **kwargs)
        except Exception as err:  # UnpicklingError and friends
            if "weights_only" in str(err) or "Unsupported global" in str(err):
                what = re.search(r"GLOBAL ([\w\.]+)", str(err))
                raise CheckpointError(
                    f"refusing to unpickle {what.group(1) if what else 'an object'} from "
                    f"{args[0] if args else kwargs.get('f')}: checkpoints load with torch.load("
                    f"weights_only=True); if this is a DeepSpeed class from a newer version, add it to "
                    f"DS_SAFE_GLOBALS in scaleinv_dist/train/checkpoint.py") from None
            raise

    torch.load = safe_load
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            yield
    finally:
        torch.load = original


def load_checkpoint(engine, folder: str | Path) -> tuple[dict, dict]:
    """Restore engine (model, optimizer, LR schedule) from a published folder.

    Returns (trainer_state, this rank's rank_state). Collective: every rank calls it.
    """
    folder = Path(folder)
    trainer_state = load_state_files(folder, TRAINER_STATE[:-len(".json")])
    saved_world = trainer_state.get("world_size")
    if saved_world != _world():
        raise CheckpointError(
            f"{folder} was written by {saved_world} ranks but this run has {_world()}; resume with "
            f"{saved_world} processes (the data order is per rank), or start a new run.out_dir")
    rank_state = load_state_files(folder, f"rank_{_rank():05d}")
    with weights_only_loading():
        path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint files in {folder}; delete "
                              f"{folder.parent / 'latest'} to start over")
    return trainer_state, rank_state


# ----------------------------------------------------------------------------- the loop's component
def choose_resume_folder(run_dir: str | Path) -> tuple[Path | None, str | None]:
    """(folder to resume from or None, a line to print or None), the same on every rank.

    Collective: rank 0 verifies (newest_intact_checkpoint), the others receive its answer. After
    skipping damaged checkpoints rank 0 points `latest` at the one chosen. CheckpointError (exit 2)
    when checkpoints exist but none is intact: never a silent start from scratch.
    """
    answer = [_choose_on_rank0(run_dir) if _rank() == 0 else None]
    if _world() > 1:
        _dist().broadcast_object_list(answer, src=0)
    folder, line, none_intact = answer[0]
    if none_intact:
        raise CheckpointError(line)
    return (None if folder is None else Path(folder)), line


def _choose_on_rank0(run_dir: str | Path) -> tuple[str | None, str | None, bool]:
    """(folder, line, whether checkpoints exist but none is intact) for choose_resume_folder."""
    choice = newest_intact_checkpoint(run_dir)
    line = choice.report("resuming from")
    if choice.folder is None:
        if not choice.skipped:
            return None, None, False  # a new run
        ck = checkpoints_dir(run_dir)
        return None, (f"{line}; no intact checkpoint is left under {ck}: restore one from a copy, "
                      f"or delete {ck} to start the run over"), True
    if choice.skipped:
        write_latest(run_dir, choice.folder.name)
    return str(choice.folder), line, False


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly: the DeepSpeed engine, the
    step and token counters, and each rank's data-loader position and RNG states."""

    def __init__(self, engine, out_dir: str | Path, cfg, dp_size: int):
        self.engine, self.out_dir = engine, Path(out_dir)
        self.keep, self.zero_stage = cfg.train.keep_checkpoints, cfg.train.zero_stage
        self.layout = {"dp_size": dp_size, "cp_size": cfg.parallel.context_parallel_size}
        self.last_saved: int | None = None  # step of the newest checkpoint on disk, if known

    def resume(self, loader) -> tuple[int, int, Path | None, str | None]:
        """(step, tokens seen, folder resumed from, damage line) -- (0, 0, None, None) for a new run.

        Restores the engine, the loader's position and the RNG states from the newest intact
        checkpoint (choose_resume_folder).
        """
        folder, line = choose_resume_folder(self.out_dir)
        if folder is None:
            return 0, 0, None, line
        trainer_state, rank_state = load_checkpoint(self.engine, folder)
        loader.load_state_dict(rank_state["loader"])
        set_rng_state(rank_state["rng"])
        self.last_saved = int(trainer_state["step"])
        return self.last_saved, int(trainer_state.get("tokens_seen", 0)), folder, line

    def save(self, step: int, tokens_seen: int, loader) -> Path:
        """Collective: publish the checkpoint of `step` (save_checkpoint); returns its folder."""
        folder = save_checkpoint(self.engine, self.out_dir, step, {"tokens_seen": tokens_seen, **self.layout},
                                 {"loader": loader.state_dict(), "rng": rng_state()}, self.keep,
                                 self.zero_stage)
        self.last_saved = step
        return folder

    def latest(self) -> Path | None:
        return latest_checkpoint(self.out_dir)
