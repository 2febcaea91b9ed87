#!/usr/bin/env bash
# Set up (pinned packages, data) and run ruff and the whole test suite. CI runs exactly this.
# Arguments go to pytest: bash scripts/test.sh -m "not slow" is the fast loop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --ci
PY=$(bash scripts/setup.sh --print-python)
"$PY" -m ruff check .
"$PY" -m pytest -q "$@"
