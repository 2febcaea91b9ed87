#!/usr/bin/env bash
# Set up (pinned packages, data) and run ruff and the whole test suite. CI runs exactly this.
# Arguments go to pytest: bash scripts/test.sh -m "not slow" is the fast loop. The tests run in one
# pytest-xdist worker per core (at most 8), each with its share of the threads (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --ci
PY=$(bash scripts/setup.sh --print-python)
"$PY" -m ruff check .
"$PY" -m pytest -q -n auto --maxprocesses 8 --dist worksteal "$@"
