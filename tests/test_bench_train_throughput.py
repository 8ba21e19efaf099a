"""benchmarks/train_throughput.py --smoke runs end to end on CPU (both attention implementations,
compile off and on, per-length checkpointing, the profiled split) and writes its tables and the
top-kernel files. No timing is asserted. The report of an out-of-memory row is checked in process."""
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import train_throughput  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_throughput_smoke(tmp_path, train_env):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--smoke",
                        "--out", str(out)], env=train_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "train_throughput.jsonl").read_text().splitlines()]
    seen = {(r["impl"], r["seq_len"], r["ckpt"], r["compile"]) for r in rows}
    assert seen == {(i, n, c, comp) for i in ("ours", "sdpa-rope") for n, c in ((64, "selective"), (128, "full"))
                    for comp in (False, True)}
    for row in rows:
        assert row["status"] == "ok" and row["step_s"] > 0, row
        assert row["kernel"] == ("sdpa-cudnn" if row["impl"] == "sdpa-rope" else "reference"), row
        assert row["attn_fwd_ms"] > 0 and row["attn_bwd_ms"] > 0 and row["rest_ms"] > 0, row
        assert row["attn_fwd_ms"] + row["attn_bwd_ms"] < row["busy_ms"], row
        assert row["graphs_compiled"] == 0, row  # the profiled step reuses the timed steps' graphs
        mode = "compiled" if row["compile"] else "eager"
        name = f"top_kernels_{row['impl']}_{row['seq_len']}_{row['ckpt']}_{mode}.txt"
        assert "Self CPU" in (out / name).read_text()
    report = (out / "RESULTS.md").read_text()
    assert "## train_throughput" in report and "attn bwd" in report and "--smoke" in report
    assert "| idle | graphs compiled |" in report
    assert (out / "step_split.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| ours | reference |" in report and "attention runs on: reference" in r.stderr


@pytest.mark.parametrize("args, words", [(["--ckpt", "4096:bogus"], "--ckpt entry"),
                                         (["--compile", "maybe"], "--compile takes")])
def test_bad_options_are_one_line_errors(train_env, args, words):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--lengths", "4096", *args],
                       env=train_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_oom_detail_keeps_the_allocators_numbers_and_drops_its_advice():
    """An out-of-memory row records what was asked for and what was in use, not the allocator's
    closing advice (and no peak on CPU, where there is no CUDA allocator to ask)."""
    err = torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 6.00 GiB. GPU 0 has a total capacity of 79.19 GiB of\n"
        "which 2.31 GiB is free. Of the allocated memory 70.12 GiB is allocated by PyTorch. If "
        "reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=...")
    detail = train_throughput.oom_detail(err, torch.device("cpu"))
    assert detail == {"oom": "CUDA out of memory. Tried to allocate 6.00 GiB. GPU 0 has a total "
                             "capacity of 79.19 GiB of which 2.31 GiB is free. Of the allocated "
                             "memory 70.12 GiB is allocated by PyTorch."}


def test_report_shows_an_oom_rows_peak_and_message(tmp_path):
    """An out-of-memory row shows the peak before the failure in the table, and the allocator's
    message below it and in the JSON lines."""
    row = dict(impl="ours-hopper", seq_len=2097152, gpus=1, ckpt="offload", compile=True,
               status="OOM", kernel="hopper", probe="longest", peak_gib=75.25,
               oom="CUDA out of memory. Tried to allocate 6.00 GiB.")
    args = types.SimpleNamespace(results=str(tmp_path / "RESULTS.md"))
    train_throughput.report([row], args, 989.0, torch.device("cpu"), tmp_path / "out")
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| ours-hopper | hopper | 2097152 | | 1 | offload | on | OOM | | | 75.2 before failing | |" in text
    assert "- ours-hopper at 2097152 tokens, offload: CUDA out of memory. Tried to allocate 6.00 GiB." in text
    assert json.loads((tmp_path / "out" / "train_throughput.jsonl").read_text())["oom"] == row["oom"]


@pytest.mark.timeout(300)
def test_a_profiled_step_that_compiles_is_profiled_again(tmp_path, capsys):
    """Profiled with no step before it, a compiled model builds its graphs inside the profile: the
    step is repeated, the reported split comes from the repeat (no graph built), and the table
    shows the first step's count in brackets."""
    cfg = train_throughput.load_config(str(ROOT / "configs" / "tiny.yaml"),
                                       [*train_throughput.SMOKE_OVERRIDES, "train.seq_len=64"])
    cpu = torch.device("cpu")
    model = train_throughput.build(cfg, "ours", 256, "selective", True, cpu)
    state = {"on": False}
    model.attend = train_throughput.marked_attend(model.attend, state, lambda *_: "reference")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    top = tmp_path / "top.txt"
    row = train_throughput.profile_step(model, opt, 2, 64, 256, cpu, state, top)
    assert row["graphs_compiled_before"] > 0 and row["graphs_compiled"] == 0, row
    assert row["attn_fwd_ms"] > 0 and row["busy_ms"] > row["attn_fwd_ms"], row
    assert "prof" not in row and "recompile_reasons" not in row
    assert "profiling one more step" in capsys.readouterr().err
    assert "Self CPU" in top.read_text()
    assert train_throughput.graphs_cell(row) == f"0 ({row['graphs_compiled_before']} before)"
    assert train_throughput.graphs_cell({"graphs_compiled": 0}) == "0"
