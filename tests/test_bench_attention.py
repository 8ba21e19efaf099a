"""benchmarks/attention.py without a GPU: the timing and ratio tables it prints from measured
(fwd ms, bwd ms) per (D, N, impl). The script imports triton (through our kernels), so, as in the
kernel tests, TRITON_INTERPRET=1 is set before that import: a triton imported without it has no
driver on CPU for the test files that follow."""
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import attention as bench  # noqa: E402


def _rows(lines, header_start):
    """The data rows (lists of cells) of the markdown table whose header begins with
    header_start; every row has the header's number of cells."""
    i = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = lines[i].strip("|").split("|")
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line.strip("|").split("|"))
    assert all(len(r) == len(header) for r in rows), (header, rows)
    return [[c.strip() for c in r] for r in rows]


def test_ratio_table_takes_the_fastest_si_and_plain_kernel_per_direction():
    d, n = 128, 16384
    results = {(d, n, "hopper-si"): (2.0, 5.0), (d, n, "ours-si"): (1.8, 9.0),
               (d, n, "fa4"): (1.6, 4.5), (d, n, "sdpa-cudnn"): (1.5, 4.8)}
    lines = bench.timing_table(results, [n], [d])
    timings = _rows(lines, "| D | N (BxH) |")
    assert [r[2] for r in timings] == ["hopper-si", "ours-si", "fa4", "sdpa-cudnn"]
    (ratio,) = _rows(lines, "| D | N | our fastest SI")
    # D, N, fastest SI, fastest plain; then fastest plain time over ours (1.5 / 1.8 forward,
    # 4.5 / 5.0 backward), flex-si (not run) and cuDNN (1.5 / 1.8, 4.8 / 5.0)
    assert ratio == ["128", "16384", "ours-si / hopper-si", "sdpa-cudnn / fa4", "0.83", "0.90",
                     "n/a", "n/a", "0.83", "0.96"]


def test_plot_draws_every_timed_implementation(tmp_path):
    """The TFLOP/s plot: one PNG with a panel per (D, direction); an untimed or failed
    implementation leaves a gap, not an error."""
    results = {(d, n, m): (1.0 + i, 2.0 + i) for d in (64, 128) for n in (4096, 16384)
               for i, m in enumerate(("hopper-si", "fa4", "sdpa-cudnn"))}
    results[(64, 4096, "fa4")] = None
    path = bench.plot_timing(results, [4096, 16384], [64, 128], "test", tmp_path / "a.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
