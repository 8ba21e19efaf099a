"""Checkpoints: atomic publication (a crash mid-save leaves the previous one usable), keep-K pruning,
pickle-free trainer state, weights-only loading of DeepSpeed's files, and damaged checkpoints
(truncated, altered or missing files: found through the manifest, skipped by resume and by the
evaluation / generation / export loaders, exit 2 when none is intact).

The protocol is tested with a stand-in engine (no DeepSpeed, no process group); the slow tests at
the end kill a real DeepSpeed training process in the middle of a save, and damage the checkpoints
of a real run.
"""
import hashlib
import json
import os
import pickle
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scaleinv_dist import run_dir as rd
from scaleinv_dist.run_dir import latest_checkpoint, load_trained_model
from scaleinv_dist.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


class FakeEngine:
    """The two engine methods checkpoint.py uses, writing a DeepSpeed-like torch file."""

    def __init__(self, value=0.0, fail_on_save=False):
        self.module = torch.nn.Linear(3, 2)
        torch.nn.init.constant_(self.module.weight, value)
        self.value, self.fail_on_save = value, fail_on_save

    def save_checkpoint(self, save_dir, tag, save_latest=True):
        assert save_latest is False
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict(), "value": self.value, "global_steps": 1},
                   folder / "mp_rank_00_model_states.pt")
        if self.fail_on_save:
            raise RuntimeError("disk full (simulated)")

    def load_checkpoint(self, load_dir, tag, **kwargs):
        path = Path(load_dir) / tag / "mp_rank_00_model_states.pt"
        state = torch.load(path)  # checkpoint.load_checkpoint forces weights_only=True
        self.module.load_state_dict(state["module"])
        self.value = state["value"]
        return str(path), {}


def save(run, step, value=None, keep=2, engine=None):
    engine = engine or FakeEngine(float(step) if value is None else value)
    return ckpt.save_checkpoint(engine, run, step, {"tokens_seen": step * 10}, {"loader": {"i": step},
                                "rng": ckpt.rng_state()}, keep=keep)


def test_save_publishes_folder_and_latest_last(tmp_path):
    folder = save(tmp_path, 5)
    assert folder == tmp_path / "checkpoints" / "step_00000005"
    names = {p.name for p in folder.iterdir()}
    assert {"mp_rank_00_model_states.pt", "model.safetensors", "trainer_state.json", "rank_00000.json",
            "rank_00000.safetensors"} <= names
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    assert latest_checkpoint(tmp_path) == folder
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    state = json.loads((folder / "trainer_state.json").read_text())["state"]
    assert state["step"] == 5 and state["tokens_seen"] == 50 and state["world_size"] == 1


def test_load_restores_engine_and_states(tmp_path):
    save(tmp_path, 3, value=0.5)
    engine = FakeEngine(0.0)
    trainer, rank = ckpt.load_checkpoint(engine, latest_checkpoint(tmp_path))
    assert engine.value == 0.5 and torch.all(engine.module.weight == 0.5)
    assert trainer["step"] == 3 and rank["loader"] == {"i": 3}


