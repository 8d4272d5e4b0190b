#!/usr/bin/env bash
# The GPU checks, as one script for the lent H200 (device tool; see scripts/gpu-wheels.sh): the CUDA
# tests (every GPU-capable estimator equals its CPU answer), then bench/gpu.py's full workload.
# Everything lands in $OUT (logs, nvidia-smi, the benchmark's JSON). About 5 minutes; each step has its
# own time limit so a slow step cannot take the whole lease. Arguments go to bench/gpu.py (e.g.
# `--methods ekfac` for a rerun of one method).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
{ nvidia-smi; python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; } >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
# --noconftest: tests/conftest.py sets up PostgreSQL/Redis fixtures that the GPU tests do not use.
timeout "${GPU_TEST_TIMEOUT:-150}" python3 -m pytest --noconftest -p no:cacheprovider -q -m gpu tests/gpu 2>&1 | tee "$OUT/pytest.log"
tests=${PIPESTATUS[0]}
timeout "${GPU_BENCH_TIMEOUT:-300}" python3 bench/gpu.py --repeats "${GPU_BENCH_REPEATS:-3}" --out "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench"
exit $((tests || bench))
