#!/usr/bin/env bash
# The test command: builds a virtual environment from scratch if needed, installs torch 2.13.0
# FIRST (the CPU build on the CI machine, whose index serves it from local disk; pinned first so
# that no later requirement can pull another torch with its CUDA wheels), then the package with
# its dev and docs extras, then runs ruff, mypy, the strict documentation build and pytest (the packaging test
# inside it builds the wheel and sdist, runs twine check and installs the wheel into a clean venv).
set -euo pipefail
cd "$(dirname "$0")/.."
# The property tests' "ci" profile (tests/conftest.py): the same examples on every run, so a red
# run is reproducible; plain `pytest` runs keep exploring new ones.
export CI="${CI:-1}"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[dev,docs]"
"$VENV/bin/python" -m ruff check src tests benchmarks examples scripts
"$VENV/bin/python" -m ruff format --check src tests benchmarks examples scripts
# The type checker, configured under [tool.mypy] in pyproject.toml (strict, over src/taskbalance).
"$VENV/bin/python" -m mypy
# --strict turns every warning (a broken link, a missing docstring reference) into a failure.
SITE="$(mktemp -d)"
NO_MKDOCS_2_WARNING=1 "$VENV/bin/python" -m mkdocs build --strict --site-dir "$SITE"
rm -rf "$SITE"
# One worker per core, at most 8 (each imports torch; PYTEST_WORKERS=0 runs in this process),
# each taking whole files: a file's module-scoped fixtures (the DDP runs most of all) then run
# once, not once per worker.
"$VENV/bin/python" -m pytest -q -n "${PYTEST_WORKERS:-auto}" --maxprocesses 8 --dist loadfile "$@"
