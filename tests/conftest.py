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

# Fixture id -> module: the ids show up in test names, e.g. test_x[cython].
TWIN_MODULES = {"cython": "spoa.spop._codec", "python": "spoa.spop._codec_py"}


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


def compiled_codec_disabled(config: pytest.Config) -> bool:
    """True when the user asked for the pure-Python codec only."""
    if config.getoption("--no-c-extensions"):
        return True
    return os.environ.get("SPOA_NO_EXTENSIONS", "") not in ("", "0")


def load_twin(config: pytest.Config, twin: str) -> ModuleType:
    """Import one twin by fixture id, skipping the compiled one when unavailable."""
    if twin == "cython":
        if compiled_codec_disabled(config):
            pytest.skip("compiled codec disabled (SPOA_NO_EXTENSIONS / --no-c-extensions)")
        try:
            return importlib.import_module(TWIN_MODULES[twin])
        except ImportError as exc:  # test_compiled_codec_loaded reports this as a failure
            pytest.skip(f"spoa.spop._codec is not built: {exc}")
    return importlib.import_module(TWIN_MODULES[twin])




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
