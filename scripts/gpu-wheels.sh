#!/usr/bin/env bash
# Fetch, here, the wheels that the lent GPU machine lacks for tests/gpu and bench/gpu.py into .whl/
# (git-ignored). That machine has torch, numpy, scikit-learn and pytest but reaches no registry, and
# runs Python 3.12; the estimator library needs pydantic besides. Then, with the device tool:
#   run(command="bash scripts/gpu-check.sh", carry=[".whl"], timeout_s=480)
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
# The versions this checkout's venv runs (the ones CI tests), else pydantic's current release.
pinned() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }
for name in pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
  version=$(pinned "$name")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name${version:+==$version}"
done
ls .whl
