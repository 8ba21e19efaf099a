"""The method sweep: train one model per attention method (and seed), evaluate each at L, 4L, 16L, ...

Each method is a pair (attention.transform, attention.position) applied to the same config. Every
job (a method, optionally with a seed: run.seed) trains with `launch/train.py`, is evaluated with
`launch/eval.py` and, when asked, needle-tested with `launch/niah.py`, in subprocesses (so a crash
in one does not take down the others), optionally several at once, each pinned to a GPU through
CUDA_VISIBLE_DEVICES. Results are read back from each run's eval.json and niah.json.

    <out>/runs/<job>/                 the run directory (config, checkpoints, metrics, eval.json, niah.json)
    <out>/logs/<job>.{train,eval,niah}.log
    <out>/sweep.json, sweep.md        every job's numbers (loss per length and position bucket,
                                      needle grid) and a table; mean and spread over seeds per method
    <out>/sweep_loss_vs_length.png    loss against context length, one line per job
A job is named after its method, or "<method>-seed<seed>" when the sweep runs several seeds.

A sweep can span several runs of the same command: with a time limit, the jobs still running at
the deadline get SIGTERM (training writes a checkpoint and exits 75; an evaluation or needle test
is abandoned) and are marked "stopped"; a rerun with skip_existing skips every finished stage
(`finished_stages`) and training resumes from its newest checkpoint.
"""
from __future__ import annotations

import difflib
import json
import math
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

from ..cli import EXIT_PREEMPTED
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
    seed: int | None = None  # run.seed of this job (None: the config's)
    name: str = ""  # the method, or "<method>-seed<seed>"
    niah_cmd: list[str] | None = None  # the needle test, run after evaluation when set
    status: str = "pending"  # pending | ok | stopped | train failed | eval failed | needle failed
    steps: int | None = None  # train.steps of the run (None: unknown, a checkpoint counts as finished)
    train_s: float = 0.0
    eval_s: float = 0.0
    niah_s: float = 0.0
    gpu: str | None = None
    log: dict = field(default_factory=dict)

    def __post_init__(self):
        self.name = self.name or self.method


def needle_command(run_dir: Path, needle: dict) -> list[str]:
    """launch/niah.py arguments for a sweep's `needle` settings (keys as in NEEDLE_DEFAULTS)."""
    n = {**NEEDLE_DEFAULTS, **needle}
    cmd = [sys.executable, str(ROOT / "launch" / "niah.py"), "--run", str(run_dir), "--quiet",
           "--multiples", ",".join(f"{x:g}" for x in n["multiples"]),
           "--depths", ",".join(f"{x:g}" for x in n["depths"]), "--samples", str(n["samples"]),
           "--task", n["task"], "--finetune-steps", str(n["finetune_steps"]),
           "--finetune-batch", str(n["finetune_batch"]), "--batch-size", str(n["batch_size"])]
    if n["finetune_lr"] is not None:
        cmd += ["--finetune-lr", f"{n['finetune_lr']:g}"]
    if n["finetune_lm"]:
        cmd.append("--finetune-lm")
    if n["finetune_until"] is not None:
        cmd += ["--finetune-until", f"{n['finetune_until']:g}"]
        if n["finetune_max_steps"] is not None:
            cmd += ["--finetune-max-steps", str(n["finetune_max_steps"])]
    return cmd


# the needle test a sweep runs by default when it runs one (see launch/niah.py for each flag)
NEEDLE_DEFAULTS = {"task": "passkey", "multiples": [1, 4, 16], "depths": [0, 0.25, 0.5, 0.75, 1],
                   "samples": 10, "finetune_steps": 300, "finetune_lr": None, "finetune_batch": 8,
                   "finetune_lm": True, "finetune_until": None, "finetune_max_steps": None,
                   "batch_size": 1, "seeds": "first"}


