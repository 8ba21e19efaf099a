"""The one exception type of the evaluation commands."""
from __future__ import annotations


class EvalError(ValueError):
    """A user mistake in an evaluation command (printed as one `error: ...` line, exit 2)."""
