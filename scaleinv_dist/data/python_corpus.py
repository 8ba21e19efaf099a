"""The "python" embedded corpus: source and documentation files of the running Python installation.

    docs = python_documents()          # [(name, text)], sorted by (package, path); deterministic
    info = python_manifest(docs)       # interpreter, roots, distributions with versions, per-package counts

Every machine that runs this project has a Python with packages installed (the standard library,
torch, numpy, ...), so this corpus needs no download. What it holds differs between machines (a
GPU machine's torch carries CUDA headers, for instance): the manifest records exactly which
distributions and versions were read, and is stored with the token cache and in a sweep's folder.

Roots (deduplicated by resolved path): the standard library (without its site-packages), then every
site directory of the interpreter (site.getsitepackages, the user site, sysconfig purelib/platlib)
and every sys.path directory holding *.dist-info (e.g. a `pip install --target` folder). The
repository's own checkout is never a root.

Documents: one file each, with a suffix in SUFFIXES, MIN_CHARS..MAX_CHARS characters, valid UTF-8,
not data-like (mean line length <= MAX_MEAN_LINE, no line over MAX_LINE characters); files under
__pycache__, *.dist-info, *.egg-info and hidden folders are skipped, and so are the files of a
folder with more than MAX_DIR_FILES candidates (generated code, e.g. torch's 7000 ATen/ops
headers). Exact duplicates (same text) keep the first in sort order. Near-duplicate grouping sees
code files without their leading comment block (similarity_text: shared licence headers would
otherwise chain unrelated files into one giant group). A document is named by its path under its
site directory ("torch/nn/modules/conv.py"; a top-level module "six.py" as "six/six.py"), or
"stdlib/<path>"; its package is that first component. Order: sorted by (package, name).
Near-duplicates are grouped by near_dup.py when splitting.

The "system" source (data.path=embedded:python+system) adds the other long text a machine has
installed: the files with those suffixes under SYSTEM_DIRS (C, C++ and CUDA headers; plain-text
documentation), as package "system", named "system/<absolute path>".

Files are read by a process pool (one process per CPU, at most 16).
"""
from __future__ import annotations

import hashlib
import os
import site
import sys
import sysconfig
from pathlib import Path

SUFFIXES = (".py", ".pyi", ".pyx", ".pxd", ".rst", ".md", ".txt",
            ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".cu", ".cuh")
