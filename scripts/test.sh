#!/usr/bin/env bash
# Install everything (with test extras) and run lint, import contracts and the whole test suite against
# the machine's PostgreSQL and Redis (started here if they are not answering). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test
# Peer libraries (captum, dattri, kronfluence, pyDVL, traker, bergson) are test/bench extras; without them
# tests/peers skips.
scripts/install-peers.sh || echo "peer libraries unavailable: tests/peers will be skipped" >&2

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start
  for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 1; done
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports
# loadfile: a module's tests share one process, so module fixtures (a private PostgreSQL/Redis stack) start once.
.venv/bin/pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile -p no:cacheprovider "$@"
