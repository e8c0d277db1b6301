#!/usr/bin/env bash
# The test command: builds a virtual environment from scratch if needed, installs the CPU build of
# torch 2.13.0 FIRST (so no later requirement can pull CUDA wheels), then the package with its dev
# extras, then runs ruff and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[dev]"
"$VENV/bin/python" -m ruff check src tests benchmarks examples
"$VENV/bin/python" -m pytest -q "$@"
