"""benchmarks/memory_peak.py without a GPU: the replay of an allocator trace (the shape
torch.cuda.memory._snapshot() returns) to the allocations alive at its peak or at an
out-of-memory error, grouped by the innermost frame of our code."""
import pickle
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import memory_peak  # noqa: E402

GiB = 2**30
MODEL = {"filename": "/x/repo/scaleinv_dist/model.py", "line": 120, "name": "forward"}
LOSS = {"filename": "/x/repo/scaleinv_dist/loss.py", "line": 85, "name": "forward"}
TORCH = {"filename": "/usr/lib/python3/site-packages/torch/nn/functional.py", "line": 9, "name": "linear"}


def _ev(action, addr, gib, *frames):
    return {"action": action, "addr": addr, "size": int(gib * GiB), "frames": list(frames)}


def test_the_peak_is_the_largest_total_and_lists_what_was_alive_then():
    trace = [_ev("alloc", 1, 6, TORCH, MODEL), _ev("alloc", 2, 3, MODEL),
             _ev("alloc", 3, 6, LOSS),                # peak: 15 GiB, all three alive
             _ev("free_requested", 1, 6, MODEL),      # not yet given back: still counted
             _ev("free_completed", 1, 6, MODEL),
             _ev("alloc", 4, 2, TORCH)]               # 11 GiB: below the peak
    peak, rows, oom = memory_peak.peak_allocations(trace)
    assert peak == 15 * GiB and oom is None
    assert rows == [("scaleinv_dist/model.py:120 forward", 9 * GiB, 2),
                    ("scaleinv_dist/loss.py:85 forward", 6 * GiB, 1)]


def test_after_out_of_memory_the_live_set_is_the_one_at_the_failed_request():
    trace = [_ev("alloc", 1, 4, MODEL), _ev("alloc", 2, 70, MODEL), _ev("free_completed", 2, 70),
             _ev("alloc", 3, 60, TORCH), _ev("oom", 0, 8),
             _ev("free_completed", 3, 60)]             # unwinding after the error
    live, rows, oom = memory_peak.peak_allocations(trace)
    assert live == 64 * GiB and oom["size"] == 8 * GiB
    assert rows[0] == ("/usr/lib/python3/site-packages/torch/nn/functional.py:9 linear", 60 * GiB, 1)
    text = memory_peak.summary({"device_traces": [trace]}, top=1)
    assert "at the failed allocation: 64.00 GiB" in text and "asking for 8.00 GiB" in text
    assert "| (1 more places) | 4.00 | 1 |" in text


def test_cli_summarises_a_snapshot_file_and_refuses_a_bad_one_in_one_line(tmp_path):
    snap = tmp_path / "snap.pickle"
    snap.write_bytes(pickle.dumps({"device_traces": [[_ev("alloc", 1, 1, LOSS)]], "segments": []}))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_peak.py"), str(snap)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "| scaleinv_dist/loss.py:85 forward | 1.00 | 1 |" in r.stdout, r
    (tmp_path / "bad.pickle").write_text("not a pickle")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_peak.py"),
                        str(tmp_path / "bad.pickle")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot read" in r.stderr, r


def test_recorded_writes_the_summary_also_when_the_step_runs_out_of_memory(tmp_path, monkeypatch):
    """The CUDA plumbing with the allocator's history API stubbed (no GPU here): recording starts
    before the block, stops after it, and the summary is written even when the block raises."""
    import pytest
    import torch

    calls = []
    trace = [_ev("alloc", 1, 2, MODEL), _ev("oom", 0, 4)]
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history",
                        lambda enabled="all", **kw: calls.append(enabled))
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: {"device_traces": [trace]})
    path = tmp_path / "sub" / "memory_peak.txt"
    with pytest.raises(torch.cuda.OutOfMemoryError):
        with memory_peak.recorded(path, torch.device("cuda", 0)):
            assert calls == ["all"]
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    assert calls == ["all", None]
    assert "asking for 4.00 GiB" in path.read_text()
    with memory_peak.recorded(tmp_path / "cpu.txt", torch.device("cpu")):  # CPU: nothing recorded
        pass
    assert calls == ["all", None] and not (tmp_path / "cpu.txt").exists()
