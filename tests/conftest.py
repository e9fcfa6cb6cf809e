"""Fixtures that run every codec test against both twins.

The compiled codec (spoa.spop._codec) and its pure-Python twin (spoa.spop._codec_py)
promise identical behaviour, so tests never import either directly: they ask
for `codec`, which is parametrized over both (ids "cython" and "python", as in
aio-libs/multidict), or for `encoder_codec` x `decoder_codec` to encode with
one twin and decode with the other.

The compiled twin is skipped, not failed, when it is disabled
(SPOA_NO_EXTENSIONS=1 or --no-c-extensions) or not built;
tests/spop/test_codec_twins.py::test_compiled_codec_loaded is the one test that
fails when it silently did not load.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

# Each compiled module and its pure-Python twin, by the name tests ask for.
TWINS = {
    "codec": ("spoa.spop._codec", "spoa.spop._codec_py"),
    "packet": ("spoa.wire._packet", "spoa.wire._packet_py"),
    "tracker": ("spoa.servernode._tracker", "spoa.servernode._tracker_py"),
    "slotmap": ("spoa.lbnode._slotmap", "spoa.lbnode._slotmap_py"),
    "lease_answer": ("spoa.servernode._lease_answer", "spoa.servernode._lease_answer_py"),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-c-extensions",
        action="store_true",
        default=False,
        help="skip tests of the compiled codec (same as SPOA_NO_EXTENSIONS=1)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # --strict-markers is on (pyproject.toml): register the marker we attach.
    config.addinivalue_line("markers", "c_extension: runs against the compiled codec spoa.spop._codec")


def compiled_disabled(config: pytest.Config) -> bool:
    """True when the user asked for the pure-Python twins only."""
    if config.getoption("--no-c-extensions"):
        return True
    return os.environ.get("SPOA_NO_EXTENSIONS", "") not in ("", "0")


def load_twin(config: pytest.Config, twin: str, module: str = "codec") -> ModuleType:
    """One twin of `module` (a TWINS name) by fixture id, "cython" or "python";
    the compiled one is skipped when disabled or not built (each module's
    test_compiled_*_loaded fails then)."""
    compiled, python = TWINS[module]
    if twin == "python":
        return importlib.import_module(python)
    if compiled_disabled(config):
        pytest.skip("compiled modules disabled (SPOA_NO_EXTENSIONS / --no-c-extensions)")
    try:
        return importlib.import_module(compiled)
    except ImportError as exc:
        pytest.skip(f"{compiled} is not built: {exc}")


def twin_fixture(module: str):
    """A session fixture over both twins of `module`: tests using it run once per twin."""

    @pytest.fixture(scope="session", params=twin_params())
    def fixture(request: pytest.FixtureRequest) -> ModuleType:
        return load_twin(request.config, request.param, module)

    return fixture


def compiled_fixture(module: str):
    """A session fixture of the compiled twin of `module` alone (differential tests)."""

    @pytest.fixture(scope="session")
    def fixture(request: pytest.FixtureRequest) -> ModuleType:
        return load_twin(request.config, "cython", module)

    return fixture




def twin_params(prefix: str = "") -> list:
    """Both twins as fixture params; `prefix` keeps ids of paired fixtures apart."""
    return [
        pytest.param("cython", marks=pytest.mark.c_extension, id=f"{prefix}cython"),
        pytest.param("python", id=f"{prefix}python"),
    ]


# Session scope: the modules are stateless, and hypothesis refuses
# function-scoped fixtures under @given.


@pytest.fixture(scope="session", params=twin_params())
def codec(request: pytest.FixtureRequest) -> ModuleType:
    """One codec twin; every test using it runs once per twin."""
    return load_twin(request.config, request.param)


@pytest.fixture(scope="session", params=twin_params("enc-"))
def encoder_codec(request: pytest.FixtureRequest) -> ModuleType:
    """The twin that writes the bytes in a cross-twin test."""
    return load_twin(request.config, request.param)


@pytest.fixture(scope="session", params=twin_params("dec-"))
def decoder_codec(request: pytest.FixtureRequest) -> ModuleType:
    """The twin that reads them back; with encoder_codec: all 4 directions
    (test ids like test_x[enc-cython-dec-python])."""
    return load_twin(request.config, request.param)


@pytest.fixture(scope="session")
def compiled_codec(request: pytest.FixtureRequest) -> ModuleType:
    """The compiled twin alone (fuzzing, differential comparisons)."""
    return load_twin(request.config, "cython")


@pytest.fixture(scope="session")
def python_codec(request: pytest.FixtureRequest) -> ModuleType:
    """The pure-Python reference twin alone."""
    return load_twin(request.config, "python")


# -- a real Valkey/Redis Cluster (spoa/tools/store_cluster.py) -----------------------------------------
# Small (3 primaries x 1 replica, ~2 s to form), cluster-node-timeout 1 s as in the failover
# tests; the 2-core box is shared, so one cluster serves the whole session and the tests that break
# nodes start their own. Tests on the shared one keep apart by key prefix (their own tier name).
STORE_NODE_TIMEOUT_MS = 1000


@pytest.fixture(scope="session")
def store_cluster():
    """A 3-primary/3-replica cluster for the session; do not kill its nodes (use new_store_cluster)."""
    from spoa.tools.store_cluster import StoreCluster

    with StoreCluster(primaries=3, replicas=1, node_timeout_ms=STORE_NODE_TIMEOUT_MS) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis7_store_cluster():
    """A 3-primary/3-replica cluster of Debian's redis-server 7.0 (the other engine the tier
    supports; ./run.sh setup installs it with apt when run as root)."""
    import shutil

    from spoa.tools.store_cluster import StoreCluster

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found: apt-get install redis-server (Debian's 7.0), or ./run.sh setup as root")
    with StoreCluster(primaries=3, replicas=1, node_timeout_ms=STORE_NODE_TIMEOUT_MS, binary=binary) as cluster:
        yield cluster


@pytest.fixture
def new_store_cluster():
    """A factory of clusters of one's own (StoreCluster keyword arguments), all stopped after the test."""
    from spoa.tools.store_cluster import StoreCluster

    started = []

    def start(**kwargs):
        kwargs.setdefault("node_timeout_ms", STORE_NODE_TIMEOUT_MS)
        started.append(StoreCluster(**kwargs))
        return started[-1].start()

    yield start
    for cluster in started:
        cluster.stop()
