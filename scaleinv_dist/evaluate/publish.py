"""Publish a finished sweep into the docs: reproduction.json, figures and a RESULTS.md section.

    publish(Path("runs/sweep-python"), Path("docs"))

Reads only <sweep>/sweep.json and <sweep>/data_manifest.json (both at the top of the sweep folder,
so a copy of those two files is enough) and writes
    docs/reproduction.json                  issue 17's machine-readable shape (sweep.reproduction)
    docs/python_sweep_loss_vs_length.png    mean loss over seeds against length, error bars = std
    docs/python_sweep_buckets.png           loss by position bucket at the longest length
    docs/python_sweep_needle.png            depth x length needle heatmap, one panel per method
    docs/RESULTS.md                         the section between SECTION_BEGIN and SECTION_END,
                                            replaced (or inserted after the title)
The comparison with the paper is computed from the numbers with fixed rules (paper_checks), so
the text says what the numbers say; nothing is tuned here.
"""
from __future__ import annotations

import json
from pathlib import Path

from .common import EvalError
from .sweep import aggregate, finetune_cell, mult_key, reproduction

SECTION_BEGIN = "<!-- python-sweep:begin (written by launch/sweep.py --publish) -->"
SECTION_END = "<!-- python-sweep:end -->"
# what the paper leads us to expect at 16x (issue 17)
SI_FLAT_NATS = 0.05  # scale-invariant p-RoPE within this of its 1x loss
ROPE_GAP_NATS = 0.5  # RoPE and p-RoPE at least this much above scale-invariant p-RoPE
SI_NEEDLE_MIN = 0.8  # needle accuracy of scale-invariant p-RoPE
ROPE_NEEDLE_MAX = 0.1  # "near 0" for RoPE


def _load(sweep_dir: Path) -> tuple[dict, dict | None]:
    path = sweep_dir / "sweep.json"
    if not path.is_file():
        raise EvalError(f"{path} does not exist; point --publish at a finished sweep folder (or a copy "
                        "of its sweep.json and data_manifest.json)")
    summary = json.loads(path.read_text())
    mpath = sweep_dir / "data_manifest.json"
    return summary, (json.loads(mpath.read_text()) if mpath.is_file() else None)


def _parts_note(parts: list[dict]) -> str:
    """" in 2 parts (9.0 + 3.1 min)" for a sweep run in parts (launch/sweep.py --time-limit), else ""."""
    if len(parts) < 2:
        return ""
    minutes = " + ".join(f"{(p.get('seconds') or 0) / 60:.1f}" for p in parts)
    return f" in {len(parts)} parts ({minutes} min)"


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def paper_checks(agg: dict, far: str) -> list[tuple[str, bool | None, str]]:
    """[(expectation, held?, the numbers)] for the paper's claims at multiple `far` (e.g. "16");
    held is None when the numbers are missing."""
    def mean(m, k):
        return (agg.get(m) or {}).get("mean", {}).get(k)

    out = []
    si1, si_far = mean("si_p_rope", "1"), mean("si_p_rope", far)
    if si1 is not None and si_far is not None:
        d = si_far - si1
        out.append((f"scale-invariant p-RoPE within {SI_FLAT_NATS} nats of its 1x loss at {far}x",
                    abs(d) <= SI_FLAT_NATS, f"{far}x - 1x = {d:+.3f}"))
    fars = {m: mean(m, far) for m in agg if mean(m, far) is not None}
    if si_far is not None and fars:
        best = min(fars, key=fars.get)
        out.append((f"scale-invariant p-RoPE the best of the methods at {far}x", best == "si_p_rope",
                    f"best: {agg[best]['label']} {fars[best]:.3f}; scale-invariant p-RoPE {si_far:.3f}"))
    for m in ("rope", "p_rope"):
        if si_far is not None and mean(m, far) is not None:
            gap = mean(m, far) - si_far
            out.append((f"{agg[m]['label']} at least {ROPE_GAP_NATS} nats above scale-invariant p-RoPE at {far}x",
                        gap >= ROPE_GAP_NATS, f"gap {gap:+.3f}"))
    nd = {m: (agg.get(m) or {}).get("needle", {}) for m in ("si_p_rope", "rope")}
    if far in nd["si_p_rope"]:
        out.append((f"needle accuracy of scale-invariant p-RoPE >= {SI_NEEDLE_MIN} at {far}x",
                    nd["si_p_rope"][far] >= SI_NEEDLE_MIN, f"{nd['si_p_rope'][far]:.2f}"))
    if far in nd["rope"]:
        out.append((f"needle accuracy of RoPE near 0 (<= {ROPE_NEEDLE_MAX}) at {far}x",
                    nd["rope"][far] <= ROPE_NEEDLE_MAX, f"{nd['rope'][far]:.2f}"))
    return out


