"""A sweep in parts: the time limit stops running stages (training checkpoints first), and a rerun
with skip_existing skips finished stages and resumes the rest. Stages are small stand-in scripts."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from scaleinv_dist.evaluate import sweep

# A stand-in for launch/train.py: `train RUN STEPS [block]` publishes checkpoints/step_<STEPS> and
# exits 0; with `block` it waits, and on SIGTERM publishes step 1 and exits 75 (as train.py does).
# `write RUN NAME` writes RUN/NAME (eval.json, niah.json); `ignore` ignores SIGTERM; `fail` exits 9.
STAGE = r'''
import os, signal, sys, time
from pathlib import Path
def publish(run, step):
    ck = Path(run) / "checkpoints"; (ck / f"step_{step:08d}").mkdir(parents=True, exist_ok=True)
    (ck / "latest").write_text(f"step_{step:08d}\n")
what = sys.argv[1]
if what == "train":
    run, steps = sys.argv[2], int(sys.argv[3])
    if "block" in sys.argv:
        signal.signal(signal.SIGTERM, lambda *a: (publish(run, 1), os._exit(75)))
        Path(run).mkdir(parents=True, exist_ok=True); (Path(run) / "started").write_text("")
        time.sleep(60); sys.exit(1)
    publish(run, steps)
elif what == "write":
    Path(sys.argv[2], sys.argv[3]).write_text("{}")
elif what == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)
elif what == "fail":
    sys.exit(9)
'''


@pytest.fixture
def stage(tmp_path):
    path = tmp_path / "stage.py"
    path.write_text(STAGE)
    return lambda *args: [sys.executable, str(path), *map(str, args)]


def job(stage, run: Path, steps=4, block=False, eval_cmd=None, niah=True) -> sweep.Job:
    train = stage("train", run, steps, *(["block"] if block else []))
    return sweep.Job("si_p_rope", run, train, eval_cmd or stage("write", run, "eval.json"),
                     niah_cmd=stage("write", run, "niah.json") if niah else None, steps=steps)


def wait_for(path: Path, timeout=30.0):
    t0 = time.time()
    while not path.exists():
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_time_limit_stops_training_with_a_checkpoint_and_starts_nothing_else(tmp_path, stage):
    run = tmp_path / "runs" / "a"
    j = job(stage, run, block=True)
    t0 = time.time()
    sweep.run_jobs([j], tmp_path / "logs", progress=False, deadline=t0 + 2.0)
    assert j.status == "stopped"
    assert time.time() - t0 < 30  # stopped at the deadline, not after the stand-in's 60 s
    assert (run / "started").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert not (tmp_path / "logs" / "a.eval.log").exists()  # eval never started
    assert sweep.finished_stages(j) == set()  # step 1 of 4: training is not finished


def test_a_stage_that_ignores_sigterm_is_killed_after_the_grace(tmp_path, stage, monkeypatch):
    monkeypatch.setattr(sweep, "STOP_GRACE_S", 0.5)
    run = tmp_path / "runs" / "a"
    j = job(stage, run, eval_cmd=stage("ignore"))
    t0 = time.time()
    sweep.run_jobs([j], tmp_path / "logs", progress=False, deadline=t0 + 1.5)
    assert j.status == "stopped" and time.time() - t0 < 30
    assert "stopped at the time limit" in (tmp_path / "logs" / "si_p_rope.eval.log").read_text()


def test_past_the_deadline_a_job_starts_nothing(tmp_path, stage):
    j = job(stage, tmp_path / "runs" / "a")
    sweep.run_jobs([j], tmp_path / "logs", progress=False, deadline=time.time() - 1)
    assert j.status == "stopped" and not (tmp_path / "runs" / "a").exists()


def test_finished_stages_follow_the_checkpoint_and_the_files_written_after_it(tmp_path, stage):
    run = tmp_path / "runs" / "a"
    j = job(stage, run)
    assert sweep.finished_stages(j) == set()
    sweep.run_jobs([j], tmp_path / "logs", progress=False)
    assert j.status == "ok" and sweep.finished_stages(j) == {"train", "eval", "niah"}
    # a newer checkpoint (more training) makes the evaluation and the needle test stale
    later = time.time() + 5
    os.utime(run / "checkpoints" / "latest", (later, later))
    assert sweep.finished_stages(j) == {"train"}
    # the needle result only counts after a current evaluation
    os.utime(run / "niah.json", (later + 1, later + 1))
    assert sweep.finished_stages(j) == {"train"}
    # a run trained to fewer steps than the job asks for is not finished
    assert sweep.finished_stages(job(stage, run, steps=8)) == set()


def test_skip_existing_resumes_a_stopped_sweep_and_reruns_no_finished_stage(tmp_path, stage):
    runs = tmp_path / "runs"
    stopped = job(stage, runs / "a", block=True)
    sweep.run_jobs([stopped], tmp_path / "logs", progress=False, deadline=time.time() + 2.0)
    assert stopped.status == "stopped"
    # the continuation: "a" trains on to its last step, then is evaluated and needle-tested; "b"
    # is finished, and every one of its commands would fail if it ran
    resumed = job(stage, runs / "a")
    sweep.run_jobs([job(stage, runs / "b")], tmp_path / "logs", progress=False)
    done = sweep.Job("si_p_rope", runs / "b", stage("fail"), stage("fail"), niah_cmd=stage("fail"),
                     steps=4, name="b")
    sweep.run_jobs([resumed, done], tmp_path / "logs2", progress=False, skip_existing=True)
    assert resumed.status == "ok" and done.status == "ok"
    assert (runs / "a" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (runs / "a" / "niah.json").is_file()
    assert not any((tmp_path / "logs2").glob("b.*.log"))


def test_a_time_limit_that_is_not_positive_is_a_one_line_usage_error(tmp_path):
    import subprocess
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "launch/sweep.py", "--config", "configs/tiny.yaml", "--out",
                           str(tmp_path / "sw"), "--time-limit", "0"], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --time-limit must be a positive number of seconds"], proc.stderr
    assert not (tmp_path / "sw").exists()


def test_a_sweep_in_parts_adds_up_its_times_and_keeps_every_command():
    from scaleinv_dist.evaluate.publish import _parts_note

    def summary(command, seconds, data_s, date, train_s, eval_s):
        return {"command": command, "seconds": seconds, "data_seconds": data_s, "date": date,
                "rows": [{"name": "nope", "train_s": train_s, "eval_s": eval_s, "niah_s": 0.0}]}

    first = sweep.add_parts(summary("sweep A", 540.0, 100.0, "2026-12-05", 430.0, 0.0), None)
    assert first["parts"] == [{"command": "sweep A", "seconds": 540.0, "data_seconds": 100.0,
                               "date": "2026-12-05"}]
    second = sweep.add_parts(summary("sweep A --skip-existing", 180.0, 20.0, "2026-12-06", 90.0, 30.0), first)
    assert [p["command"] for p in second["parts"]] == ["sweep A", "sweep A --skip-existing"]
    assert second["seconds"] == 720.0 and second["data_seconds"] == 120.0 and second["date"] == "2026-12-05"
    assert second["rows"][0]["train_s"] == 520.0 and second["rows"][0]["eval_s"] == 30.0
    assert _parts_note(second["parts"]) == " in 2 parts (9.0 + 3.0 min)" and _parts_note(first["parts"]) == ""
    # a summary written before parts were recorded counts as the first part
    legacy = {k: v for k, v in summary("old", 300.0, 60.0, "2026-12-01", 200.0, 10.0).items()}
    third = sweep.add_parts(summary("old --skip-existing", 60.0, 5.0, "2026-12-02", 0.0, 5.0), legacy)
    assert [p["seconds"] for p in third["parts"]] == [300.0, 60.0] and third["rows"][0]["eval_s"] == 15.0


def test_the_smoke_plan_stopped_by_its_time_limit_finishes_when_continued(tmp_path):
    """The real pipeline: part 1 stops at the time limit (exit 75), part 2 finishes every job."""
    import json
    import subprocess
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "SCALEINV_CACHE": os.environ.get("SCALEINV_CACHE") or str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "sw"
    cmd = [sys.executable, "launch/sweep.py", "--plan", "configs/sweeps/python-smoke.yaml", "--out", str(out),
           "--methods", "si_p_rope", "--steps", "150", "--time-limit", "8"]
    first = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 75, first.stdout[-2000:] + first.stderr[-2000:]
    assert "stopped at the time limit" in first.stdout and "--skip-existing" in first.stdout
    second = subprocess.run(cmd + ["--time-limit", "600", "--skip-existing"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    summary = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in summary["rows"]] == ["ok", "ok"]
    assert all(r["step"] == 150 for r in summary["rows"]) and len(summary["parts"]) == 2
