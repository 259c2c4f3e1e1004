#!/usr/bin/env bash
# Build .venv with Python 3.10 and install TransferLab's stack into it.
# Idempotent: does nothing when .venv/.stamp is newer than the install inputs.
# Override the OneFlow build with ONEFLOW_PIP, e.g.
#   ONEFLOW_PIP="--pre oneflow -f https://oneflow-staging.oss-cn-beijing.aliyuncs.com/branch/master/cu121" make run
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP=$VENV/.stamp

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt requirements/stack.txt ] \
   && [ "$STAMP" -nt scripts/setup.sh ]; then
  exit 0
fi

works() { # works PYTHON: prints it when it is a runnable Python 3.8-3.10
  "$1" -c 'import sys; assert (3, 8) <= sys.version_info[:2] <= (3, 10)' >/dev/null 2>&1 && echo "$1"
}

find_python() {
  if [ -n "${PYTHON:-}" ]; then works "$PYTHON" && return; fi
  for v in 3.10 3.9 3.8; do
    works "python$v" && return
    if command -v pyenv >/dev/null 2>&1; then
      for p in $(pyenv versions --bare 2>/dev/null | grep -E "^$v(\.[0-9]+)?$" | sort -rV); do
        works "$(pyenv root)/versions/$p/bin/python$v" && return
      done
    fi
  done
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  if ! PY=$(find_python); then
    cat >&2 <<'MSG'
error: TransferLab needs Python 3.10 (OneFlow 0.9.0 exists only for Python 3.7-3.10) and none was found.
Install one, then run this command again:
  Debian/Ubuntu:  sudo apt-get install python3.10 python3.10-venv   (or the deadsnakes PPA)
  pyenv:          pyenv install 3.10
  conda:          conda create -n py310 python=3.10, then PYTHON=$(conda run -n py310 which python) make run
Or point PYTHON at one:  PYTHON=/path/to/python3.10 make run
MSG
    exit 1
  fi
  echo "Creating $VENV with $PY ($("$PY" --version 2>&1))"
  "$PY" -m venv "$VENV"
fi

PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
"${PIP[@]}" -q "setuptools<70" wheel
if [ -n "${ONEFLOW_PIP:-}" ]; then
  # shellcheck disable=SC2086  # word splitting is wanted: it holds pip arguments
  "${PIP[@]}" "numpy<2" $ONEFLOW_PIP
else
  "${PIP[@]}" -r requirements/stack.txt
fi
# flowvision 0.2.1 is an sdist whose setup.py imports pkg_resources: build it with our setuptools.
"${PIP[@]}" --no-build-isolation --no-deps "flowvision==0.2.1"
"${PIP[@]}" --no-build-isolation -e ".[test]"
touch "$STAMP"
echo "TransferLab is installed in $VENV"
