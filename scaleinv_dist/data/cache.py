"""Cache directory, content fingerprints, atomic writes and an inter-process file lock.

Layout under the cache directory (see docs/data.md):
    tokenizers/spm-bpe-v{vocab}-{hash}.model     trained sentencepiece models
    tokens/{split}-{hash}/                       TokenStore directories (tokens.bin, offsets.npy, ...)
    manifests/{source_hash}.json                 what prepare_data built for one data config
    hf_datasets/                                 Hugging Face `datasets` arrow cache for local files
    locks/                                       lock files of concurrent builders
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

DEFAULT_CACHE = "~/.cache/scaleinv_dist"
ENV_CACHE = "SCALEINV_CACHE"


def resolve_cache_dir(cache_dir: str = "") -> Path:
    """`data.cache_dir` if set, else $SCALEINV_CACHE if set, else ~/.cache/scaleinv_dist (created)."""
    from .errors import DataError

    path = Path(os.path.expanduser(cache_dir or os.environ.get(ENV_CACHE) or DEFAULT_CACHE))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the data cache directory {path} ({err.strerror}); set "
                        f"data.cache_dir or ${ENV_CACHE} to a writable directory") from None
    return path.resolve()


def fingerprint(texts: Iterable[str]) -> str:
    """sha256 hex of an ordered list of texts (content only: renaming files does not change it)."""
    total = hashlib.sha256()
    for text in texts:
        total.update(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
    return total.hexdigest()


def short_hash(*parts: object) -> str:
    """16 hex characters of sha256 over the JSON of `parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then os.replace it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


@contextlib.contextmanager
def file_lock(cache_dir: Path, name: str) -> Iterator[None]:
    """Exclusive advisory lock (fcntl.flock) on cache_dir/locks/{name}.lock; no-op where unsupported."""
    lock_dir = cache_dir / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on atomic renames alone
        yield
        return
    with open(lock_dir / f"{name}.lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
