"""benchmarks/hopper_pipes.py without a GPU: how it reads Nsight Compute's CSV and lays out its
tables (the measurement itself needs ncu and an sm90 GPU)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import hopper_pipes  # noqa: E402

HEAD = '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",' \
       '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"'


def _line(kid, kernel, metric, unit, value):
    return (f'"{kid}","1","python3","h","{kernel}","1","7","(384, 1, 1)","(132, 1, 1)","0","9.0",'
            f'"Command line profiler metrics","{metric}","{unit}","{value}"')


def test_parse_ncu_csv_groups_metrics_by_kernel_and_converts_durations():
    metrics = {"XU (MUFU)": "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active"}
    fwd = "kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_object"
    pre = "kernel_cutlass_kernel_flash_attncuteflash_bwd_preprocessFlashAttentionBackwardPreprocess"
    text = "\n".join(["==PROF== Connected to process 1", "program output", HEAD,
                      _line(0, fwd, metrics["XU (MUFU)"], "%", "55.40"),
                      _line(0, fwd, hopper_pipes.DURATION, "msecond", "2.68"),
                      _line(1, pre, metrics["XU (MUFU)"], "%", "0"),
                      _line(1, pre, hopper_pipes.DURATION, "usecond", "1,090.5")])
    rows = hopper_pipes.parse_ncu_csv(text, metrics)
    assert [r["kernel"] for r in rows] == ["fwd", "bwd pre"]
    assert rows[0]["XU (MUFU)"] == pytest.approx(55.4) and rows[0]["ms"] == pytest.approx(2.68)
    assert rows[1]["ms"] == pytest.approx(1.0905)  # thousands separator and usecond


def test_stall_table_keeps_the_reasons_that_matter_largest_first():
    results = {"plain": [{"kernel": "fwd", "ms": 1.75, "gmma": 0.48, "wait": 1.45, "sleeping": 0.01},
                         {"kernel": "bwd", "ms": 4.6, "gmma": 9.0}],
               "mufu": [{"kernel": "fwd", "ms": 2.68, "gmma": 0.05, "wait": 0.73, "sleeping": 0.0}]}
    text = hopper_pipes.stall_table(results, ["gmma", "wait", "sleeping"], 16384, 128)
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert rows[0] == "| stall reason | plain | mufu |"
    assert rows[1] == "| (kernel ms) | 1.75 | 2.68 |"
    assert rows[2:] == ["| wait | 1.45 | 0.73 |", "| gmma | 0.48 | 0.05 |"]  # bwd ignored, sleeping dropped
