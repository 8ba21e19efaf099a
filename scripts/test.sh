#!/usr/bin/env bash
# README command 2 (and CI): install everything the tests need, bring up a one-node Slurm cluster
# on localhost for the cluster tests, and run the whole test suite on the CPU.
#   bash scripts/test.sh [pytest arguments...]
# Runs with $PYTHON (default: python3 on PATH, i.e. the active virtual environment's).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
if [ "${CI:-}" = true ]; then
  # CI must exercise the real local Slurm cluster: a failed bring-up fails the run.
  bash scripts/slurm_local_up.sh
  export SCALEINV_REQUIRE_SLURM=1
elif [ "$(id -u)" = 0 ]; then
  bash scripts/slurm_local_up.sh || echo "warning: local Slurm did not come up; Slurm tests will be skipped"
fi
export SCALEINV_CACHE=${SCALEINV_CACHE:-$PWD/.cache/test}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export WANDB_MODE=offline
"$PY" -m pytest -q -m "not gpu" -p no:cacheprovider "$@"
