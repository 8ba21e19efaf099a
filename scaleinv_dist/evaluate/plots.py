"""PNG figures for the evaluations (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _mark_train(ax, train_len: int | None) -> None:
    if train_len:
        ax.axvline(train_len, color="grey", linestyle="--", linewidth=1, label=f"train length {train_len}")


def bucket_centre(lo: int, hi: int) -> float:
    """Where a bucket [lo, hi) of tokens is drawn on a log axis: the geometric centre of lo and
    hi - 1; the bucket starting at 0 at 0.5."""
    return max(0.5, (lo * max(hi - 1, 1)) ** 0.5) if lo else 0.5


def plot_loss_vs_length(results: Mapping[int, dict], train_len: int | None, path: str | Path,
                        title: str = "") -> Path:
    """Two panels: mean loss against context length; loss by position bucket, one line per length."""
    lengths = sorted(int(k) for k in results)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(lengths, [results[L]["loss"] for L in lengths], marker="o")
    a.set_xscale("log", base=2)
    a.set_xlabel("context length (tokens)")
    a.set_ylabel("validation loss (nats/token)")
    a.set_title("loss vs context length")
    a.ticklabel_format(axis="y", useOffset=False, style="plain")
    _mark_train(a, train_len)
    a.legend(fontsize=8)
    for L in lengths:
        bs = [x for x in results[L]["buckets"] if x["count"] > 0]
        xs = [bucket_centre(x["lo"], x["hi"]) for x in bs]
        b.plot(xs, [x["loss"] for x in bs], marker=".", label=f"L={L}")
    b.set_xscale("log", base=2)
    b.set_xlabel("position in window (tokens of context)")
    b.set_ylabel("loss (nats/token)")
    b.set_title("loss by position bucket (log2 buckets)")
    b.ticklabel_format(axis="y", useOffset=False, style="plain")
    _mark_train(b, train_len)
    b.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_needle_heatmap(grid: dict, path: str | Path, train_len: int | None = None, title: str = "") -> Path:
    """Depth (rows) x context length (columns) retrieval accuracy, annotated."""
    acc, depths, lengths = grid["accuracy"], grid["depths"], grid["lengths"]
    fig, ax = plt.subplots(figsize=(max(5.5, 2.4 + 1.1 * len(lengths)), 1.8 + 0.45 * len(depths)))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{L}" + ("*" if L == train_len else "") for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_xlabel("context length (tokens; * = training length)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{acc[i][j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    import textwrap

    sub = f"needle retrieval ({grid.get('mode', 'teacher')}, {grid.get('samples')} per cell)"
    lines = [w for part in ([title, sub] if title else [sub]) for w in textwrap.wrap(part, 60)]
    ax.set_title("\n".join(lines), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _finish_log2_plot(fig, ax, train_len: int | None, path: str | Path, title: str,
                      xlabel: str = "context length (tokens)",
                      ylabel: str = "validation loss (nats/token)") -> Path:
    """Log2 x axis, labels, the training length marked, legend and title; saved to path."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    _mark_train(ax, train_len)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_methods(rows: Sequence[dict], train_len: int | None, path: str | Path, title: str = "") -> Path:
    """Loss against context length, one line per method (rows: {"method", "losses": {L: loss}})."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for row in rows:
        pts = sorted((int(L), v) for L, v in row["losses"].items() if v is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=row["method"])
    return _finish_log2_plot(fig, ax, train_len, path, title or "validation loss vs context length")


def plot_method_means(agg: Mapping[str, dict], train_len: int, path: str | Path, title: str = "") -> Path:
    """Mean loss over seeds against context length, one line per method, error bars = sample std
    (agg: evaluate.sweep.aggregate's output; its multiples are keyed as strings)."""
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for m in agg.values():
        pts = sorted((float(k) * train_len, v, m["std"].get(k) or 0.0) for k, v in m["mean"].items()
                     if v is not None)
        if pts:
            n = len(m["seeds"])
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        capsize=3, label=m["label"] + (f" ({n} seeds)" if n > 1 else ""))
    return _finish_log2_plot(fig, ax, train_len, path, title or "validation loss vs context length")


def plot_bucket_curves(rows: Sequence[dict], length: int, train_len: int, path: str | Path,
                       title: str = "") -> Path:
    """Loss by log-spaced position bucket at one evaluation length, one line per method (buckets
    summed over the method's seeds). rows: sweep rows with "buckets": {str(length): [...]}."""
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    by_method: dict[str, dict] = {}
    for r in rows:
        bs = (r.get("buckets") or {}).get(str(length))
        if not bs:
            continue
        acc = by_method.setdefault(r["method"], {})
        for x in bs:
            s = acc.setdefault((x["lo"], x["hi"]), [0.0, 0])
            s[0] += x["loss_sum"]
            s[1] += x["count"]
    for label, acc in by_method.items():
        pts = sorted((bucket_centre(lo, hi), s / c) for (lo, hi), (s, c) in acc.items() if c > 0)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=label)
    return _finish_log2_plot(fig, ax, train_len, path,
                             title or f"loss by position bucket at context length {length}",
                             xlabel="position in window (tokens of context)",
                             ylabel="loss (nats/token)")


def plot_needle_grids(grids: Mapping[str, dict], path: str | Path, train_len: int | None = None,
                      title: str = "") -> Path:
    """Depth x length needle accuracy heatmaps side by side, one panel per method ({label: grid})."""
    items = list(grids.items())
    cols = min(3, len(items))
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False,
                             constrained_layout=True)
    for ax in axes.ravel()[len(items):]:
        ax.axis("off")
    im = None
    for ax, (label, g) in zip(axes.ravel(), items):
        acc, depths, lengths = g["accuracy"], g["depths"], g["lengths"]
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{L}" + ("*" if L == train_len else "") for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f"{acc[i][j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("context length (* = training length)", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), label="accuracy", shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_score_stats(result: dict, path: str | Path, title: str) -> Path:
    """launch/score_stats.py's figure: two rows of panels, one column per layer, the variance of
    the scores and the mass ratio against distance, one line per head; dotted: their N(0, 1)
    values (1 and e^0.5). result: the score_stats.json mapping."""
    import math

    edges, layers = result["edges"], result["layers"]
    centres = [bucket_centre(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]
    fig, axes = plt.subplots(2, len(layers), figsize=(3.2 * len(layers) + 1, 6), squeeze=False, sharex=True)
    for li, layer in enumerate(layers):
        for row, (key, ref, label) in enumerate((("var", 1.0, "variance of S"),
                                                  ("mass", math.exp(0.5), "mass ratio (log scale)"))):
            ax = axes[row][li]
            for h, values in enumerate(layer[key]):
                pts = [(x, y) for x, y in zip(centres, values) if y is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"head {h}")
            ax.axhline(ref, color="black", linewidth=0.8, linestyle=":")
            _mark_train(ax, result["train_len"])
            ax.set_xscale("log", base=2)
            if key == "mass":
                ax.set_yscale("log")
            if li == 0:
                ax.set_ylabel(label)
            if row == 0:
                ax.set_title(f"layer {li}")
            else:
                ax.set_xlabel("distance t (tokens)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title} (dotted: the N(0,1) value)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
