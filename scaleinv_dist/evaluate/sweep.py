"""The method sweep: train one model per attention method, evaluate each at L, 4L, 16L, compare.

Each method is a pair (attention.transform, attention.position) applied to the same config. Every
method trains with `launch/train.py` and is evaluated with `launch/eval.py` in subprocesses (so a
crash in one does not take down the others), optionally several at once, each pinned to its own
GPU through CUDA_VISIBLE_DEVICES. Results are read back from each run's eval.json.

    <out>/runs/<method>/              the run directory (config, checkpoints, metrics, eval.json)
    <out>/logs/<method>.{train,eval}.log
    <out>/sweep.json, sweep.md        one table: loss at each length per method
    <out>/sweep_loss_vs_length.png    loss against context length, one line per method
"""
from __future__ import annotations

import difflib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .errors import EvalError

ROOT = Path(__file__).resolve().parents[2]

# name -> (label, attention.transform, attention.position); the paper's Table 1 methods we have
METHODS = {
    "si_p_rope": ("Scale-invariant p-RoPE", "scale_invariant", "p_rope"),
    "p_rope": ("p-RoPE", "none", "p_rope"),
    "rope": ("RoPE", "none", "rope"),
    "nope": ("NoPE", "none", "nope"),
    "logn_p_rope": ("LogN + p-RoPE", "logn", "p_rope"),
    "alibi": ("ALiBi", "none", "alibi"),
}


def select_methods(spec: str | None) -> list[str]:
    """Comma-separated method names (None or 'all': every method), validated."""
    if not spec or spec == "all":
        return list(METHODS)
    out = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name not in METHODS:
            close = difflib.get_close_matches(name, list(METHODS), n=1, cutoff=0.4)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise EvalError(f"unknown method {name!r}{hint} (choose from {', '.join(METHODS)})")
        if name not in out:
            out.append(name)
    return out


@dataclass
class Job:
    method: str
    run_dir: Path
    train_cmd: list[str]
    eval_cmd: list[str]
    status: str = "pending"  # pending | ok | train failed | eval failed
    train_s: float = 0.0
    eval_s: float = 0.0
    gpu: str | None = None
    log: dict = field(default_factory=dict)


def build_jobs(methods: Sequence[str], config: str, out: Path, overrides: Sequence[str],
               steps: int | None, multiples: Sequence[float], max_tokens: int | None,
               eval_batch_size: int | None = None) -> list[Job]:
    jobs = []
    for m in methods:
        _, transform, position = METHODS[m]
        run_dir = out / "runs" / m
        train = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(config), *overrides,
                 f"attention.transform={transform}", f"attention.position={position}",
                 f"run.out_dir={run_dir}"]
        if steps is not None:
            train.append(f"train.steps={steps}")
        ev = [sys.executable, str(ROOT / "launch" / "eval.py"), "--run", str(run_dir), "--quiet",
              "--multiples", ",".join(f"{x:g}" for x in multiples)]
        if max_tokens is not None:
            ev += ["--max-tokens", str(max_tokens)]
        if eval_batch_size:
            ev += ["--batch-size", str(eval_batch_size)]
        jobs.append(Job(m, run_dir, train, ev))
    return jobs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], log_path: Path, env: dict) -> tuple[int, float]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    return rc, time.time() - t0


def _tail(path: Path, n: int = 5) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-n:])
    except OSError:
        return ""


