"""Builds the Cython core in cext/ into the spoa package.

SPOA_DEBUG_BUILD=1 compiles with -O0 -g, bounds checks on and an annotated
HTML report next to each .pyx, for the debug CI job and for profiling.
SPOA_MODULES=_tracker,_packet builds only those modules (quicker edit-build
loops, and one module being edited does not break the others' builds).
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("SPOA_DEBUG_BUILD") == "1"

extra_compile_args = ["-O0", "-g3"] if DEBUG else ["-O2"]
directives = {"language_level": "3", "embedsignature": True}
if DEBUG:
    directives.update(boundscheck=True, wraparound=True)

MODULES = ["_records", "_codec", "_tracker", "_packet", "_sampler", "_slotmap"]
if os.environ.get("SPOA_MODULES"):
    wanted = os.environ["SPOA_MODULES"].split(",")
    unknown = set(wanted) - set(MODULES)
    if unknown:
        raise SystemExit(f"SPOA_MODULES: unknown module(s) {sorted(unknown)}; known: {MODULES}")
    MODULES = wanted

extensions = [
    Extension(f"spoa.{name}", [f"cext/spoa/{name}.pyx"], extra_compile_args=extra_compile_args)
    for name in MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["cext"],
        compiler_directives=directives,
        annotate=DEBUG,
    ),
)
