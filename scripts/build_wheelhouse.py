#!/usr/bin/env python3
"""Build a wheelhouse: every wheel an air-gapped cluster needs to install scaleinv-dist offline.

    scripts/build_wheelhouse.sh OUT_DIR [--python-version 3.11] [--platform manylinux_2_28_x86_64]
                                [--cpu | --cuda [--torch-index URL]] [--torch-version 2.13.0]
                                [--deepspeed-version 0.19.8] [--extras test] [--dry-run]

Run it on a machine with internet access (any OS that can run pip); copy OUT_DIR to the cluster;
install there, in the cluster's Python of the same version:

    pip install --no-index --find-links OUT_DIR scaleinv-dist

Steps:
  1. torch, as binary wheels for the target Python / platform: --cpu from the CPU index
     (https://download.pytorch.org/whl/cpu), --cuda (default) from PyPI, whose Linux x86_64 torch
     is a CUDA build that pulls the nvidia-* runtime wheels (several GB), or from --torch-index
     (e.g. https://download.pytorch.org/whl/cu128 for a specific CUDA);
  2. DeepSpeed, which PyPI ships only as source: built here as a pure-Python wheel with
     DS_BUILD_OPS=0 (its CUDA/C++ ops JIT-compile on first use on the cluster, which then needs a
     compiler and, for GPU ops, the CUDA toolkit; set TORCH_EXTENSIONS_DIR to a shared cache);
  3. our own wheel (pip wheel --no-deps of this repository);
  4. every other dependency (pyproject's [project.dependencies], the chosen --extras and DeepSpeed's
     own requirements, with their dependencies) as binary wheels for the target, resolving torch to
     the wheel of step 1 (pinned by a constraints file).
Versions default to those installed in the Python running this script (so the wheelhouse
reproduces a tested environment), else the newest that pyproject allows.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
SOURCE_ONLY = {"deepspeed"}  # built locally (step 2)
NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def req_name(req: str) -> str:
    m = NAME_RE.match(req)
    if not m:
        raise SystemExit(f"cannot parse requirement {req!r}")
    return norm(m.group(1))


def installed_version(dist: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(dist).split("+")[0]
    except Exception:
        return None


def read_pyproject() -> dict:
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        try:
            import tomli as tomllib
        except ImportError:
            raise SystemExit("needs Python >= 3.11 (tomllib) or the tomli package to read pyproject.toml")
    return tomllib.loads(text)["project"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                   help="target Python, e.g. 3.11 (default: this Python's)")
    p.add_argument("--platform", action="append", default=None,
                   help="target platform tag, repeatable (default: manylinux_2_28_x86_64, which pip "
                        "extends to older manylinux tags; use manylinux2014_x86_64 for glibc 2.17 "
                        "clusters, noting that recent torch wheels need glibc >= 2.28)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cpu", action="store_true", help="CPU-only torch")
    g.add_argument("--cuda", action="store_true", help="CUDA torch (the default)")
    p.add_argument("--torch-index", default=None,
                   help=f"index for torch (default: {CPU_INDEX} with --cpu, PyPI with --cuda)")
    p.add_argument("--torch-version", default=None, help="default: the installed torch, else the newest")
    p.add_argument("--deepspeed-version", default=None, help="default: the installed deepspeed, else the newest")
    p.add_argument("--extras", default="", help="optional dependency groups to include, e.g. test")
    p.add_argument("--index-url", default=None, help="PyPI mirror for everything but torch")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p.parse_args(argv)


class Runner:
    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def __call__(self, cmd: list[str], env: dict | None = None) -> None:
        prefix = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        print(f"+ {prefix + ' ' if prefix else ''}{shlex.join(cmd)}", flush=True)
        if self.dry_run:
            return
        r = subprocess.run(cmd, env={**os.environ, **(env or {})})
        if r.returncode != 0:
            raise SystemExit(f"build_wheelhouse: command failed with exit status {r.returncode}")


def target_flags(a) -> list[str]:
    pyver = a.python_version.replace(".", "")
    flags = ["--only-binary=:all:", "--python-version", a.python_version, "--implementation", "cp",
             "--abi", f"cp{pyver}", "--abi", "abi3", "--abi", "none"]
    for plat in expand_platforms(a.platform or ["manylinux_2_28_x86_64"]):
        flags += ["--platform", plat]
    return flags


def expand_platforms(platforms: list[str]) -> list[str]:
    """pip treats --platform manylinux_2_28_x86_64 literally (it expands only the legacy
    manylinux2014/2010 names), so add every older glibc tag a manylinux_2_X machine accepts."""
    out: list[str] = []
    for plat in platforms:
        m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", plat)
        if m:
            glibc, arch = int(m.group(1)), m.group(2)
            out += [f"manylinux_2_{v}_{arch}" for v in range(glibc, 16, -1)]
            if glibc >= 17:
                out.append(f"manylinux2014_{arch}")  # pip adds manylinux2010 / manylinux1 to this
        else:
            out.append(plat)
    return list(dict.fromkeys(out))


def wheel_requires(wheel: Path) -> list[str]:
    """Requires-Dist lines of a wheel (without extras-only requirements)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    reqs = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = line.split(":", 1)[1].strip()
            if not re.search(r"\bextra\s*==", req):
                reqs.append(req)
    return reqs


