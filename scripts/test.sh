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
# tests/store and tests/e2e start their own redis-server processes (free ports, no persistence): never the service.
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
missing=()
have nginx || missing+=(nginx)
have caddy || missing+=(caddy)
have redis-server || missing+=(redis-server)
have openssl || missing+=(openssl)   # certificates for the Redis TLS test
[ -x /usr/bin/chromium ] || missing+=(chromium)
# tests/oidc runs a real OpenID provider (npm oidc-provider) on Node: Debian's nodejs (npm below).
have node || missing+=(nodejs)
# tests/test_syslog_remote.py starts its own rsyslogd (free ports, -n; never the service); TLS needs its gtls driver.
have rsyslogd || missing+=(rsyslog)
ls /usr/lib/*/rsyslog/lmnsd_gtls.so >/dev/null 2>&1 || missing+=(rsyslog-gnutls)
# tests/connections starts its own PostgreSQL cluster (initdb/pg_ctl; as root through runuser -u postgres).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && have psql || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then as_root=(); elif sudo -n true 2>/dev/null; then as_root=(sudo -n); else as_root=(none); fi
    if [ "${as_root[*]}" = none ]; then
        echo "warning: ${missing[*]} missing and not root: tests/e2e, tests/browser, tests/oidc, the Redis and the remote syslog tests will skip (or fail under CI=true)" >&2
    else
        echo "installing ${missing[*]} for the end-to-end, browser, OIDC, Redis and syslog tests (apt)..." >&2
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

# npm after nodejs: where nodejs comes from NodeSource it already brings npm (and conflicts with Debian's).
if ! have npm && have node; then
    if [ "$(id -u)" -eq 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null || true
    elif sudo -n true 2>/dev/null; then
        sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null || true
    fi
fi

# The test IdP's packages, from its lock file, once (tests/oidc/conftest.py does the same if this is skipped).
if command -v npm >/dev/null 2>&1 && [ ! -d tests/oidc/idp/node_modules/oidc-provider ]; then
    echo "installing the test OpenID provider (npm ci in tests/oidc/idp)..." >&2
    (cd tests/oidc/idp && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi

if [ $# -eq 0 ]; then
    .venv/bin/ruff check src tests bench examples   # lint the whole tree when running the whole suite
fi
exec .venv/bin/python -m pytest "$@"