@pytest.mark.parametrize("where", ["deepspeed", "our_files"])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, where):
    save(tmp_path, 4, value=4.0)
    if where == "deepspeed":
        engine = FakeEngine(8.0, fail_on_save=True)
    else:  # DeepSpeed's files were written, then ours failed
        engine = FakeEngine(8.0)
        monkeypatch.setattr(ckpt, "save_state_files", lambda *a, **k: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises((RuntimeError, OSError)):
        save(tmp_path, 8, engine=engine)
    monkeypatch.undo()
    # the half-written step 8 is not published; latest still names step 4, which loads
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert not (tmp_path / "checkpoints" / "step_00000008").exists()
    assert (tmp_path / "checkpoints" / ".tmp-step_00000008").exists()
    fresh = FakeEngine(0.0)
    trainer, _ = ckpt.load_checkpoint(fresh, latest_checkpoint(tmp_path))
    assert trainer["step"] == 4 and fresh.value == 4.0
    # the next successful save cleans the leftover up
    save(tmp_path, 9)
    assert not (tmp_path / "checkpoints" / ".tmp-step_00000008").exists()
    assert latest_checkpoint(tmp_path).name == "step_00000009"


def test_crash_between_rename_and_latest(tmp_path):
    """A published folder that `latest` does not name yet (died between steps 2 and 3) is ignored and
    replaced by the next save of that step."""
    save(tmp_path, 2)
    stray = tmp_path / "checkpoints" / "step_00000006"
    stray.mkdir()
    (stray / "junk").write_text("x")
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    save(tmp_path, 6)
    assert not (stray / "junk").exists() and latest_checkpoint(tmp_path).name == "step_00000006"


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_last_k(tmp_path, keep):
    for step in (10, 20, 30, 40, 50):
        save(tmp_path, step, keep=keep)
    assert ckpt.published_steps(tmp_path) == [10, 20, 30, 40, 50][-keep:]
    assert latest_checkpoint(tmp_path).name == "step_00000050"


def test_prune_never_deletes_latest(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, keep=5)
    ckpt.write_latest(tmp_path, "step_00000001")  # e.g. rolled back by hand
    ckpt.prune(tmp_path, keep=1)
    assert ckpt.published_steps(tmp_path) == [1, 3]


def test_resaving_the_latest_step_is_refused(tmp_path):
    save(tmp_path, 7)
    with pytest.raises(ckpt.CheckpointError, match="already the latest"):
        save(tmp_path, 7)


def test_state_round_trip_without_pickle(tmp_path, monkeypatch):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    state = {"rng": ckpt.rng_state(), "loader": {"epoch": 2, "perm": np.arange(10, dtype=np.int64),
             "offsets": torch.arange(4), "nested": [(1, 2.5, "a", None, True)], 7: "int key", "b": b"\x00\x01"}}
    ckpt.save_state_files(state, tmp_path, "rank_00000")

    def forbidden(*a, **k):
        raise AssertionError("our trainer-state files must load without unpickling")
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    back = ckpt.load_state_files(tmp_path, "rank_00000")
    monkeypatch.undo()
    loader = back["loader"]
    assert loader["epoch"] == 2 and loader[7] == "int key" and loader["b"] == b"\x00\x01"
    assert isinstance(loader["perm"], np.ndarray) and (loader["perm"] == np.arange(10)).all()
    assert isinstance(loader["offsets"], torch.Tensor) and torch.equal(loader["offsets"], torch.arange(4))
    assert loader["nested"] == [(1, 2.5, "a", None, True)]
    # the RNG states restore exactly
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(back["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect
    # and the files are plain JSON + safetensors
    json.loads((tmp_path / "rank_00000.json").read_text())
    assert (tmp_path / "rank_00000.safetensors").read_bytes()[8:9] == b"{"


def test_unsupported_state_type_is_a_clear_error(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="without pickle"):
        ckpt.save_state_files({"x": object()}, tmp_path, "bad")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_deepspeed_files_load_weights_only(tmp_path):
    torch.save({"module": {"w": torch.ones(2)}, "evil": Evil()}, tmp_path / "evil.pt")
    with ckpt.weights_only_loading():
        with pytest.raises(ckpt.CheckpointError, match="refusing to unpickle"):
            torch.load(tmp_path / "evil.pt", weights_only=False)  # forced to weights_only=True
    assert torch.load is not None and torch.load.__name__ == "load"  # restored
    # DeepSpeed's own classes on the allowlist do load
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.config import ZeroStageEnum
    torch.save({"zero_stage": ZeroStageEnum(2), "state": {"exp_avg": torch.zeros(3)}}, tmp_path / "ds.pt")
    with ckpt.weights_only_loading():
        sd = torch.load(tmp_path / "ds.pt")
    assert sd["zero_stage"] == ZeroStageEnum(2)


def test_load_refuses_a_different_world_size(tmp_path):
    save(tmp_path, 1)
    path = latest_checkpoint(tmp_path) / "trainer_state.json"
    data = json.loads(path.read_text())
    data["state"]["world_size"] = 4
    path.write_text(json.dumps(data))
    with pytest.raises(ckpt.CheckpointError, match="4 ranks"):
        ckpt.load_checkpoint(FakeEngine(), latest_checkpoint(tmp_path))


# ----------------------------------------------------------------------------- damaged checkpoints
DS_FILE = "mp_rank_00_model_states.pt"  # FakeEngine's (and DeepSpeed's) model-state file


def damage(folder: Path, kind: str, name: str = DS_FILE) -> str:
    """Truncate / flip one byte of / delete folder/name; returns the reason verify_checkpoint gives."""
    path = folder / name
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
        return f"{name}: size {len(data) // 2} != {len(data)}"
    if kind == "flipped":
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(flipped))
        return f"{name}: sha256 differs from the manifest"
    path.unlink()
    return f"{name} missing"


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    folder = save(tmp_path, 5)
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert manifest["format"] == 1 and set(manifest["files"]) == on_disk - {"manifest.json"}
    assert {DS_FILE, "model.safetensors", "trainer_state.json", "rank_00000.json"} <= set(manifest["files"])
    for rel, entry in manifest["files"].items():
        data = (folder / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert rd.verify_checkpoint(folder) is None


def test_manifest_is_written_before_publishing(tmp_path, monkeypatch):
    def crash(point, step, rank=0, value=None, grad_accum=1):
        if point == "save:before_publish":
            raise OSError("crash before publishing (simulated)")
        return value
    monkeypatch.setattr(ckpt.faults, "inject", crash)
    with pytest.raises(OSError):
        save(tmp_path, 3)
    tmp = tmp_path / "checkpoints" / ".tmp-step_00000003"
    assert (tmp / "manifest.json").is_file() and rd.verify_checkpoint(tmp) is None
    assert latest_checkpoint(tmp_path) is None and not (tmp_path / "checkpoints" / "step_00000003").exists()


@pytest.mark.parametrize("name", [DS_FILE, "model.safetensors", "rank_00000.json"])
@pytest.mark.parametrize("kind", ["truncated", "flipped", "missing"])
def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, kind, name):
    for step in (20, 40):
        save(tmp_path, step, keep=3)
    ck = tmp_path / "checkpoints"
    reason = damage(ck / "step_00000040", kind, name)
    choice = rd.newest_intact_checkpoint(tmp_path)
    assert choice.folder == ck / "step_00000020" and choice.verified
    assert choice.skipped == [(ck / "step_00000040", reason)]
    folder, line = ckpt.choose_resume_folder(tmp_path)
    assert folder == ck / "step_00000020"
    assert line == f"checkpoint step 40 is damaged ({reason}); resuming from step 20"
    assert latest_checkpoint(tmp_path) == folder  # `latest` points back at the one resumed from
    fresh = FakeEngine(0.0)
    trainer, rank = ckpt.load_checkpoint(fresh, folder)
    assert trainer["step"] == 20 and rank["loader"] == {"i": 20} and fresh.value == 20.0
    # reaching step 40 again replaces the damaged folder with an intact one
    save(tmp_path, 40, keep=3)
    assert latest_checkpoint(tmp_path).name == "step_00000040"
    assert rd.verify_checkpoint(ck / "step_00000040") is None


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    assert ckpt.choose_resume_folder(tmp_path) == (None, None)  # a new run: nothing to say
    for step in (20, 40):
        save(tmp_path, step, keep=3)
    ck = tmp_path / "checkpoints"
    why40 = damage(ck / "step_00000040", "truncated")
    why20 = damage(ck / "step_00000020", "flipped", "rank_00000.json")
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.choose_resume_folder(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"checkpoint step 40 is damaged ({why40}); checkpoint step 20 is damaged "
                          f"({why20}); no intact checkpoint is left under {ck}")
    assert (ck / "latest").read_text().strip() == "step_00000040"  # nothing was rewritten


def test_a_missing_or_unreadable_latest_pointer(tmp_path):
    for step in (20, 40):
        save(tmp_path, step, keep=3)
    ck = tmp_path / "checkpoints"
    (ck / "latest").write_text("")  # damaged pointer: the newest intact folder is still found
    choice = rd.newest_intact_checkpoint(tmp_path)
    assert choice.folder == ck / "step_00000040" and choice.skipped == [(ck / "latest", "the pointer file is unreadable")]
    (ck / "latest").write_text("step_00000060\n")  # names a folder that is gone
    choice = rd.newest_intact_checkpoint(tmp_path)
    assert choice.folder == ck / "step_00000040" and choice.skipped == [(ck / "step_00000060", "folder missing")]
    (ck / "latest").unlink()
    assert rd.newest_intact_checkpoint(tmp_path).folder == ck / "step_00000040"


def _flip_weight(folder: Path, value: float) -> str:
    """Flip a byte inside FakeEngine's weight tensor (six float32 `value`s) in its torch zip file."""
    path = folder / DS_FILE
    data = bytearray(path.read_bytes())
    at = bytes(data).find(struct.pack("<f", value) * 6)
    assert at > 0
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    return f"{DS_FILE}: CRC error in "


@pytest.mark.parametrize("kind, name", [("truncated", DS_FILE), ("flipped", DS_FILE),
                                        ("truncated", "model.safetensors"), ("missing", "model.safetensors"),
                                        ("flipped", "rank_00000.json")])
def test_checkpoints_without_a_manifest_get_a_readability_check(tmp_path, kind, name):
    """Written before manifests existed: loadable ones are used (and said to be unverified)."""
    for step in (20, 40):
        folder = save(tmp_path, step, keep=3)
        (folder / "manifest.json").unlink()
    ck = tmp_path / "checkpoints"
    choice = rd.newest_intact_checkpoint(tmp_path)
    assert choice.folder == ck / "step_00000040" and not choice.verified and not choice.skipped
    assert choice.report("resuming from") == ("checkpoint step 40 predates checkpoint manifests (no "
                                              "manifest.json): checked for readability only; resuming from step 40")
    if kind == "flipped" and name == DS_FILE:
        reason = _flip_weight(ck / "step_00000040", 40.0)
    elif kind == "truncated" and name == "model.safetensors":  # the last 4 bytes of tensor data cut off
        path = ck / "step_00000040" / name
        n = path.stat().st_size
        path.write_bytes(path.read_bytes()[:-4])
        reason = f"model.safetensors: size {n - 4} != {n} (its header)"
    elif name == "rank_00000.json":  # its first byte: no longer JSON
        path = ck / "step_00000040" / name
        path.write_bytes(b"X" + path.read_bytes()[1:])
        reason = "rank_00000.json: not valid JSON"
    else:
        damage(ck / "step_00000040", kind, name)
        reason = {DS_FILE: f"{DS_FILE}: not a readable torch zip archive",
                  "model.safetensors": "model.safetensors missing"}[name]
    choice = rd.newest_intact_checkpoint(tmp_path)
    assert choice.folder == ck / "step_00000020" and not choice.verified
    assert [f.name for f, _ in choice.skipped] == ["step_00000040"]
    assert choice.skipped[0][1].startswith(reason), choice.skipped[0][1]


# ----------------------------------------------------------------------------- loaders of a run
def _gpt_run(tmp_path: Path, steps=(20, 40)) -> Path:
    """A run directory with real GPT checkpoints (weights differ per step), as training leaves it."""
    from scaleinv_dist.config import load_config, save_config
    from scaleinv_dist.model import build_model
    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*TINY, "model.vocab_size=300"])
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    for step in steps:
        torch.manual_seed(step)
        folder = run / "checkpoints" / ckpt.tag_for(step)
        rd.save_weights(build_model(cfg), folder)
        ckpt.save_state_files({"step": step, "world_size": 1}, folder, "trainer_state")
        rd.write_manifest(folder)
        ckpt.write_latest(run, folder.name)
    return run