def copy_source(dest: Path) -> Path:
    """The files git would commit (tracked + untracked, not ignored), else the tree minus junk."""
    import shutil
    try:
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            ".git", "build", "runs", "*.egg-info", "__pycache__", "wandb", ".pytest_cache"))
        return dest
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def main(argv=None) -> int:
    a = parse_args(argv)
    run = Runner(a.dry_run)
    out = a.out_dir.resolve()
    if not a.dry_run:
        out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    cpu = a.cpu
    project = read_pyproject()
    deps = list(project.get("dependencies", []))
    for extra in filter(None, (e.strip() for e in a.extras.split(","))):
        group = project.get("optional-dependencies", {}).get(extra)
        if group is None:
            raise SystemExit(f"no optional dependency group {extra!r} in pyproject.toml")
        deps += group
    flags = target_flags(a)
    pypi = ["--index-url", a.index_url] if a.index_url else []

    # 1. torch
    torch_version = a.torch_version or installed_version("torch")
    torch_req = f"torch=={torch_version}" if torch_version else next(d for d in deps if req_name(d) == "torch")
    torch_index = a.torch_index or (CPU_INDEX if cpu else None)
    print(f"# 1/4 torch ({'CPU' if cpu else 'CUDA'}): {torch_req} from {torch_index or 'PyPI'}")
    run(pip + ["download", *flags, "--dest", str(out),
               *(["--index-url", torch_index] if torch_index else pypi), torch_req])
    torch_wheels = sorted(out.glob("torch-*.whl")) if not a.dry_run else []
    if torch_wheels:
        torch_pin = "torch==" + torch_wheels[-1].name.split("-")[1]
    else:
        torch_pin = torch_req + ("+cpu" if cpu and "==" in torch_req and "+" not in torch_req else "")

    # 2. deepspeed (source-only on PyPI): a pure wheel without prebuilt ops
    ds_version = a.deepspeed_version or installed_version("deepspeed")
    ds_req = f"deepspeed=={ds_version}" if ds_version else next(d for d in deps if req_name(d) == "deepspeed")
    print(f"# 2/4 {ds_req}: pure wheel, DS_BUILD_OPS=0 (ops JIT-compile on the cluster when used)")
    run(pip + ["wheel", "--no-deps", "--wheel-dir", str(out), *pypi, ds_req],
        env={"DS_BUILD_OPS": "0"})
    ds_wheels = sorted(out.glob("deepspeed-*.whl")) if not a.dry_run else []
    ds_deps = wheel_requires(ds_wheels[-1]) if ds_wheels else []

    # 3. our wheel, built from a clean copy of the tree (no stale build/ directory can leak in)
    print("# 3/4 scaleinv-dist (this repository)")
    with tempfile.TemporaryDirectory() as tmp:
        src = ROOT if a.dry_run else copy_source(Path(tmp) / "src")
        run(pip + ["wheel", "--no-deps", "--wheel-dir", str(out), *pypi, str(src)])

    # 4. everything else, torch pinned to the wheel of step 1
    reqs, seen = [], set()
    for d in deps + ds_deps:
        name = req_name(d)
        if name in ("torch",) or name in SOURCE_ONLY or name == norm(project["name"]):
            continue
        reqs.append(d)
        seen.add(name)
    pins = [torch_pin]
    if ds_wheels:
        pins.append("deepspeed==" + ds_wheels[-1].name.split("-")[1])
    print(f"# 4/4 {len(reqs)} requirements and their dependencies, binary wheels for "
          f"cp{a.python_version.replace('.', '')} / {', '.join(a.platform or ['manylinux_2_28_x86_64'])}")
    with tempfile.TemporaryDirectory() as tmp:
        req_file, con_file = Path(tmp) / "requirements.txt", Path(tmp) / "constraints.txt"
        req_file.write_text("\n".join(reqs) + "\n")
        con_file.write_text("\n".join(pins) + "\n")
        if a.dry_run:
            print(f"#   requirements: {reqs + (['<deepspeed requirements>'] if not ds_deps else [])}")
            print(f"#   constraints:  {pins}")
        run(pip + ["download", *flags, "--dest", str(out), "--find-links", str(out), *pypi,
                   "--constraint", str(con_file), "--requirement", str(req_file)])

    if not a.dry_run:
        wheels = sorted(p.name for p in out.glob("*.whl"))
        size = sum(p.stat().st_size for p in out.glob("*.whl")) / 2 ** 20
        print(f"\n{len(wheels)} wheels, {size:.0f} MiB in {out}")
        sdists = [p.name for p in out.iterdir() if p.suffix in (".gz", ".zip") or p.name.endswith(".tar.gz")]
        if sdists:
            print(f"warning: source distributions present (need a compiler on the cluster): {sdists}")
    print("\nOn the cluster (Python " + a.python_version + "), offline:\n"
          f"  python -m venv .venv && . .venv/bin/activate\n"
          f"  pip install --no-index --find-links {out} scaleinv-dist"
          + (f"[{a.extras}]" if a.extras else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
