"""Packaging: our kernels/ folder never shadows PyPI's `kernels` (which transformers imports), and
`scaleinv_dist.kernels.flash_si` imports from a plain checkout, an editable install and a wheel."""
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path, pythonpath: str | None) -> dict:
    """Run `code` in a fresh interpreter (cwd first on sys.path, as `python -c` does); its last
    stdout line is JSON."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pypi_kernels_installed() -> bool:
    try:
        md.distribution("kernels")
        return True
    except md.PackageNotFoundError:
        return False


def test_kernels_folder_is_only_a_namespace_portion():
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes our folder a regular package that shadows PyPI's `kernels` "
        "(needed by transformers) whenever Python runs from the repository root; keep it a plain folder")
    assert (ROOT / "kernels" / "flash_si.py").is_file()


@pytest.mark.parametrize("pythonpath", [None, str(ROOT)], ids=["cwd", "PYTHONPATH"])
def test_import_kernels_from_repository_root_gives_pypi_package(pythonpath):
    got = _python("import json, kernels; print(json.dumps({'file': kernels.__file__, "
                  "'path': [str(p) for p in kernels.__path__]}))", ROOT, pythonpath)
    if not _pypi_kernels_installed():
        # Without PyPI's package our folder may be found, but only as a namespace package.
        assert got["file"] is None, got
        return
    assert got["file"] and not Path(got["file"]).resolve().is_relative_to(ROOT), (
        f"`import kernels` from the repository root gave {got['file']}, not PyPI's kernels")
    # What transformers' hub integration imports at module level (transformers.integrations.hub_kernels).
    _python("from kernels import CUDAProperties, LayerRepository, Mode, kernelize, use_kernel_mapping; "
            "print('{}')", ROOT, pythonpath)


def test_transformers_hub_kernels_import_from_repository_root():
    pytest.importorskip("transformers")
    got = _python("import json; import transformers.integrations.hub_kernels as h; "
                  "print(json.dumps({'ok': hasattr(h, 'use_kernel_forward_from_hub')}))", ROOT, str(ROOT))
    assert got["ok"]


def test_source_checkout_gives_scaleinv_dist_kernels(tmp_path):
    """PYTHONPATH=<checkout>, run from elsewhere: kernels/ is reached as scaleinv_dist.kernels."""
    got = _python("import json, scaleinv_dist, scaleinv_dist.kernels.flash_si as f; print(json.dumps("
                  "{'pkg': scaleinv_dist.__file__, 'file': f.__file__, "
                  "'attr': scaleinv_dist.kernels.flash_si is f}))", tmp_path, str(ROOT))
    assert Path(got["pkg"]).resolve() == ROOT / "scaleinv_dist" / "__init__.py"
    assert Path(got["file"]).resolve() == ROOT / "kernels" / "flash_si.py"
    assert got["attr"]


def test_installed_package_gives_scaleinv_dist_kernels(tmp_path):
    """The environment's own install (scripts/install.sh: editable), seen from outside the checkout."""
    if not _python("import importlib.util, json; "
                   "print(json.dumps(importlib.util.find_spec('scaleinv_dist') is not None))", tmp_path, None):
        pytest.skip("scaleinv-dist is not installed in this environment (plain checkout)")
    got = _python("import json, scaleinv_dist.kernels.flash_si as f; print(json.dumps({'file': f.__file__}))",
                  tmp_path, None)
    assert Path(got["file"]).name == "flash_si.py" and Path(got["file"]).parent.name == "kernels"