def section(summary: dict, manifest: dict | None, figures: dict) -> str:
    """The RESULTS.md section (markdown) for one sweep."""
    from .report import markdown_table

    agg = aggregate(summary)
    rep = reproduction(summary, manifest)
    c = rep["corpus"]
    L = summary["train_len"]
    mults = [mult_key(m) for m in summary["multiples"]]
    py = (manifest or {}).get("python_corpus") or {}
    parts = summary.get("parts") or [{"command": summary.get("command"), "seconds": summary.get("seconds")}]
    lines = [SECTION_BEGIN, "",
             f"## Method sweep on the python corpus — {summary.get('device', '?')}, L = {L} (issue 17)", "",
             f"{summary.get('date', '?')}, torch {summary.get('torch', '?')}; one run per (method, seed), "
             f"{summary.get('parallel', '?')} at a time.", "",
             f"Corpus `{c['name']}`: {_fmt(c['train_tokens'], ',')} training / {_fmt(c['val_tokens'], ',')} "
             f"validation tokens ({c['train_docs']} / {c['val_docs']} documents) from Python "
             f"{py.get('python', '?')} and {len(py.get('distributions', []))} installed distributions "
             f"(manifest: data_manifest.json of the sweep), vocabulary {c['vocab_size']}. "
             f"Each run trains {summary.get('steps')} steps, {_fmt(c['tokens_per_run'], ',')} tokens = "
             f"{_fmt(c['epochs_per_run'], '.3f')} epochs (no token seen twice); every length scores the same "
             f"held-out tokens ({', '.join(f'{t:,}' for t in c['eval_tokens_per_length']) or '-'} per length). "
             f"Wall time {summary.get('seconds', 0) / 60:.1f} min{_parts_note(parts)}, data preparation "
             f"{summary.get('data_seconds', 0):.0f} s.", "",
             "```bash", *[p.get("command") or f"python launch/sweep.py --plan {summary.get('plan')} --out OUT"
                          for p in parts],
             "```", "",
             "Loss (nats/token, mean ± sample std over seeds; one value when one seed):", ""]
    head = ["method", "seeds"] + [f"{m}x ({int(round(float(m) * L))})" for m in mults]
    if "1" in mults and len(mults) > 1:
        head.append(f"{mults[-1]}x − 1x")
    body = []
    for key, m in agg.items():
        cells = []
        for k in mults:
            mean, std = m["mean"].get(k), m["std"].get(k)
            cells.append("-" if mean is None else f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else ""))
        row = [m["label"], ", ".join(str(s) for s in m["seeds"])] + cells
        if "1" in mults and len(mults) > 1:
            a, b = m["mean"].get("1"), m["mean"].get(mults[-1])
            row.append("-" if a is None or b is None else f"{b - a:+.3f}")
        body.append(row)
    lines += [markdown_table(head, body), "", f"![loss against length]({figures['means']})", "",
              f"![loss by position bucket]({figures['buckets']})", ""]
    needle = {k: m["needle"] for k, m in agg.items() if m["needle"]}
    if needle:
        nm = sorted({k for v in needle.values() for k in v}, key=float)
        ft = {}
        for r in summary["rows"]:
            if r.get("needle"):
                ft.setdefault(r.get("key", r["name"]), finetune_cell(r["needle"]))
        first = next((r["needle"].get("finetune") for r in summary["rows"] if r.get("needle")), None) or {}
        rounds = (f" in rounds of {first['round_steps']} steps, repeated until the accuracy at "
                  f"{first.get('length', L)} tokens on training-split contexts reached "
                  f"{first['until']:g}" if first.get("until") else "")
        lines += [f"Needle (passkey) accuracy after a fine-tune at {first.get('length', L)} tokens"
                  f"{rounds} (lr {_fmt(first.get('lr'), 'g')}, LM batches mixed in: "
                  f"{first.get('lm_mixed', '?')}), mean over depths; the fine-tune's steps and its answer "
                  "loss (nats/token) at the first and last step:", "",
                  markdown_table(["method", "fine-tune steps, answer loss"] + [f"{k}x" for k in nm],
                                 [[agg[k]["label"], ft.get(k, "-")] + [v.get(x) for x in nm]
                                  for k, v in needle.items()]),
                  "", f"![needle heatmaps]({figures['needle']})", ""]
    far = "16" if "16" in mults else mults[-1]
    checks = paper_checks(agg, far)
    if checks:
        lines += [f"Against the paper's Tables 1 and 2 (what issue 17 expects at {far}x):", ""]
        for text, held, numbers in checks:
            verdict = "n/a" if held is None else ("agrees" if held else "**disagrees**")
            lines.append(f"- {text}: {verdict} ({numbers}).")
        lines.append("")
    lines.append(SECTION_END)
    return "\n".join(lines)


def splice(text: str, block: str) -> str:
    """`text` with the section between the markers replaced by `block` (inserted after the first
    line when absent)."""
    if SECTION_BEGIN in text and SECTION_END in text:
        a = text.index(SECTION_BEGIN)
        b = text.index(SECTION_END) + len(SECTION_END)
        return text[:a] + block + text[b:]
    first, _, rest = text.partition("\n")
    return f"{first}\n\n{block}\n{rest}" if text else f"# Results\n\n{block}\n"


def publish(sweep_dir: Path, docs: Path) -> list[Path]:
    """Write reproduction.json, the figures and the RESULTS.md section into `docs`."""
    from . import plots

    summary, manifest = _load(sweep_dir)
    docs.mkdir(parents=True, exist_ok=True)
    agg = aggregate(summary)
    L = summary["train_len"]
    figures = {"means": "python_sweep_loss_vs_length.png", "buckets": "python_sweep_buckets.png",
               "needle": "python_sweep_needle.png"}
    written = [docs / "reproduction.json"]
    (docs / "reproduction.json").write_text(json.dumps(reproduction(summary, manifest), indent=1) + "\n")
    written.append(plots.plot_method_means(agg, L, docs / figures["means"],
                                           f"python corpus, L = {L}: loss vs context length"))
    longest = max(summary["lengths"])
    written.append(plots.plot_bucket_curves(summary["rows"], longest, L, docs / figures["buckets"],
                                            f"loss by position at context length {longest}"))
    grids = {}
    for r in summary["rows"]:
        if r.get("needle") and r["method"] not in grids:
            grids[r["method"]] = r["needle"]
    if grids:
        written.append(plots.plot_needle_grids(grids, docs / figures["needle"], L,
                                               "passkey retrieval after fine-tuning"))
    results = docs / "RESULTS.md"
    old = results.read_text() if results.is_file() else ""
    results.write_text(splice(old, section(summary, manifest, figures)))
    written.append(results)
    return written