def build_jobs(methods: Sequence[str], config: str, out: Path, overrides: Sequence[str],
               steps: int | None, multiples: Sequence[float], max_tokens: int | None,
               eval_batch_size: int | None = None, seeds: dict[str, list[int]] | None = None,
               needle: dict | None = None) -> list[Job]:
    """One job per (method, seed); seeds[method] lists its seeds (absent or None: the config's seed,
    and jobs are named after their method). needle: run the needle test (NEEDLE_DEFAULTS keys;
    "seeds": "first" tests each method's first seed only, "all" every job)."""
    jobs = []
    named = bool(seeds) and any(len(v) > 0 for v in seeds.values())
    for m in methods:
        _, transform, position = METHODS[m]
        for k, seed in enumerate((seeds or {}).get(m) or [None]):
            name = m if seed is None or not named else f"{m}-seed{seed}"
            run_dir = out / "runs" / name
            train = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(config), *overrides,
                     f"attention.transform={transform}", f"attention.position={position}",
                     f"run.out_dir={run_dir}"]
            if seed is not None:
                train.append(f"run.seed={seed}")
            if steps is not None:
                train.append(f"train.steps={steps}")
            ev = [sys.executable, str(ROOT / "launch" / "eval.py"), "--run", str(run_dir), "--quiet",
                  "--multiples", ",".join(f"{x:g}" for x in multiples)]
            if max_tokens is not None:
                ev += ["--max-tokens", str(max_tokens)]
            if eval_batch_size:
                ev += ["--batch-size", str(eval_batch_size)]
            niah = None
            if needle is not None and (k == 0 or needle.get("seeds", "first") == "all"):
                niah = needle_command(run_dir, needle)
            jobs.append(Job(m, run_dir, train, ev, seed=seed, name=name, niah_cmd=niah, steps=steps))
    return jobs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# seconds a stage may take to exit after SIGTERM at the time limit (training writes a checkpoint)
STOP_GRACE_S = 120.0


def _run(cmd: list[str], log_path: Path, env: dict,
         deadline: float | None = None) -> tuple[int | None, float]:
    """Run cmd with its output appended to log_path (a continued sweep keeps the earlier parts'
    output): (exit code, seconds). At `deadline` (time.time()) it gets SIGTERM, then SIGKILL after
    STOP_GRACE_S; the exit code is then None (stopped)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        try:
            rc = proc.wait(timeout=None if deadline is None else max(0.0, deadline - time.time()))
            return rc, time.time() - t0
        except subprocess.TimeoutExpired:
            pass
        proc.terminate()
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.write(f"\n[sweep] stopped at the time limit after {time.time() - t0:.0f}s\n")
    return None, time.time() - t0


def _tail(path: Path, n: int = 5) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-n:])
    except OSError:
        return ""


def finished_stages(job: Job) -> set[str]:
    """The stages of `job` a rerun can skip: "train" when the newest checkpoint is at the job's
    train.steps (any checkpoint when that is unknown), "eval" / "niah" when eval.json / niah.json
    were written after that checkpoint."""
    from ..run_dir import latest_checkpoint, latest_pointer, step_of

    folder = latest_checkpoint(job.run_dir)
    if folder is None or (job.steps is not None and (step_of(folder) or 0) < job.steps):
        return set()
    checkpointed_at = latest_pointer(job.run_dir).stat().st_mtime

    def written_since(name: str) -> bool:
        path = job.run_dir / name
        return path.is_file() and path.stat().st_mtime >= checkpointed_at

    done = {"train"}
    if written_since("eval.json"):
        done.add("eval")
        if written_since("niah.json"):
            done.add("niah")
    return done


def run_job(job: Job, logs: Path, gpu: str | None, skip: set[str] = frozenset(),
            deadline: float | None = None) -> Job:
    """Train, evaluate and needle-test one job, leaving out the stages in `skip`; fills status and
    timings. At `deadline` (time.time()) the running stage is stopped and no other starts."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["MASTER_ADDR"], env["MASTER_PORT"] = "127.0.0.1", str(_free_port())  # parallel jobs don't collide
    env.setdefault("WANDB_MODE", "offline")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
        job.gpu = gpu
    job.log = {k: str(logs / f"{job.name}.{k}.log") for k in ("train", "eval", "niah")}
    stages = [("train", job.train_cmd, "train_s", "train failed"),
              ("eval", job.eval_cmd, "eval_s", "eval failed"),
              ("niah", job.niah_cmd, "niah_s", "needle failed")]
    for stage, cmd, seconds, failed in stages:
        if cmd is None or stage in skip:
            continue
        if deadline is not None and time.time() >= deadline:
            job.status = "stopped"
            return job
        rc, took = _run(cmd, Path(job.log[stage]), env, deadline)
        setattr(job, seconds, took)
        if rc is None or (stage == "train" and rc == EXIT_PREEMPTED):
            job.status = "stopped"
            return job
        if rc != 0:
            job.status = failed
            return job
    job.status = "ok"
    return job


