#!/usr/bin/env bash
# Run the test suite in a private virtualenv (.venv), creating it on first use.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/test_config.py -x
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/venv.sh '.[test]'

if [ $# -eq 0 ]; then
    .venv/bin/ruff check src tests bench   # lint the whole tree when running the whole suite
fi
exec .venv/bin/python -m pytest "$@"
