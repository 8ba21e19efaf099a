"""What every launch/ entry point shares: user mistakes end as one `error: ...` line and exit 2."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

# process exit codes of every entry point (launch/train.py uses them all; docs/training.md)
EXIT_OK = 0
EXIT_USAGE = 2          # a user mistake: bad config, data, checkpoint or argument
EXIT_NONFINITE = 3      # training: non-finite loss with train.nan_policy=stop
EXIT_PEER_FAILURE = 4   # training: another rank died or a collective timed out
EXIT_PREEMPTED = 75     # training: preempted, checkpoint written (sysexits.h EX_TEMPFAIL: try again)


def die(message: str, code: int = EXIT_USAGE) -> None:
    """Print `error: message` to stderr and exit with `code`."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_cli(fn: Callable[[object], int], args, first_line_only: bool = True) -> int:
    """fn(args), turning ValueError (ConfigError, DataError, LayoutError, ...) into `error: ...`."""
    try:
        return fn(args) or 0
    except ValueError as err:
        text = str(err) or type(err).__name__
        die(text.splitlines()[0] if first_line_only else text)
    return 2


def existing_run_dir(path: str | Path) -> Path:
    """The run directory `path`, or a clear error when it does not exist or is not a run."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        die(f"run directory {str(run_dir)!r} does not exist; pass the run.out_dir of a training run")
    if not (run_dir / "config.yaml").is_file():
        die(f"{run_dir} is not a run directory (no config.yaml); pass the run.out_dir of a training run")
    return run_dir
