#!/usr/bin/env bash
# README command 1: install, pretrain the tiny scale-invariant p-RoPE model on the embedded corpus,
# then evaluate it at 1x, 4x and 16x its training length and print the table.
#   bash scripts/quickstart.sh [key=value overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
OUT=${OUT_DIR:-runs/tiny}
$PY launch/train.py --config configs/tiny.yaml run.out_dir="$OUT" "$@"
$PY launch/eval.py --run "$OUT" --multiples 1,4,16
