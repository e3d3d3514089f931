#!/usr/bin/env bash
# Set everything up (first time only), check formatting and lint, run the test suite.
#
#   bash scripts/test.sh [--fast] [PYTEST_ARGS...]
#
# --fast: for daily work, skip the tests marked e2e (they start Flower simulations,
# `flwr run` or deployment processes) and slow (pyproject.toml, [tool.pytest.ini_options]);
# ruff still runs. Without it the whole suite runs, as in CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
marker=()
if [ "${1:-}" = "--fast" ]; then
  shift
  marker=(-m "not e2e and not slow")
fi
bash scripts/setup.sh
# docker-compose validates docker-compose.yml in the tests (no Docker engine is needed for that).
if ! command -v docker-compose >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing docker-compose (Debian package)" >&2
    apt-get install -y -q --no-install-recommends docker-compose >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends docker-compose >/dev/null; }
  else
    echo "[test] docker-compose is missing: install it (e.g. apt-get install docker-compose); its tests will fail" >&2
  fi
fi
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
.venv/bin/ruff format --check .
.venv/bin/ruff check .
status=0
.venv/bin/python -m pytest "${marker[@]}" "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests" >&2   # exit 5: treat as a failure, a suite must run
  exit 1
fi
exit "$status"
