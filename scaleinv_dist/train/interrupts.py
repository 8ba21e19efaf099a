"""Why a run stops early: preemption signals, a non-finite loss, a lost peer rank.

Each TrainingInterrupted subclass carries the process exit code (scaleinv_dist.cli.EXIT_*) that
launch/train.py returns.
"""
from __future__ import annotations

import re
import signal
import threading

from ..cli import EXIT_NONFINITE, EXIT_PEER_FAILURE, EXIT_PREEMPTED

PREEMPT_SIGNALS = ("SIGUSR1", "SIGTERM")


class TrainingInterrupted(RuntimeError):
    """The run stopped early on purpose; `exit_code` tells the launcher what to return."""
    exit_code = 1


class Preempted(TrainingInterrupted):
    exit_code = EXIT_PREEMPTED


class NonFiniteLoss(TrainingInterrupted):
    exit_code = EXIT_NONFINITE


class PeerFailure(TrainingInterrupted):
    exit_code = EXIT_PEER_FAILURE


_DIST_ERROR = re.compile(r"gloo|nccl|connection (closed|reset|refused)|broken pipe|timed out|timeout|"
                         r"by peer|watchdog", re.IGNORECASE)


def is_distributed_failure(err: BaseException) -> bool:
    """A collective failed: a peer died or hung (torch's DistError, or a gloo / NCCL RuntimeError)."""
    import torch.distributed as dist
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    return isinstance(err, RuntimeError) and bool(_DIST_ERROR.search(str(err)))


class StopFlag:
    """SIGUSR1 / SIGTERM set `signal` (the signal's name); the loop checkpoints at the next step
    boundary. Installed only from the main thread; `restore` puts the previous handlers back."""

    def __init__(self):
        self.signal: str | None = None
        self.previous = {}

    def install(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for name in PREEMPT_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, TypeError):
                pass
        self.previous.clear()
