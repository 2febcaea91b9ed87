#!/usr/bin/env bash
# Install what the project needs: Python packages and the Fashion-MNIST files.
#   bash scripts/setup.sh          # requirements.txt (for users)
#   bash scripts/setup.sh --ci     # pinned versions + test tools (CI and the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
req=requirements.txt
[ "${1:-}" = "--ci" ] && req=requirements-ci.txt

echo "== Python packages ($req)"
"$PYTHON" -m pip install -q --disable-pip-version-check -r "$req"

echo "== Fashion-MNIST"
if "$PYTHON" -c "from fashion_ft.data import find_data_dir as f; f(None, 'train'); f(None, 'test')" 2>/dev/null; then
  "$PYTHON" -c "from fashion_ft.data import find_data_dir as f; print('found in', f(None, 'train'))"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  echo "installed the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)"
else
  echo "Fashion-MNIST not found. Either: sudo apt-get install dataset-fashion-mnist" >&2
  echo "or run the scripts once with --download (fetches it into ./data)." >&2
  exit 1
fi