def _main(script: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"launch_{script}", ROOT / "launch" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_eval_generate_export_loaders_fall_back_or_refuse(tmp_path, capsys, one_thread):
    from safetensors.torch import load_file

    from scaleinv_dist.generate import load_model
    run = _gpt_run(tmp_path)
    ck = run / "checkpoints"
    reason = damage(ck / "step_00000040", "truncated", "model.safetensors")
    expect = load_file(str(ck / "step_00000020" / "model.safetensors"))
    for load in (lambda: load_trained_model(run), lambda: load_model(run, device="cpu")):
        model, _, folder = load()
        assert folder == ck / "step_00000020"
        assert all(torch.equal(v, expect[k]) for k, v in model.state_dict().items())
        err = capsys.readouterr().err
        assert err == f"warning: checkpoint step 40 is damaged ({reason}); using step 20\n"
    assert latest_checkpoint(run).name == "step_00000040"  # loaders never rewrite the run
    with pytest.raises(rd.DamagedCheckpointError, match="is damaged"):  # asked for by name
        load_trained_model(run, ck / "step_00000040")
    # nothing intact: every entry point says so in one line and exits 2
    why20 = damage(ck / "step_00000020", "flipped", "trainer_state.json")
    for script, argv in (("export", ["--run", str(run), "--out", str(tmp_path / "hf")]),
                         ("eval", ["--run", str(run), "--device", "cpu"])):
        with pytest.raises(SystemExit) as exit_:
            _main(script)(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2, (script, err)
        assert err == (f"error: checkpoint step 40 is damaged ({reason}); checkpoint step 20 is "
                       f"damaged ({why20}); no intact checkpoint is left under {ck}\n"), script
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------- a real process
@pytest.mark.slow
def test_killed_during_a_real_save_resumes_from_the_previous(tmp_path, train_env):
    """A 1-process DeepSpeed run dies (os._exit) after DeepSpeed wrote step 4's files but before
    publishing: step 2 stays latest, load_trained_model reads it, and a rerun resumes from it."""
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
            *TINY, f"run.out_dir={out}", "train.steps=5", "train.checkpoint_every=2"]
    env = {**train_env, "SCALEINV_TEST_CRASH_IN_SAVE": "after_deepspeed"}
    env["SCALEINV_TEST_CRASH_AT_STEP"] = "4"
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 17, r.stderr[-2000:]
    assert latest_checkpoint(out).name == "step_00000002"
    assert (out / "checkpoints" / ".tmp-step_00000004").is_dir()
    model, cfg, folder = load_trained_model(out)
    assert folder.name == "step_00000002" and cfg.model.vocab_size > 0
    r = subprocess.run(args, env=train_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "step 2" in r.stdout
    assert latest_checkpoint(out).name == "step_00000005"
    assert not (out / "checkpoints" / ".tmp-step_00000004").exists()


@pytest.mark.slow
def test_a_real_run_resumes_past_a_damaged_checkpoint(tmp_path, train_env):
    """1-process DeepSpeed runs: a run preempted at step 4 whose step-4 checkpoint is then truncated
    resumes from step 2, saying so in one line, with the losses of an uninterrupted run; once every
    checkpoint is damaged a restart exits 2 with one line and trains nothing."""
    def train(out, env=train_env):
        args = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
                *TINY, f"run.out_dir={out}", "train.steps=6", "train.checkpoint_every=2",
                "train.keep_checkpoints=3"]
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)

    def losses(out):
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if "split" not in r}

    full, parts = tmp_path / "full", tmp_path / "parts"
    r = train(full)
    assert r.returncode == 0, r.stderr[-2000:]
    r = train(parts, {**train_env, "SCALEINV_TEST_PREEMPT_AT_STEP": "4"})
    assert r.returncode == 75, r.stderr[-2000:]
    ck = parts / "checkpoints"
    assert latest_checkpoint(parts) == ck / "step_00000004"
    reason = damage(ck / "step_00000004", "truncated")
    r = train(parts)
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [line for line in r.stdout.splitlines() if "damaged" in line]
    assert warnings == [f"warning: checkpoint step 4 is damaged ({reason}); resuming from step 2"], r.stdout
    assert f"resumed from {ck / 'step_00000002'} (step 2)" in r.stdout
    a, b = losses(full), losses(parts)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])
    assert latest_checkpoint(parts) == ck / "step_00000006"
    assert all(rd.verify_checkpoint(ck / ckpt.tag_for(s)) is None for s in (2, 4, 6))

    # every checkpoint damaged: exit 2, one line, no fresh start
    why = {s: damage(ck / ckpt.tag_for(s), "flipped", "trainer_state.json") for s in (6, 4, 2)}
    before = (parts / "metrics.jsonl").read_text()
    r = train(parts)
    assert r.returncode == 2, r.stderr[-2000:]
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
        f"error: checkpoint step 6 is damaged ({why[6]}); checkpoint step 4 is damaged ({why[4]}); "
        f"checkpoint step 2 is damaged ({why[2]}); no intact checkpoint is left under {ck}: restore one "
        f"from a copy, or delete {ck} to start the run over"], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert (parts / "metrics.jsonl").read_text() == before
    assert ckpt.published_steps(parts) == [2, 4, 6] and latest_checkpoint(parts) == ck / "step_00000006"


TINY = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.n_kv_head=1", "train.seq_len=64",
        "train.micro_batch_size=4", "run.log_every=1", "run.wandb=disabled", "run.progress=false",
        "data.vocab_size=300", "data.max_documents=12", "attention.backend=reference"]
