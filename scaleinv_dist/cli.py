"""The one error path of the launch/ entry points, and their exit codes.

A user mistake (a bad argument, config, data file, tokenizer, checkpoint or device) ends as ONE
`error: ...` line on stderr naming the problem and the fix, and exit code EXIT_USAGE, never a
traceback. The package raises such mistakes as ValueError subclasses (ConfigError, DataError,
LayoutError, TopologyError, EvalError, GenerationError, IncompatibleCheckpointError, ExportError);
`run_cli` turns them into that line. docs/errors.md lists the broken inputs tried and their messages.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, NoReturn

# process exit codes of every entry point (launch/train.py uses them all; docs/training.md)
EXIT_OK = 0
EXIT_USAGE = 2          # a user mistake: bad config, data, checkpoint or argument
EXIT_NONFINITE = 3      # training: non-finite loss with train.nan_policy=stop
EXIT_PEER_FAILURE = 4   # training: another rank died or a collective timed out
EXIT_PREEMPTED = 75     # training: preempted, checkpoint written (sysexits.h EX_TEMPFAIL: try again)

def one_line(message: str) -> str:
    """A (possibly multi-line) message as one line: lines joined by '; ' (after ':' by ' ')."""
    out = ""
    for line in (part.strip() for part in str(message).splitlines()):
        if line:
            out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out


def die(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print `error: message` (as one line) to stderr and exit with `code`."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def run_cli(fn: Callable[[object], int], args) -> int:
    """fn(args), turning a user mistake (ValueError: ConfigError, DataError, ...) into `error: ...`."""
    try:
        return fn(args) or EXIT_OK
    except ValueError as err:
        die(str(err) or type(err).__name__)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the module docstring as description and a one-line error (exit EXIT_USAGE)."""

    def __init__(self, description: str | None = None, **kwargs):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                         **kwargs)

    def error(self, message: str) -> NoReturn:
        die(f"{message}; see {self.prog} --help")


def add_run_arguments(p: argparse.ArgumentParser, multiples_help: str) -> None:
    """What the evaluation commands (eval.py, niah.py) share: the run, --lengths / --multiples,
    --checkpoint, --device, --out, --quiet and key=value config overrides."""
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run directory (a training run's run.out_dir); under torchrun spell it --run-dir")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--lengths", help="absolute context lengths, e.g. 256,1024,4k")
    g.add_argument("--multiples", help=multiples_help)
    p.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: the config's run.device)")
    p.add_argument("--out", help="output folder (default: the run directory)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*",
                   help="config overrides key=value (e.g. attention.backend=reference)")


def existing_run_dir(path: str | Path) -> Path:
    """The run directory `path`, or a clear error when it does not exist or is not a run."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        die(f"run directory {str(run_dir)!r} does not exist; pass the run.out_dir of a training run")
    if not (run_dir / "config.yaml").is_file():
        die(f"{run_dir} is not a run directory (no config.yaml); pass the run.out_dir of a training run")
    return run_dir
