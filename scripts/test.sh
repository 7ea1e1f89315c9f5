#!/usr/bin/env bash
# Run the test suite in a private virtualenv (.venv), creating it on first use.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/test_config.py -x
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/venv.sh '.[test]'

# tests/e2e runs real nginx and Caddy (Debian packages) in front of lapse: install them once.
# Debian 12's "nginx" is the whole server (auth_request included); its "nginx-light" is just that
# package plus the echo module, so "nginx" is the one to ask for.
# tests/browser drives Debian's Chromium (/usr/bin/chromium) with Playwright: never `playwright install`.
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
missing=()
have nginx || missing+=(nginx)
have caddy || missing+=(caddy)
[ -x /usr/bin/chromium ] || missing+=(chromium)
# tests/connections starts its own PostgreSQL cluster (initdb/pg_ctl; as root through runuser -u postgres).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && have psql || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then as_root=(); elif sudo -n true 2>/dev/null; then as_root=(sudo -n); else as_root=(none); fi
    if [ "${as_root[*]}" = none ]; then
        echo "warning: ${missing[*]} missing and not root: tests/e2e and tests/browser will skip (or fail under CI=true)" >&2
    else
        echo "installing ${missing[*]} for the end-to-end and browser tests (apt)..." >&2
        "${as_root[@]}" apt-get update -qq
        servers=("${missing[@]/chromium}")
        if [ -n "${servers[*]// }" ]; then
            "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -qq --no-install-recommends ${servers[*]} >/dev/null
        fi
        if [[ " ${missing[*]} " == *" chromium "* ]]; then
            # With its recommends (fonts among them), as ../shared/SETUP-NOTES.md verified it.
            "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
        fi
    fi
fi

if [ $# -eq 0 ]; then
    .venv/bin/ruff check src tests bench examples   # lint the whole tree when running the whole suite
fi
exec .venv/bin/python -m pytest "$@"