def run_jobs(jobs: Sequence[Job], logs: Path, parallel: int = 1, gpus: Sequence[str] = (),
             skip_existing: bool = False, progress: bool = True, on_done=None,
             deadline: float | None = None) -> list[Job]:
    """Run the jobs, `parallel` at a time; each holds one GPU id from `gpus` while it runs.
    skip_existing: leave out each job's finished stages (finished_stages). deadline (time.time()):
    stop what runs then (run_job). on_done(job) is called (under a lock) as each job finishes, e.g.
    to write partial results."""
    pool_gpus: queue.Queue = queue.Queue()
    for g in gpus:
        pool_gpus.put(str(g))
    lock = threading.Lock()

    def work(job: Job) -> Job:
        skip = finished_stages(job) if skip_existing else set()
        gpu = pool_gpus.get() if gpus else None
        try:
            return run_job(job, logs, gpu, skip=skip, deadline=deadline)
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
                msg = (f"{job.name}: {job.status} (train {job.train_s:.0f}s, eval {job.eval_s:.0f}s"
                       + (f", needle {job.niah_s:.0f}s" if job.niah_cmd else "")
                       + (f", GPU {job.gpu}" if job.gpu is not None else "") + ")")
                if job.status == "stopped":
                    msg += "\n  stopped at the time limit: a rerun with --skip-existing continues it"
                elif job.status != "ok":
                    log = job.log[job.status.split()[0].replace("needle", "niah")]
                    msg += f"\n  see {log}:\n  " + _tail(Path(log)).replace("\n", "\n  ")
                (bar.write if bar else print)(msg)
                if on_done is not None:
                    on_done(job)
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
        row = {"method": label, "name": job.name, "key": job.method, "seed": job.seed,
               "transform": transform, "position": position,
               "status": job.status, "train_s": round(job.train_s, 1), "eval_s": round(job.eval_s, 1),
               "niah_s": round(job.niah_s, 1), "gpu": job.gpu, "run_dir": str(job.run_dir), "losses": {},
               "step": None, "train_loss": None, "epochs": None}
        path = job.run_dir / "eval.json"
        if job.status in ("ok", "needle failed") and path.is_file():
            data = json.loads(path.read_text())
            res = data.get("results", {})
            row["losses"] = {str(L): res.get(str(L), {}).get("loss") for L in lengths}
            row["tokens"] = {str(L): res.get(str(L), {}).get("tokens") for L in lengths}
            row["buckets"] = {str(L): res.get(str(L), {}).get("buckets") for L in lengths}
            row["step"] = data.get("step")
            row["train_loss"] = (data.get("training") or {}).get("train_loss")
            row["epochs"] = data.get("epochs")
            row["train_tokens"] = (data.get("training") or {}).get("tokens")
        path = job.run_dir / "niah.json"
        if job.niah_cmd and job.status == "ok" and path.is_file():
            data = json.loads(path.read_text())
            row["needle"] = {k: data.get(k) for k in ("lengths", "depths", "accuracy", "hits", "samples",
                                                      "accuracy_by_length", "task", "finetune")}
        rows.append(row)
    return {"train_len": train_len, "multiples": list(multiples), "lengths": lengths, "rows": rows}


def earlier_parts(out: Path) -> dict | None:
    """The summary an earlier part of this sweep left in <out>/sweep.json, or None."""
    path = out / "sweep.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def add_parts(summary: dict, earlier: dict | None) -> dict:
    """The summary of a sweep run in parts: `parts` lists each part's command and seconds;
    `seconds`, `data_seconds` and each job's stage seconds add up over the parts."""
    part = {k: summary.get(k) for k in ("command", "seconds", "data_seconds", "date")}
    if not earlier:
        return {**summary, "parts": [part]}
    before = {r["name"]: r for r in earlier.get("rows", [])}
    for row in summary["rows"]:
        for key in ("train_s", "eval_s", "niah_s"):
            row[key] = round(row[key] + (before.get(row["name"]) or {}).get(key, 0.0), 1)
    parts = earlier.get("parts") or [{k: earlier.get(k) for k in part}]
    parts = [*parts, part]
    return {**summary, "parts": parts, "date": parts[0].get("date") or summary.get("date"),
            "seconds": round(sum(p.get("seconds") or 0 for p in parts), 1),
            "data_seconds": round(sum(p.get("data_seconds") or 0 for p in parts), 1)}


def mult_key(m: float) -> str:
    """A length multiple as a JSON key: 1.0 -> "1", 0.5 -> "0.5"."""
    return f"{m:g}"


