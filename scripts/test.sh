#!/usr/bin/env bash
# Run the test suite in a private virtualenv (.venv), creating it on first use.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/test_config.py -x
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    # Debian/Ubuntu ship venv without ensurepip unless python3-venv is installed.
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        apt-get update && apt-get install -y python3-venv
    fi
    rm -rf .venv
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'

exec .venv/bin/python -m pytest "$@"
