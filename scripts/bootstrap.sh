#!/usr/bin/env bash
# Create .venv (if needed) and install the package. Usage: scripts/bootstrap.sh [extra]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# Pin the CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
extra=${1:-}
.venv/bin/python -m pip install --quiet -e ".${extra:+[$extra]}"
