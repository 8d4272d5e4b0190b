#!/usr/bin/env bash
# Create .venv (if needed) and install the package. Usage: scripts/bootstrap.sh [extra]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# Pin torch first: an unpinned one would pull the newest multi-GB CUDA build. PyPI's Linux wheel of
# 2.13.0 is the CUDA one too; a machine without a local CPU wheel sets
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to get the CPU build.
.venv/bin/python -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
  "torch==${TORCH_VERSION:-2.13.0}"
extra=${1:-}
.venv/bin/python -m pip install --quiet -e ".${extra:+[$extra]}"
