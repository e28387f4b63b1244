#!/usr/bin/env bash
# Create or reuse .venv and install the project into it (versions from constraints.txt) when pyproject.toml
# or constraints.txt changed.
# `bootstrap.sh test` also installs Debian's chromium for the dashboard test when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt -e '.[api,ml,test,client]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# tests/test_dashboard.py drives the system's Chromium (Playwright downloads no browser); it skips without one.
if [ "${1:-}" = test ] && [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's chromium for tests/test_dashboard.py" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } ||
    echo "could not install chromium: tests/test_dashboard.py will skip" >&2
fi
