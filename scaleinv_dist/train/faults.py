"""Test-only fault injection: the one place production code reads SCALEINV_TEST_* variables.

The training loop and the checkpoint writer call `inject(point, step, rank)` at named points; it
does nothing unless the matching variable is set (tests/test_train.py, tests/test_checkpoint.py and
tests/test_slurm.py set them in the environment of the processes they launch):

    point               variable(s)                               effect
    "step_start"        SCALEINV_TEST_DIE_AT_STEP=k + DIE_RANK=r  rank r exits (os._exit(1)) at step k
                        SCALEINV_TEST_HANG_AT_STEP=k + DIE_RANK=r rank r hangs at step k
                        SCALEINV_TEST_STEP_SLEEP=seconds          every step sleeps that long per
                                                                  micro batch (room for a signal)
    "micro_loss"        SCALEINV_TEST_NAN_AT_STEP=k               rank 0's loss of step k becomes NaN
    "step_end"          SCALEINV_TEST_PREEMPT_AT_STEP=k           rank 0 acts as if signalled at step k
    "save:after_deepspeed" / "save:before_publish"
                        SCALEINV_TEST_CRASH_IN_SAVE=after_deepspeed|before_publish
                        (+ SCALEINV_TEST_CRASH_AT_STEP=k)         the process exits (os._exit(17))
                                                                  there, in the save of step k

`step` is the step being run (1-based) or saved. The return value is `value`, changed where the
table says so: "micro_loss" returns the (maybe NaN) loss, "step_end" a stop-signal name or `value`.
"""
from __future__ import annotations

import os
import time

PREFIX = "SCALEINV_TEST_"


def _int(name: str) -> int | None:
    v = os.environ.get(PREFIX + name)
    return int(v) if v not in (None, "") else None


def inject(point: str, step: int, rank: int = 0, value=None, grad_accum: int = 1):
    """The hook (see the module docstring); a no-op returning `value` when no variable is set."""
    if point == "step_start":
        if _int("DIE_AT_STEP") == step and _int("DIE_RANK") == rank:
            os._exit(1)
        if _int("HANG_AT_STEP") == step and _int("DIE_RANK") == rank:
            time.sleep(10 ** 6)
        sleep = float(os.environ.get(PREFIX + "STEP_SLEEP") or 0)
        if sleep:
            time.sleep(sleep * grad_accum)
    elif point == "micro_loss":
        if _int("NAN_AT_STEP") == step and rank == 0:
            return value * float("nan")
    elif point == "step_end":
        if _int("PREEMPT_AT_STEP") == step and rank == 0:
            return PREFIX + "PREEMPT_AT_STEP"
    elif point.startswith("save:"):
        at = _int("CRASH_AT_STEP")
        if os.environ.get(PREFIX + "CRASH_IN_SAVE") == point[len("save:"):] and at in (None, step):
            os._exit(17)
    else:
        raise ValueError(f"unknown fault injection point {point!r}")
    return value
