#!/usr/bin/env bash
# Set everything up (first time only) and run the demo federation; extra arguments go to
# `copra-fl simulate` (e.g. --quick, --rounds 3, --set lora.r=4). --overwrite: a re-run
# replaces the previous demo run in runs/demo (copra-fl simulate refuses a folder holding a run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
exec .venv/bin/copra-fl simulate --out runs/demo --overwrite "$@"
