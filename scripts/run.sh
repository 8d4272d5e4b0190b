#!/usr/bin/env bash
# Install everything and run the service on the embedded default (SQLite + filesystem queue + a worker),
# then run the digits demo against it. Stop with Ctrl-C. Extra arguments go to `influence serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/influence serve --demo "$@"
