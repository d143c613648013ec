#!/usr/bin/env bash
# Installs sparseticket and what its tests need on a fresh CPU machine, then builds the
# compiled kernels against the installed torch. Safe to run again (a no-op rebuild
# takes seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_VERSION="${SPARSETICKET_TORCH:-2.13.0}"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  "$PY" -m pip install -q "torch==$TORCH_VERSION"
fi
"$PY" -m pip install -q -r requirements-dev.txt
# --no-build-isolation: compile against the torch installed above, not a fresh one
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" -m sparseticket.info
