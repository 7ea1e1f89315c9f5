#!/usr/bin/env bash
# Show what lapse decides for a few requests against examples/lapse.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/venv.sh '.'

lapse() { .venv/bin/lapse --config examples/lapse.toml "$@"; }

echo "== policy check examples/lapse.toml"
lapse policy check examples/lapse.toml

echo
echo "== billing, from the office (10.1.2.3)"
lapse policy explain --host billing.example.test --path /billing/invoices --ip 10.1.2.3

echo
echo "== wiki, from outside (203.0.113.7)"
lapse policy explain --host wiki.example.test --path /wiki/Home --ip 203.0.113.7

echo
echo "== POST to billing's admin route (step-up: fresh sign-in with MFA)"
lapse policy explain --host billing.example.test --path /billing/admin/refunds --method POST --ip 10.1.2.3
