"""Text tables and JSON records for evaluation results."""
from __future__ import annotations

import math
from typing import Mapping, Sequence


def _fmt(x, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def length_table(results: Mapping[int, dict], train_len: int) -> str:
    """Plain-text table: length, x train length, loss, ppl, tokens, windows."""
    head = f"{'length':>8} {'x train':>8} {'loss':>8} {'ppl':>10} {'tokens':>10} {'windows':>8}"
    lines = [head, "-" * len(head)]
    for L in sorted(results):
        r = results[L]
        ppl = r["ppl"]
        lines.append(f"{L:>8} {L / train_len:>8.2f} {_fmt(r['loss']):>8} "
                     f"{(_fmt(ppl, '.2f') if ppl < 1e9 else 'inf'):>10} {r['tokens']:>10} {r['windows']:>8}")
    return "\n".join(lines)


def metrics_records(results: Mapping[int, dict], step: int | None, train_len: int) -> list[dict]:
    """One metrics.jsonl record per length: {"split": "val", "context_length", "loss", "step", ...}."""
    return [{"split": "val", "context_length": int(L), "loss": results[L]["loss"], "step": step,
             "tokens": results[L]["tokens"], "length_multiple": L / train_len, "source": "eval"}
            for L in sorted(results)]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; floats with 3 decimals, None as '-'."""
    def cell(x):
        if isinstance(x, float):
            return _fmt(x, ".3f")
        return "-" if x is None else str(x)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(out)


def needle_table(grid: dict) -> str:
    """Depth x length accuracy as plain text, with the per-length mean as the last row."""
    lengths, depths, acc = grid["lengths"], grid["depths"], grid["accuracy"]
    lines = ["depth \\ length " + " ".join(f"{L:>8}" for L in lengths)]
    for d, row in zip(depths, acc):
        lines.append(f"{d:>14.2f} " + " ".join(f"{a:>8.2f}" for a in row))
    lines.append(f"{'mean':>14} " + " ".join(f"{a:>8.3f}" for a in grid["accuracy_by_length"]))
    return "\n".join(lines)


def score_stats_table(result: dict) -> str:
    """launch/score_stats.py's table: per layer and head, "mean / variance / mass ratio" of the
    scores in each distance bucket. result: the score_stats.json mapping."""
    edges = result["edges"]
    cols = [f"[{lo},{hi})" for lo, hi in zip(edges[:-1], edges[1:])]

    def cell(mean, var, mass):
        return "-" if mean is None or var is None else f"{mean:+.2f} / {var:.2f} / {mass:.2f}"

    rows = [[li, h, *(cell(m, v, r) for m, v, r in zip(layer["mean"][h], layer["var"][h], layer["mass"][h]))]
            for li, layer in enumerate(result["layers"]) for h in range(len(layer["mean"]))]
    return (f"mean / variance of S, and mass ratio E[exp(a S + m)](1 + t/tau) (1.65 at every distance "
            f"when S ~ N(0,1)); training length {result['train_len']}, scored at {result['length']}\n"
            + markdown_table(["layer", "head", *cols], rows))
