"""Choosing a compiled module or its pure-Python twin (the aio-libs convention).

SPOA_NO_EXTENSIONS=1 forces the twins. A compiled module that is missing is
replaced by its twin with a warning; the *_loaded tests fail in CI then.
"""

from __future__ import annotations

import logging
import os
from importlib import import_module
from types import ModuleType

NO_EXTENSIONS = os.environ.get("SPOA_NO_EXTENSIONS", "") not in ("", "0")


def load(compiled: str, twin: str | None) -> tuple[ModuleType | None, str]:
    """(module, "cython" | "python") for `spoa.<compiled>`, else `spoa.<twin>` (None: no twin module).

    Both names are relative to spoa, with their sub-package: load("spop._codec", "spop._codec_py").
    """
    if not NO_EXTENSIONS:
        try:
            return import_module(f"spoa.{compiled}"), "cython"
        except ImportError:
            logging.getLogger("spoa").warning(
                "spoa.%s is not built; using the pure-Python twin (run `pip install .`)", compiled)
    return (import_module(f"spoa.{twin}") if twin else None), "python"
