"""The one exception type of the data pipeline."""
from __future__ import annotations


class DataError(ValueError):
    """A user-facing data problem (missing path, empty corpus, bad column, data too short).

    The message is one line that names the problem and the fix.
    """