@pytest.mark.slow
def test_wheel_installs_kernels_under_scaleinv_dist_only(tmp_path):
    """A non-editable build: flash_si.py lands in scaleinv_dist/kernels/, no top-level kernels/."""
    pytest.importorskip("setuptools", minversion="70.1")  # builds wheels without the `wheel` package
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("scaleinv_dist", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                    str(tmp_path / "whl"), str(src)], check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "whl").glob("scaleinv_dist-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert (site / "scaleinv_dist" / "kernels" / "flash_si.py").is_file()
    assert not (site / "kernels").exists(), "the wheel must not install a top-level `kernels`"
    got = _python("import json, scaleinv_dist.kernels.flash_si as f; print(json.dumps({'file': f.__file__}))",
                  tmp_path, str(site))
    assert Path(got["file"]).resolve() == (site / "scaleinv_dist" / "kernels" / "flash_si.py").resolve()


# ---- constraints.txt and scripts/install.sh ---------------------------------------------------

MUST_PIN = ["torch", "deepspeed", "triton", "megatron-core", "transformers", "kernels", "datasets",
            "sentencepiece", "wandb", "numpy", "huggingface-hub", "safetensors", "pyarrow", "tokenizers"]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and " " not in line, f"constraints.txt: not name==version: {line!r}"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_constraints_pin_every_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    pins = _pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    names = {d.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()
             for d in declared}
    missing = sorted((names | set(MUST_PIN)) - set(pins))
    assert not missing, f"constraints.txt does not pin {missing}: run scripts/refresh_constraints.sh"
    assert "+" not in pins["torch"], "pin torch without a local label (+cpu) so a CUDA build satisfies it"
    assert not {"pip", "scaleinv-dist"} & set(pins)


def _run_install(tmp_path, torch: str, gpu: bool, unpinned: bool) -> tuple[list[str], str]:
    """scripts/install.sh with a stub Python whose torch is `torch` ('cpu 2.13.0', 'gpu 2.9.0', or
    '' for none; installing torch gives the pin, a CUDA build if nvidia-smi is on PATH) and that
    records its pip calls. Returns
    (the pip calls, the constraints file passed to pip, '' if none)."""
    log, state = tmp_path / "calls.log", tmp_path / "torch_state"
    state.write_text(f"{torch} {torch.split()[-1]}+x\n" if torch else "")
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir()
    stub.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
if [ "$1" = -c ]; then
  case "$2" in *"import torch"*) [ -s {state} ] || exit 1; cat {state}; exit 0;; esac
  exit 0
fi
prev=; for a in "$@"; do [ "$prev" = -c ] && cp "$a" {tmp_path}/constraints.used; prev=$a; done
kind=cpu; command -v nvidia-smi >/dev/null && kind=gpu  # PyPI's Linux torch is a CUDA build
all="$*"; case "$all" in *" torch=="*) v="${{all##*torch==}}"; echo "$kind $v $v+$kind" > {state};; esac
exit 0
""")
    stub.chmod(0o755)
    if gpu:
        (tmp_path / "bin" / "nvidia-smi").write_text("#!/bin/sh\n")
        (tmp_path / "bin" / "nvidia-smi").chmod(0o755)
    path = os.pathsep.join([str(tmp_path / "bin")] + [p for p in os.environ["PATH"].split(os.pathsep)
                                                      if not (Path(p) / "nvidia-smi").exists()])
    env = {**os.environ, "PYTHON": str(stub), "PATH": path, "TMPDIR": str(tmp_path)}
    env.pop("SCALEINV_UNPINNED", None)
    if unpinned:
        env["SCALEINV_UNPINNED"] = "1"
    subprocess.run(["bash", str(ROOT / "scripts" / "install.sh")], env=env, check=True,
                   capture_output=True, timeout=60)
    used = tmp_path / "constraints.used"
    calls = [c for c in log.read_text().splitlines() if c.startswith("-m pip install")]
    return calls, used.read_text() if used.exists() else ""


def _pinned(constraints: str, name: str) -> bool:
    return any(line.startswith(f"{name}==") for line in constraints.splitlines())


PIN = _pins()["torch"]


@pytest.mark.parametrize("torch", ["", f"cpu {PIN}"], ids=["fresh", "rerun"])
def test_install_cpu_machine_pins_everything(tmp_path, torch):
    calls, used = _run_install(tmp_path, torch=torch, gpu=False, unpinned=False)
    assert (calls[0] == f"-m pip install -q torch=={PIN}") == (not torch), calls
    assert sum(f"torch=={PIN}" in c for c in calls) == (0 if torch else 1), calls
    assert any(c.endswith("-e .[test]") and " -c " in c for c in calls), calls
    assert used == (ROOT / "constraints.txt").read_text()


@pytest.mark.parametrize("torch,gpu", [("cpu 2.9.0", False), (f"gpu {PIN}", True), ("", True)],
                         ids=["other-cpu-torch", "cuda-torch", "cuda-machine-no-torch"])
def test_install_keeps_another_torch_and_drops_its_pins(tmp_path, torch, gpu):
    calls, used = _run_install(tmp_path, torch=torch, gpu=gpu, unpinned=False)
    assert any(c.endswith(f"torch=={PIN}") for c in calls) == (not torch), calls
    assert any(c.endswith("-e .[test]") and " -c " in c for c in calls), calls
    assert _pinned(used, "deepspeed") and _pinned(used, "transformers"), used
    assert not _pinned(used, "torch") and not _pinned(used, "triton"), used


def test_install_unpinned_uses_no_constraints(tmp_path):
    calls, used = _run_install(tmp_path, torch=f"cpu {PIN}", gpu=False, unpinned=True)
    assert used == "" and not any(" -c " in c for c in calls), calls
    assert any(c.endswith("-e .[test]") for c in calls), calls
