# Sourced by demo.sh and test.sh: make .venv (once) and install lapse into it with the given extras.
# Usage: . scripts/venv.sh '.[test]'
if [ ! -x .venv/bin/python ]; then
    # Debian/Ubuntu ship venv without ensurepip unless python3-venv is installed.
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        apt-get update && apt-get install -y python3-venv
    fi
    rm -rf .venv
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$1"
