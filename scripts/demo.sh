#!/usr/bin/env bash
# Install lapse into .venv and run the demo: Acme Billing behind lapse's proxy mode.
# It prints the URL and the credentials; stop it with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/venv.sh '.'

.venv/bin/lapse policy check examples/lapse.toml
exec .venv/bin/lapse demo "$@"