def run_job(job: Job, logs: Path, gpu: str | None, skip_train: bool = False) -> Job:
    """Train (unless skip_train) then evaluate one method; fills status and timings."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["MASTER_ADDR"], env["MASTER_PORT"] = "127.0.0.1", str(_free_port())  # parallel jobs don't collide
    env.setdefault("WANDB_MODE", "offline")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
        job.gpu = gpu
    job.log = {"train": str(logs / f"{job.method}.train.log"), "eval": str(logs / f"{job.method}.eval.log")}
    if not skip_train:
        rc, job.train_s = _run(job.train_cmd, Path(job.log["train"]), env)
        if rc != 0:
            job.status = "train failed"
            return job
    rc, job.eval_s = _run(job.eval_cmd, Path(job.log["eval"]), env)
    job.status = "ok" if rc == 0 else "eval failed"
    return job


def run_jobs(jobs: Sequence[Job], logs: Path, parallel: int = 1, gpus: Sequence[str] = (),
             skip_existing: bool = False, progress: bool = True) -> list[Job]:
    """Run the jobs, `parallel` at a time; each holds one GPU id from `gpus` while it runs."""
    pool_gpus: queue.Queue = queue.Queue()
    for g in gpus:
        pool_gpus.put(str(g))
    lock = threading.Lock()

    def work(job: Job) -> Job:
        skip = skip_existing and (job.run_dir / "checkpoints" / "latest").is_file()
        gpu = pool_gpus.get() if gpus else None
        try:
            return run_job(job, logs, gpu, skip_train=skip)
        finally:
            if gpu is not None:
                pool_gpus.put(gpu)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc="sweep", unit="method", dynamic_ncols=True, disable=None)
    workers = max(1, min(parallel, len(jobs), len(gpus) if gpus else parallel))
    with ThreadPoolExecutor(max_workers=workers) as ex:
        futures = [ex.submit(work, j) for j in jobs]
        for fut in as_completed(futures):
            job = fut.result()
            with lock:
                msg = (f"{job.method}: {job.status} (train {job.train_s:.0f}s, eval {job.eval_s:.0f}s"
                       + (f", GPU {job.gpu}" if job.gpu is not None else "") + ")")
                if job.status != "ok":
                    log = job.log["train" if job.status == "train failed" else "eval"]
                    msg += f"\n  see {log}:\n  " + _tail(Path(log)).replace("\n", "\n  ")
                (bar.write if bar else print)(msg)
                if bar:
                    bar.update(1)
    if bar:
        bar.close()
    return list(jobs)


# ----------------------------------------------------------------------------- collect
def collect(jobs: Sequence[Job], train_len: int, multiples: Sequence[float]) -> dict:
    """The sweep's numbers from each run's eval.json: {"train_len", "lengths", "rows": [...]}; a row's
    "losses" and "tokens" are keyed by str(length) (as in JSON)."""
    lengths = [int(round(m * train_len)) for m in multiples]
    rows = []
    for job in jobs:
        label, transform, position = METHODS[job.method]
        row = {"method": label, "name": job.method, "transform": transform, "position": position,
               "status": job.status, "train_s": round(job.train_s, 1), "eval_s": round(job.eval_s, 1),
               "gpu": job.gpu, "run_dir": str(job.run_dir), "losses": {}, "step": None,
               "train_loss": None, "epochs": None}
        path = job.run_dir / "eval.json"
        if job.status == "ok" and path.is_file():
            data = json.loads(path.read_text())
            res = data.get("results", {})
            row["losses"] = {str(L): res.get(str(L), {}).get("loss") for L in lengths}
            row["tokens"] = {str(L): res.get(str(L), {}).get("tokens") for L in lengths}
            row["step"] = data.get("step")
            row["train_loss"] = (data.get("training") or {}).get("train_loss")
            row["epochs"] = data.get("epochs")
        rows.append(row)
    return {"train_len": train_len, "multiples": list(multiples), "lengths": lengths, "rows": rows}


def markdown(summary: dict) -> str:
    from .report import markdown_table

    L = summary["train_len"]
    header = (["method", "transform", "position"]
              + [f"val @{n} ({n / L:g}L)" for n in summary["lengths"]]
              + ["train loss", "val@L - train", "epochs", "steps", "train s", "status"])
    rows = []
    for r in summary["rows"]:
        epochs = None if r["epochs"] is None else f"{r['epochs']:.3g}"
        first = r["losses"].get(str(summary["lengths"][0]))
        gap = None if first is None or r["train_loss"] is None else f"{first - r['train_loss']:+.3f}"
        rows.append([r["method"], r["transform"], r["position"]]
                    + [r["losses"].get(str(n)) for n in summary["lengths"]]
                    + [r["train_loss"], gap, epochs, r["step"], f"{r['train_s']:.0f}", r["status"]])
    tokens = sorted({t for r in summary["rows"] for t in (r.get("tokens") or {}).values() if t})
    note = ("\n\nValidation loss in nats/token; tokens scored per length: "
            + (", ".join(map(str, tokens)) if tokens else "-")
            + ". Train loss: the last logged training-window mean.")
    return markdown_table(header, rows) + note


def write_outputs(summary: dict, out: Path, title: str = "") -> dict:
    from .plots import plot_methods

    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    md = markdown(summary)
    (out / "sweep.md").write_text((f"# {title}\n\n" if title else "") + md + "\n")
    png = plot_methods(summary["rows"], summary["train_len"], out / "sweep_loss_vs_length.png", title)
    return {"json": out / "sweep.json", "md": out / "sweep.md", "png": png, "table": md}