def aggregate(summary: dict) -> dict:
    """Per method over its seeds: {key: {"label", "seeds", "loss": {mult: [per seed]}, "mean": {mult},
    "std": {mult} (sample std, None for one seed), "needle": {mult: mean accuracy over needle jobs}}}.
    Only jobs with losses count; multiples are keyed by mult_key."""
    out: dict = {}
    L = summary["train_len"]
    for row in summary["rows"]:
        if not row["losses"]:
            continue
        key = row.get("key", row["name"])
        m = out.setdefault(key, {"label": row["method"], "seeds": [], "loss": {}, "needle_runs": []})
        m["seeds"].append(row.get("seed"))
        for length, mult in zip(summary["lengths"], summary["multiples"]):
            m["loss"].setdefault(mult_key(mult), []).append(row["losses"].get(str(length)))
        if row.get("needle"):
            m["needle_runs"].append(row["needle"])
    for m in out.values():
        m["mean"], m["std"] = {}, {}
        for k, vals in m["loss"].items():
            v = [x for x in vals if x is not None]
            mean = sum(v) / len(v) if v else None
            m["mean"][k] = mean
            m["std"][k] = (math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None)
        runs = m.pop("needle_runs")
        m["needle"] = {}
        for run in runs:
            for length, acc in zip(run["lengths"], run["accuracy_by_length"]):
                m["needle"].setdefault(mult_key(length / L), []).append(acc)
        m["needle"] = {k: sum(v) / len(v) for k, v in m["needle"].items()}
    return out


def reproduction(summary: dict, manifest: dict | None) -> dict:
    """docs/reproduction.json: {"corpus": {...}, "methods": {method: {"seeds", "loss": {mult: [per
    seed]}}}, "needle": {method: {mult: accuracy}}} (issue 17's shape)."""
    agg = aggregate(summary)
    manifest = manifest or {}
    py = manifest.get("python_corpus") or {}
    rows = [r for r in summary["rows"] if r.get("step")]
    corpus = {"name": manifest.get("source"), "train_tokens": manifest.get("train_tokens"),
              "val_tokens": manifest.get("val_tokens"), "train_docs": manifest.get("train_docs"),
              "val_docs": manifest.get("val_docs"), "vocab_size": manifest.get("vocab_size"),
              "tokenizer_sha256": manifest.get("tokenizer_sha256"),
              "python": py.get("python"), "distributions": len(py.get("distributions", [])),
              "train_len": summary["train_len"], "steps": summary.get("steps"),
              "tokens_per_run": max((r.get("train_tokens") or 0 for r in rows), default=None),
              "epochs_per_run": max((r.get("epochs") or 0 for r in rows), default=None),
              "eval_tokens_per_length": sorted({t for r in rows for t in (r.get("tokens") or {}).values() if t})}
    return {"corpus": corpus,
            "methods": {k: {"seeds": v["seeds"], "loss": v["loss"]} for k, v in agg.items()},
            "needle": {k: v["needle"] for k, v in agg.items() if v["needle"]}}


def markdown(summary: dict) -> str:
    from .report import markdown_table

    L = summary["train_len"]
    header = (["job" if any(r.get("seed") is not None for r in summary["rows"]) else "method",
               "transform", "position"]
              + [f"val @{n} ({n / L:g}L)" for n in summary["lengths"]]
              + ["train loss", "val@L - train", "epochs", "steps", "train s", "status"])
    rows = []
    for r in summary["rows"]:
        epochs = None if r["epochs"] is None else f"{r['epochs']:.3g}"
        first = r["losses"].get(str(summary["lengths"][0]))
        gap = None if first is None or r["train_loss"] is None else f"{first - r['train_loss']:+.3f}"
        name = r["method"] + (f" (seed {r['seed']})" if r.get("seed") is not None else "")
        rows.append([name, r["transform"], r["position"]]
                    + [r["losses"].get(str(n)) for n in summary["lengths"]]
                    + [r["train_loss"], gap, epochs, r["step"], f"{r['train_s']:.0f}", r["status"]])
    tokens = sorted({t for r in summary["rows"] for t in (r.get("tokens") or {}).values() if t})
    note = ("\n\nValidation loss in nats/token; tokens scored per length: "
            + (", ".join(map(str, tokens)) if tokens else "-")
            + ". Train loss: the last logged training-window mean.")
    table = markdown_table(header, rows) + note
    needles = [r for r in summary["rows"] if r.get("needle")]
    if needles:
        lengths = needles[0]["needle"]["lengths"]
        head = ["job", "task", "fine-tune steps, answer loss"] + [f"needle @{n} ({n / L:g}L)" for n in lengths]
        body = []
        for r in needles:
            body.append([r["name"], r["needle"].get("task"), finetune_cell(r["needle"])]
                        + list(r["needle"]["accuracy_by_length"]))
        table += "\n\nNeedle accuracy (mean over depths):\n\n" + markdown_table(head, body)
    return table


