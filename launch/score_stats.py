#!/usr/bin/env python
"""Attention score statistics of a trained run by query-key distance: whether each head's scores
stay in the regime where the scale-invariant transform is scale-invariant (docs/evaluation.md).

    python launch/score_stats.py --run runs/tiny --multiples 16
    python launch/score_stats.py --run runs/python-25m --lengths 16384 --windows 4

Scores one window of the longest requested length from each of the --windows longest validation
documents. Per layer and head and per distance bucket ([0,1), [1,4), [4,16), ... tokens) it prints
the mean and variance of S = q.k / sqrt(D) and the mass ratio E[exp(a_t S + m_t)] (1 + t/tau), which
is e^0.5 = 1.65 at every distance when S ~ N(0, 1), the transform's assumption; a ratio that grows
with distance means distant tokens take a growing share of attention as the context grows.
Writes <out>/score_stats.json and <out>/score_stats.png (variance and mass ratio against distance,
one panel per layer, the training length marked).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

if __name__ == "__main__":  # a plain checkout: the repository root on sys.path
    import _bootstrap  # noqa: F401

from scaleinv_dist.cli import ArgumentParser, add_run_arguments, existing_run_dir, run_cli  # noqa: E402
from scaleinv_dist.evaluate.errors import EvalError  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    add_run_arguments(p, multiples_help="multiples of the training length; the longest is used (default 16)")
    p.add_argument("--windows", type=int, default=2,
                   help="windows scored, one from each of the longest validation documents (default 2)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


def run(args) -> int:
    import numpy as np
    import torch

    from scaleinv_dist.evaluate import common, data_access, plots, report
    from scaleinv_dist.evaluate import score_stats as ss

    run_dir = existing_run_dir(args.run)
    if args.windows < 1:
        raise EvalError(f"--windows must be at least 1, got {args.windows}")
    model, cfg, ckpt, device = common.load_run_model(run_dir, args)
    length = max(common.lengths_from_args(args, cfg.train.seq_len, default_multiples=[16]))
    store = data_access.load_validation(cfg, run_dir).val_store
    data_access.check_lengths(store, [length])
    docs = [int(i) for i in np.argsort(-np.asarray(store.doc_lengths), kind="stable")[:args.windows]
            if store.doc_lengths[i] >= length + 1]
    windows = [(torch.as_tensor(np.asarray(store.doc(i)[:length], dtype=np.int64))[None],
                torch.arange(length)[None], None) for i in docs]
    edges = ss.distance_edges(length)
    t0 = time.time()
    layers = ss.model_score_stats(model, windows, edges, cfg.attention.tau, device)

    out = Path(args.out) if args.out else run_dir
    out.mkdir(parents=True, exist_ok=True)
    result = {"length": length, "train_len": cfg.train.seq_len, "tau": cfg.attention.tau,
              "transform": cfg.attention.transform, "position": cfg.attention.position,
              "windows": len(windows), "edges": edges, "checkpoint": str(ckpt),
              "seconds": round(time.time() - t0, 2),
              "layers": [{k: [[None if math.isnan(x) else round(x, 5) for x in row] for row in v.tolist()]
                          for k, v in layer.items()} for layer in layers]}
    (out / "score_stats.json").write_text(json.dumps(result, indent=1) + "\n")
    print(report.score_stats_table(result))
    png = plots.plot_score_stats(result, out / "score_stats.png",
                                 title=f"{run_dir.name}: {len(windows)} window(s) of {length}")
    print(f"wrote {out / 'score_stats.json'}, {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
