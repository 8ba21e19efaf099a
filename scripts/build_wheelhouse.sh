#!/usr/bin/env bash
# Wheelhouse for air-gapped clusters; see scripts/build_wheelhouse.py --help and docs/cluster.md.
#   scripts/build_wheelhouse.sh OUT_DIR [--python-version 3.11] [--platform manylinux_2_28_x86_64]
#                               [--cpu|--cuda] [--dry-run]
# then, on the cluster: pip install --no-index --find-links OUT_DIR scaleinv-dist
# Runs with $PYTHON (default: python3 on PATH); that Python's pip does the downloads, and its
# installed torch / deepspeed versions are the defaults.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/build_wheelhouse.py" "$@"