def finetune_cell(needle: dict) -> str:
    """A needle result's fine-tune as one table cell: "N steps, first → last answer loss"."""
    ft = needle.get("finetune") or {}
    if "first_loss" not in ft:
        return "-"
    return f"{ft.get('steps', '?')} steps, {ft['first_loss']:.2f} → {ft['last_loss']:.2f}"


def prepare_sweep_data(cfg, out: Path) -> dict:
    """Build the data caches once for every job (prepare_data) and write <out>/data_manifest.json."""
    from ..data import DataError, prepare_data

    try:
        manifest = prepare_data(cfg)
    except DataError as err:
        raise EvalError(str(err)) from None
    out.mkdir(parents=True, exist_ok=True)
    manifest = {**manifest, "tokenizer_sha256": _sha256(Path(manifest["tokenizer"]))}
    (out / "data_manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def device_name() -> str:
    """The GPU the jobs run on ("NVIDIA H100 80GB HBM3 x1"), or "cpu"."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_manifest(out: Path, run_dir: Path) -> None:
    """<out>/data_manifest.json into a run directory (what the run was trained on)."""
    src = out / "data_manifest.json"
    if src.is_file() and run_dir.is_dir():
        (run_dir / "data_manifest.json").write_text(src.read_text())


def fit_multiples(multiples: Sequence[float], train_len: int, manifest: dict) -> list[float]:
    """The multiples whose length fits in the longest validation document (others dropped, said)."""
    from ..data import TokenStore

    longest = int(TokenStore.open(manifest["val"]).doc_lengths.max())
    keep = [m for m in multiples if int(round(m * train_len)) + 1 <= longest]
    if len(keep) < len(multiples):
        print(f"note: the longest validation document has {longest} tokens; dropping multiples "
              f"{', '.join(f'{m:g}' for m in multiples if m not in keep)} of L = {train_len}")
    if not keep:
        raise EvalError(f"no evaluation length fits the longest validation document ({longest} tokens)")
    return keep


def load_plan(path: str) -> dict:
    """A sweep plan (YAML mapping); unknown keys are errors naming the closest known one, and a key
    left empty (`gpus:`) counts as not given."""
    import yaml

    try:
        plan = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise EvalError(f"cannot read the sweep plan {path} ({err.strerror}); check --plan") from None
    if not isinstance(plan, dict):
        raise EvalError(f"the sweep plan {path} must be a mapping of settings")
    for key in plan:
        if key not in PLAN_KEYS:
            close = difflib.get_close_matches(key, PLAN_KEYS, n=1)
            raise EvalError(f"unknown sweep plan key {key!r} in {path}"
                            + (f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(PLAN_KEYS)})"))
    for key in plan.get("needle") or {}:
        if key not in NEEDLE_DEFAULTS:
            close = difflib.get_close_matches(key, list(NEEDLE_DEFAULTS), n=1)
            raise EvalError(f"unknown needle setting {key!r} in {path}"
                            + (f"; did you mean {close[0]!r}?" if close else ""))
    for m in plan.get("seeds") or {}:
        select_methods(m)
    return {key: value for key, value in plan.items() if value is not None}


PLAN_KEYS = ["config", "methods", "seeds", "steps", "multiples", "max_tokens", "eval_batch_size",
             "parallel", "gpus", "overrides", "needle", "time_limit"]


def write_outputs(summary: dict, out: Path, title: str = "") -> dict:
    from .plots import plot_methods

    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    md = markdown(summary)
    (out / "sweep.md").write_text((f"# {title}\n\n" if title else "") + md + "\n")
    png = plot_methods(summary["rows"], summary["train_len"], out / "sweep_loss_vs_length.png", title)
    manifest_path = out / "data_manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    (out / "reproduction.json").write_text(json.dumps(reproduction(summary, manifest), indent=1))
    return {"json": out / "sweep.json", "md": out / "sweep.md", "png": png, "table": md,
            "reproduction": out / "reproduction.json"}
