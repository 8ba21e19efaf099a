#!/usr/bin/env python
"""One launcher per node: start this node's worker processes and report one exit status.

    python slurm/node_launcher.py --nnodes 2 --node-rank 0 --nproc-per-node 8 \
        --master-addr node1 --master-port 12345 -- launch/train.py --config configs/x.yaml k=v

slurm/pretrain.sh runs it under `srun --ntasks-per-node=1`. It is a static-rendezvous subset of
torchrun (same environment for the workers: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
GROUP_RANK, NODE_RANK, MASTER_ADDR, MASTER_PORT) that differs where preemption needs it:

* Exit status. torchrun exits 1 whatever its workers returned; this launcher returns the workers'
  status: 0 when all exit 0; the preemption code (--preempt-exit-code, default 75, the code of
  launch/train.py after it wrote a checkpoint) when every worker exits 0 or with that code; else the
  first failure's code (128 + signal number for a worker killed by a signal). With
  --preempt-marker PATH a clean preemption instead creates PATH.node<R> and exits 0, so that
  `srun --kill-on-bad-exit=1` does not kill the other nodes' launchers while they finish.
* Signals. SIGUSR1, SIGUSR2, SIGTERM, SIGINT and SIGHUP are forwarded to the workers, and the
  launcher keeps waiting for them (no 30 s kill timer: the job's own time limit / KillWait
  applies). Workers start with SIGUSR1/SIGUSR2 ignored; a USR signal is delivered to a worker only
  once it has installed a handler (read from /proc/<pid>/status), so a signal that arrives while a
  worker is still importing is held, not lost and not fatal.
* Failures. When a worker fails, the others get SIGTERM and, after --kill-grace seconds, SIGKILL.
  Workers die with the launcher (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time

FORWARD = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP")
HOLD_UNTIL_CAUGHT = ("SIGUSR1", "SIGUSR2")  # default action would kill a worker that is starting


def log(msg: str) -> None:
    print(f"[node_launcher {os.environ.get('_NL_TAG', '')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    env = os.environ
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nnodes", type=int, default=int(env.get("SLURM_NNODES", 1)))
    p.add_argument("--node-rank", type=int, default=int(env.get("SLURM_NODEID", 0)),
                   help="default: $SLURM_NODEID (read inside the srun task, not the batch shell)")
    p.add_argument("--nproc-per-node", type=int, default=int(env.get("NPROC_PER_NODE", 1)))
    p.add_argument("--master-addr", default=env.get("MASTER_ADDR", "127.0.0.1"))
    p.add_argument("--master-port", type=int, default=int(env.get("MASTER_PORT", 29500)))
    p.add_argument("--preempt-exit-code", type=int, default=75)
    p.add_argument("--preempt-marker", default="",
                   help="on a clean preemption create <this>.node<R> and exit 0")
    p.add_argument("--kill-grace", type=float, default=30.0,
                   help="seconds between SIGTERM and SIGKILL for the survivors of a failed worker")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- program [args]; a .py program runs "
                   "with this Python")
    args = p.parse_args(argv)
    if args.cmd and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    if not args.cmd:
        p.error("no program given (… -- launch/train.py --config …)")
    if not 0 <= args.node_rank < args.nnodes:
        p.error(f"--node-rank {args.node_rank} is not in [0, {args.nnodes})")
    if args.nproc_per_node < 1:
        p.error("--nproc-per-node must be >= 1")
    return args


def _child_setup() -> None:  # runs in the child between fork and exec
    for name in HOLD_UNTIL_CAUGHT:
        signal.signal(getattr(signal, name), signal.SIG_IGN)  # SIG_IGN survives exec
    for name in FORWARD:
        if name not in HOLD_UNTIL_CAUGHT:
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    try:  # die with the launcher
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def catches(pid: int, sig: int) -> bool:
    """Whether process pid has a handler installed for sig (True when /proc is unavailable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return True


def status_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ["_NL_TAG"] = f"node {a.node_rank}/{a.nnodes}"
    world = a.nnodes * a.nproc_per_node
    cmd = list(a.cmd)
    if cmd[0].endswith(".py"):
        cmd = [sys.executable, "-u"] + cmd

    pending: list[int] = []
    signal_names: list[str] = []

    def on_signal(signum, frame):
        pending.append(signum)
        signal_names.append(signal.Signals(signum).name)

    for name in FORWARD:
        signal.signal(getattr(signal, name), on_signal)

    threads = os.environ.get("OMP_NUM_THREADS")
    if not threads:
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", 0) or 0) or len(os.sched_getaffinity(0))
        threads = str(max(1, cpus // a.nproc_per_node))
    procs: list[subprocess.Popen] = []
    for local in range(a.nproc_per_node):
        rank = a.node_rank * a.nproc_per_node + local
        env = dict(os.environ)
        env.pop("_NL_TAG", None)
        env.update(RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(a.nproc_per_node), GROUP_RANK=str(a.node_rank),
                   NODE_RANK=str(a.node_rank), GROUP_WORLD_SIZE=str(a.nnodes), ROLE_RANK=str(rank),
                   ROLE_WORLD_SIZE=str(world), MASTER_ADDR=a.master_addr,
                   MASTER_PORT=str(a.master_port), OMP_NUM_THREADS=threads)
        procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_child_setup))
    first = a.node_rank * a.nproc_per_node
    log(f"started ranks {first}..{first + a.nproc_per_node - 1} of {world} "
        f"(master {a.master_addr}:{a.master_port}): {' '.join(a.cmd)}")

    held: dict[int, set[int]] = {}  # signal -> indices of workers still owed it
    codes: dict[int, int] = {}
    failed_at = None
    while len(codes) < len(procs):
        while pending:
            sig = pending.pop(0)
            log(f"got {signal.Signals(sig).name}; forwarding to the workers")
            held.setdefault(sig, set()).update(i for i in range(len(procs)) if i not in codes)
        for sig, owed in held.items():
            for i in list(owed):
                if i in codes:
                    owed.discard(i)
                elif signal.Signals(sig).name not in HOLD_UNTIL_CAUGHT or catches(procs[i].pid, sig):
                    try:
                        procs[i].send_signal(sig)
                    except ProcessLookupError:
                        pass
                    owed.discard(i)
        for i, p in enumerate(procs):
            if i in codes or p.poll() is None:
                continue
            codes[i] = status_code(p.returncode)
            if codes[i] not in (0, a.preempt_exit_code) and failed_at is None:
                failed_at = time.monotonic()
                log(f"rank {first + i} failed with exit status {codes[i]}; stopping the other workers")
                for j, q in enumerate(procs):
                    if j not in codes and q.poll() is None:
                        q.send_signal(signal.SIGTERM)
        if failed_at is not None and time.monotonic() - failed_at > a.kill_grace:
            for j, q in enumerate(procs):
                if j not in codes and q.poll() is None:
                    log(f"rank {first + j} still running {a.kill_grace:.0f} s after SIGTERM; killing it")
                    q.kill()
            failed_at = float("inf")
        time.sleep(0.1)

    summary = ", ".join(f"rank {first + i}: {codes[i]}" for i in range(len(procs)))
    failures = [codes[i] for i in range(len(procs)) if codes[i] not in (0, a.preempt_exit_code)]
    if failures:
        log(f"failed ({summary})")
        return failures[0]
    if any(c == a.preempt_exit_code for c in codes.values()):
        if a.preempt_marker:
            marker = f"{a.preempt_marker}.node{a.node_rank}"
            os.makedirs(os.path.dirname(os.path.abspath(marker)), exist_ok=True)
            with open(marker, "w") as f:
                f.write(f"{summary}\n")
            log(f"preempted after a checkpoint ({summary}); marker {marker}")
            return 0
        log(f"preempted after a checkpoint ({summary}); exit {a.preempt_exit_code}")
        return a.preempt_exit_code
    log(f"done ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
