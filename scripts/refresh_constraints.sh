#!/usr/bin/env bash
# Rewrite constraints.txt (the tested versions scripts/install.sh pins) from a fresh, unpinned install:
#   bash scripts/refresh_constraints.sh             # new venv, newest versions, whole test suite, rewrite
#   bash scripts/refresh_constraints.sh --no-test   # install only (then run scripts/test.sh yourself)
# Steps: a new virtual environment in a temporary folder (no system site-packages), then
# `SCALEINV_UNPINNED=1 bash scripts/install.sh` and `bash scripts/test.sh` inside it; only if both
# pass, its `pip freeze` (less pip and this package, torch without its +cpu label) replaces
# constraints.txt. Review the diff and commit it. Run it on a machine without a GPU, with the
# Python the project supports (python3 on PATH, or $PYTHON), so that torch is the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_TESTS=1
case "${1:-}" in
  --no-test) RUN_TESTS=0 ;;
  "") ;;
  *) echo "usage: bash scripts/refresh_constraints.sh [--no-test]" >&2; exit 2 ;;
esac

TMP=$(mktemp -d "${TMPDIR:-/tmp}/scaleinv-refresh.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
"${PYTHON:-python3}" -m venv "$TMP/venv"
unset PYTHON PYTHONPATH
# shellcheck disable=SC1091
source "$TMP/venv/bin/activate"   # python3, and `python` in Slurm test jobs, are the new venv's
VPY=$TMP/venv/bin/python
export SCALEINV_UNPINNED=1         # scripts/test.sh installs again: keep the newest versions
bash scripts/install.sh
if [ "$RUN_TESTS" = 1 ]; then
  bash scripts/test.sh
fi

{
  echo "# Tested versions for scripts/install.sh (pip constraints: they pin a version, install nothing)."
  echo "# Written by scripts/refresh_constraints.sh on $(date -u +%Y-%m-%d) from a fresh install with"
  echo "# $("$VPY" -c 'import platform; print("Python", platform.python_version(), "on", platform.machine())')$([ "$RUN_TESTS" = 1 ] && echo ", test suite passed" || echo ", tests not run")."
  echo "# With any torch but the pinned CPU build (e.g. a CUDA one), scripts/install.sh drops the torch and triton lines."
  "$VPY" -m pip freeze --all --exclude-editable 2>/dev/null \
    | grep -E '^[A-Za-z0-9._-]+==' | grep -vE '^(pip|scaleinv[-_]dist)==' \
    | sed -E 's/^(torch==[^+]+)\+.*/\1/' \
    | LC_ALL=C sort -f
} > "$TMP/constraints.txt"
mv "$TMP/constraints.txt" constraints.txt
echo "refresh_constraints: wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins); review with git diff"
