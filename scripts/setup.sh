#!/usr/bin/env bash
# Install what the project needs: Python packages and the Fashion-MNIST files.
#   bash scripts/setup.sh                 # requirements.txt (for users)
#   bash scripts/setup.sh --ci            # pinned versions + test tools (CI and the test suite)
#   bash scripts/setup.sh --print-python  # print the interpreter the project uses; changes nothing
#
# Where the packages go: into the active virtual environment ($VIRTUAL_ENV) or conda env ($CONDA_PREFIX)
# when there is one, otherwise into the project's own .venv, made on first use by $PYTHON (default
# python3) with --system-site-packages, so that a torch already installed on the machine (a CUDA build
# on a GPU image) is used rather than downloaded again. A venv also sidesteps pip's refusal to touch an
# "externally managed" system Python (Debian 12, Ubuntu 23.04 and later).
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_PYTHON=${PYTHON:-python3}

die() { echo "setup.sh: $*" >&2; exit 1; }

project_python() {  # the interpreter every script runs, by the rule above
  local env
  for env in "${VIRTUAL_ENV:-}" "${CONDA_PREFIX:-}"; do
    [ -n "$env" ] || continue
    [ -x "$env/bin/python" ] || die "the active environment $env has no bin/python; deactivate it or fix it"
    echo "$env/bin/python"
    return
  done
  echo "$PWD/.venv/bin/python"
}

can_make_venv() { "$BASE_PYTHON" -c 'import venv, ensurepip' 2>/dev/null; }

install_venv_module() {  # as root on Debian/Ubuntu only, and only for the distribution's own python3
  local ver
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  case "$(command -v "$BASE_PYTHON")" in /usr/bin/python3*) ;; *) return 1 ;; esac
  ver=$("$BASE_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  echo "installing the Debian package python$ver-venv (venv and ensurepip for $BASE_PYTHON)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python$ver-venv" >/dev/null
}

make_venv() {  # .venv, unless one that has pip is already there
  [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1 && return
  command -v "$BASE_PYTHON" >/dev/null || die "no $BASE_PYTHON on PATH; install Python 3.10+ or set PYTHON=/path/to/python3"
  if ! can_make_venv && ! { install_venv_module && can_make_venv; }; then
    local ver
    ver=$("$BASE_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo 3)
    die "$BASE_PYTHON cannot make a virtual environment (no venv/ensurepip module). Install it with" \
        "'sudo apt-get install python$ver-venv' (Debian/Ubuntu), or activate a venv or conda env of your own and run again."
  fi
  echo "== Virtual environment .venv (from $BASE_PYTHON, with its site-packages visible)"
  "$BASE_PYTHON" -m venv --clear --system-site-packages .venv
}

if [ "${1:-}" = "--print-python" ]; then
  project_python
  exit 0
fi
req=requirements.txt
case "${1:-}" in
  "") ;;
  --ci) req=requirements-ci.txt ;;
  *) echo "setup.sh: unknown option $1 (use --ci or --print-python)" >&2; exit 2 ;;
esac

PY=$(project_python)
[ "$PY" = "$PWD/.venv/bin/python" ] && make_venv
echo "== Python packages ($req) for $PY"
"$PY" -m pip install -q --disable-pip-version-check -r "$req"

echo "== Fashion-MNIST"
if "$PY" -c "from fashion_ft.data import find_data_dir as f; f(None, 'train'); f(None, 'test')" 2>/dev/null; then
  "$PY" -c "from fashion_ft.data import find_data_dir as f; print('found in', f(None, 'train'))"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  echo "installed the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)"
else
  echo "Fashion-MNIST not found. Either: sudo apt-get install dataset-fashion-mnist" >&2
  echo "or run the scripts once with --download (fetches it into ./data)." >&2
  exit 1
fi