MIN_CHARS = 256
MAX_CHARS = 4_000_000
MAX_LINE = 5_000
MAX_MEAN_LINE = 120
SYSTEM_DIRS = ("/usr/include", "/usr/local/include", "/usr/local/cuda/include", "/usr/share/doc")
MAX_DIR_FILES = 1000  # a folder with more candidate files is generated code (e.g. ATen/ops): skipped
SKIP_DIRS = ("__pycache__", "node_modules")
CODE_SUFFIXES = (".py", ".pyi", ".pyx", ".pxd", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".cu", ".cuh")
_COMMENT_STARTS = ("#", "//", "/*", "*", "*/")
SKIP_DIR_SUFFIXES = (".dist-info", ".egg-info")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def python_roots() -> list[tuple[str, Path]]:
    """[(kind, directory)]: ("stdlib", the standard library), then ("site", each site directory)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    cands = [*site.getsitepackages(), site.getusersitepackages(),
             sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    cands += [p for p in sys.path if p and os.path.isdir(p) and any(
        n.endswith(".dist-info") for n in os.listdir(p))]
    roots, seen = [("stdlib", stdlib)], {stdlib}
    for c in cands:
        p = Path(c).resolve()
        if p in seen or p == REPO_ROOT or not p.is_dir():
            continue
        seen.add(p)
        roots.append(("site", p))
    return roots[:1] + sorted(roots[1:], key=lambda r: str(r[1]))


def _skip_dir(name: str) -> bool:
    return name.startswith(".") or name in SKIP_DIRS or name.endswith(SKIP_DIR_SUFFIXES)


def system_roots() -> list[tuple[str, Path]]:
    """[("system", directory)] of SYSTEM_DIRS that exist (C/C++/CUDA headers, documentation)."""
    out, seen = [], set()
    for d in SYSTEM_DIRS:
        p = Path(d)
        if p.is_dir() and p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(("system", p))
    return out


def corpus_roots(sources: tuple[str, ...] = ("python",)) -> list[tuple[str, Path]]:
    """The roots of the selected sources: "python" (python_roots) and/or "system" (system_roots)."""
    return (python_roots() if "python" in sources else []) + (system_roots() if "system" in sources else [])


def list_files(roots: list[tuple[str, Path]] | None = None) -> list[tuple[str, str, str]]:
    """[(package, name, absolute path)] of every candidate file, sorted by (package, name)."""
    roots = python_roots() if roots is None else roots
    site_dirs = {r for k, r in roots if k == "site"}
    out, seen = [], set()
    for kind, root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if kind == "stdlib" and here != root and (here in site_dirs or here.name in
                                                      ("site-packages", "dist-packages")):
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if not _skip_dir(d))
            if sum(f.endswith(SUFFIXES) for f in filenames) > MAX_DIR_FILES:
                continue
            for f in filenames:
                if not f.endswith(SUFFIXES):
                    continue
                path = here / f
                real = os.path.realpath(path)
                if real in seen:
                    continue
                seen.add(real)
                rel = path.relative_to(root).as_posix()
                top = rel.split("/", 1)[0]
                if kind == "system":
                    out.append(("system", f"system{root.as_posix()}/{rel}", str(path)))
                    continue
                package = "stdlib" if kind == "stdlib" else (top[:-len(Path(top).suffix)]
                                                             if "/" not in rel else top)
                out.append((package, rel if kind == "site" and "/" in rel else f"{package}/{rel}", str(path)))
    out.sort(key=lambda t: (t[0], t[1]))
    return out


def similarity_text(name: str, text: str) -> str:
    """What near-duplicate grouping compares: a code file without its leading comment block (the
    licence header most files of a project share, which would chain unrelated files together);
    any other document unchanged."""
    if not name.endswith(CODE_SUFFIXES):
        return text
    lines = text.split("\n")
    i = 0
    while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith(_COMMENT_STARTS)):
        i += 1
    return "\n".join(lines[i:])


def keep_text(text: str) -> bool:
    """The document filter: length bounds and not data-like (see the module docstring)."""
    if not MIN_CHARS <= len(text) <= MAX_CHARS:
        return False
    lines = text.count("\n") + 1
    if len(text) / lines > MAX_MEAN_LINE:
        return False
    return max(map(len, text.split("\n"))) <= MAX_LINE


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CHARS * 4 + 1)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    text = text.replace("\r\n", "\n")
    return text if keep_text(text) else None


def _read_many(paths: list[str], workers: int) -> list[str | None]:
    if workers <= 1 or len(paths) < 256:
        return [_read(p) for p in paths]
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers) as pool:
        return pool.map(_read, paths, chunksize=64)


def python_documents(limit: int = 0, workers: int = 0,
                     sources: tuple[str, ...] = ("python",)) -> list[tuple[str, str]]:
    """[(name, text)] of the corpus in its deterministic order; limit > 0 keeps the first `limit`.
    sources: "python" and/or "system" (see corpus_roots)."""
    files = list_files(corpus_roots(sources))
    workers = workers or _workers()
    docs: list[tuple[str, str]] = []
    seen: set[bytes] = set()
    step = max(1024, 4 * limit) if limit > 0 else len(files)
    for start in range(0, len(files), step):
        part = files[start:start + step]
        for (_, name, _), text in zip(part, _read_many([p for _, _, p in part], workers)):
            if text is None:
                continue
            key = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
            if key in seen:
                continue
            seen.add(key)
            docs.append((name, text))
            if 0 < limit <= len(docs):
                return docs
    return docs


def python_manifest(docs: list[tuple[str, str]] | None = None) -> dict:
    """What the corpus was built from: interpreter, roots, installed distributions (name, version),
    and documents / characters per package when `docs` is given."""
    from importlib import metadata

    roots = python_roots()
    dists = set()
    for kind, root in roots[1:]:
        for d in metadata.distributions(path=[str(root)]):
            name = d.metadata["Name"] if d.metadata else None
            if name:
                dists.add((name, d.version or "", str(root)))
    info = {"python": sys.version.split()[0], "implementation": sys.implementation.name,
            "platform": sys.platform, "roots": [[k, str(r)] for k, r in roots],
            "system_roots": [str(r) for _, r in system_roots()],
            "distributions": [{"name": n, "version": v, "root": r} for n, v, r in sorted(dists)]}
    if docs is not None:
        packages: dict[str, list[int]] = {}
        for name, text in docs:
            p = packages.setdefault(name.split("/", 1)[0], [0, 0])
            p[0] += 1
            p[1] += len(text)
        info["packages"] = {k: {"docs": v[0], "chars": v[1]} for k, v in sorted(packages.items())}
        info["docs"] = len(docs)
        info["chars"] = sum(len(t) for _, t in docs)
    return info


def signature() -> list:
    """A cheap key of what python_documents() would read: interpreter, roots (system roots with
    their entries' modification times), distributions."""
    m = python_manifest()
    system = [[str(r), sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(r))]
              for _, r in system_roots()]
    return [m["python"], m["roots"], [[d["name"], d["version"]] for d in m["distributions"]], system]


def train_python_tokenizer(out: Path, vocab_size: int = 8192, char_cap: int = 10_000_000,
                           val_fraction: float = 0.1) -> Path:
    """Train the committed tokenizer: sentencepiece BPE (tokenizer.py's trainer settings, digits
    split) on every k-th ~1000-character chunk of this machine's python+system training split (the
    split of data.path=embedded:python+system), at most `char_cap` characters."""
    from .cache import atomic_write_bytes
    from .near_dup import near_duplicate_groups
    from .split import split_groups
    from .tokenizer import _train, training_sentences

    docs = python_documents() + python_documents(sources=("system",))
    texts = [t for _, t in docs]
    groups = near_duplicate_groups([similarity_text(n, t) for n, t in docs])
    train_idx, _ = split_groups(texts, groups, val_fraction)
    model = _train(training_sentences([texts[i] for i in train_idx], char_cap), vocab_size,
                   max(1, min(16, os.cpu_count() or 1)))
    atomic_write_bytes(Path(out), model)
    return Path(out)


if __name__ == "__main__":  # python -m scaleinv_dist.data.python_corpus OUT.model [VOCAB]
    path = train_python_tokenizer(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 8192)
    print(f"wrote {path}")
