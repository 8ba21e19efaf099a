"""TokenStore: documents as one memory-mapped token array plus document offsets.

Each document is stored as [bos] + tokens + [eos]; document i occupies
tokens[offsets[i]:offsets[i+1]]. On disk a store is a directory:
    tokens.bin    raw token ids, little-endian uint16 (vocab_size <= 65536) or uint32
    offsets.npy   int64, n_docs + 1 entries, offsets[0] = 0, offsets[-1] = n_tokens
    names.json    the documents' names (file path, file#row, ...), for reports
    meta.json     dtype, counts, vocab_size, bos_id, eos_id, fingerprints (written last)
Loading never unpickles (np.load(allow_pickle=False), raw np.memmap, JSON).
A store is built in a temporary directory and renamed into place, so a half-written store is never
visible and concurrent builders of the same store cannot corrupt it (the first rename wins).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .cache import fingerprint, short_hash
from .errors import DataError

FORMAT_VERSION = 1
ENCODE_BATCH_DOCS = 64
PARALLEL_MIN_CHARS = 4_000_000  # smaller inputs are encoded in this process
_JOB: tuple = ()  # (docs, tokenizer, dtype) shared with forked encoder processes


def _encode_range(span: tuple[int, int]) -> list[bytes]:
    """[bos] + ids + [eos] of _JOB's documents span[0]:span[1], each as raw token bytes."""
    docs, tok, dtype = _JOB
    return [np.asarray([tok.bos_id, *ids, tok.eos_id], dtype=dtype).tobytes()
            for ids in tok.encode_batch(docs[span[0]:span[1]], num_threads=1)]


def encoded_documents(docs: Sequence[str], tokenizer, dtype: np.dtype, workers: int = 0) -> Iterator[bytes]:
    """Raw token bytes ([bos] + ids + [eos]) of each document, in order.

    Large inputs are encoded by a pool of `workers` forked processes (0: one per CPU, at most 16),
    ENCODE_BATCH_DOCS documents per task; the result does not depend on the number of workers.
    """
    global _JOB
    workers = workers or max(1, min(16, os.cpu_count() or 1))
    spans = [(s, min(s + ENCODE_BATCH_DOCS, len(docs))) for s in range(0, len(docs), ENCODE_BATCH_DOCS)]
    _JOB = (docs, tokenizer, dtype)
    try:
        if workers <= 1 or sum(len(d) for d in docs) < PARALLEL_MIN_CHARS or "fork" not in \
                multiprocessing.get_all_start_methods():
            for span in spans:
                yield from _encode_range(span)
            return
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for part in pool.imap(_encode_range, spans, chunksize=4):
                yield from part
    finally:
        _JOB = ()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def store_key(tokenizer_sha256: str, docs: Sequence[str]) -> str:
    """Cache key of the store of `docs` tokenised with the model whose bytes hash to tokenizer_sha256."""
    return short_hash(FORMAT_VERSION, tokenizer_sha256, fingerprint(docs))


class TokenStore:
    """tokens: (n_tokens,) uint16/uint32 array (memory-mapped when opened); offsets: (n_docs+1,) int64."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, meta: dict | None = None,
                 names: Sequence[str] | None = None, path: str | Path | None = None):
        self.tokens = tokens
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.meta = dict(meta or {})
        self.names = list(names) if names is not None else [f"doc{i}" for i in range(self.n_docs)]
        self.path = Path(path) if path is not None else None
        if self.offsets[0] != 0 or self.offsets[-1] != len(tokens) or np.any(np.diff(self.offsets) < 0):
            raise DataError(f"token store {path}: offsets do not match the token array; delete "
                            "the directory to rebuild it")

    # -- sizes
    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def doc_lengths(self) -> np.ndarray:
        """(n_docs,) int64 tokens per document, bos and eos included."""
        return np.diff(self.offsets)

    @property
    def bos_id(self) -> int:
        return int(self.meta.get("bos_id", -1))

    @property
    def eos_id(self) -> int:
        return int(self.meta.get("eos_id", -1))

    @property
    def vocab_size(self) -> int:
        return int(self.meta.get("vocab_size", 0))

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document i, bos and eos included (a view)."""
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def __repr__(self) -> str:
        return f"TokenStore({self.path}, docs={self.n_docs}, tokens={self.n_tokens})"

    @classmethod
    def from_token_lists(cls, docs: Sequence[Sequence[int]], bos_id: int = 1, eos_id: int = 2,
                         vocab_size: int = 65536) -> "TokenStore":
        """An in-memory store of already tokenised documents (bos/eos added here); for tests."""
        parts = [np.asarray([bos_id, *d, eos_id], dtype=np.int64) for d in docs]
        lengths = np.array([len(p) for p in parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.concatenate(parts).astype(token_dtype(vocab_size)) if parts else np.zeros(0, token_dtype(vocab_size))
        return cls(tokens, offsets, {"bos_id": bos_id, "eos_id": eos_id, "vocab_size": vocab_size})

    # -- disk
    @classmethod
    def build(cls, docs: Sequence[str], tokenizer, path: str | Path,
              names: Sequence[str] | None = None, workers: int = 0) -> "TokenStore":
        """Tokenise `docs` into a store at `path` (a directory), atomically; returns the opened store.

        If `path` already holds a complete store (e.g. another process built it) it is opened instead.
        workers: encoder processes for large inputs (encoded_documents; 0 = one per CPU, at most 16).
        """
        path = Path(path)
        if (path / "meta.json").is_file():
            return cls.open(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        dtype = token_dtype(tokenizer.vocab_size)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        try:
            offsets = [0]
            with open(tmp / "tokens.bin", "wb") as f:
                for raw in encoded_documents(docs, tokenizer, dtype, workers):
                    f.write(raw)
                    offsets.append(offsets[-1] + len(raw) // dtype.itemsize)
                f.flush()
                os.fsync(f.fileno())
            np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64), allow_pickle=False)
            names = list(names) if names is not None else [f"doc{i}" for i in range(len(docs))]
            (tmp / "names.json").write_text(json.dumps(names))
            meta = {"format_version": FORMAT_VERSION, "dtype": dtype.str, "n_tokens": offsets[-1],
                    "n_docs": len(docs), "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                    "eos_id": tokenizer.eos_id, "tokenizer_sha256": tokenizer.sha256,
                    "tokenizer_path": str(tokenizer.model_path), "corpus_fingerprint": fingerprint(docs)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.replace(tmp, path)  # atomic; fails if another builder's store is already there
            except OSError:
                if not (path / "meta.json").is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(path)

    @classmethod
    def open(cls, path: str | Path) -> "TokenStore":
        """Memory-map the store at `path` (read-only)."""
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise DataError(f"no token store at {path} (meta.json missing); run prepare_data() or "
                            "delete the directory to rebuild it")
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"token store {path} has format {meta.get('format_version')}, this code "
                            f"reads {FORMAT_VERSION}; delete the directory to rebuild it")
        offsets = np.load(path / "offsets.npy", allow_pickle=False)
        n = int(meta["n_tokens"])
        dtype = np.dtype(meta["dtype"])
        tokens = (np.memmap(path / "tokens.bin", dtype=dtype, mode="r", shape=(n,)) if n
                  else np.zeros(0, dtype=dtype))
        names = json.loads((path / "names.json").read_text())
        return cls(tokens, offsets, meta, names, path)
