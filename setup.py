"""Builds the Cython core in cext/ into the spoa package.

cext/ mirrors the package: cext/spoa/<pkg>/<name>.pyx builds spoa.<pkg>.<name>.

SPOA_DEBUG_BUILD=1 compiles with -O0 -g, bounds checks on and an annotated
HTML report next to each .pyx, for the debug CI job and for profiling.
SPOA_MODULES=_tracker,_packet builds only those modules (quicker edit-build
loops, and one module being edited does not break the others' builds).
"""

import os
import sys
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

sys.path.insert(0, str(Path(__file__).resolve().parent / "cext"))
from build_options import compile_args, directives  # noqa: E402 - cext/ is on the path just above

DEBUG = os.environ.get("SPOA_DEBUG_BUILD") == "1"
extra_compile_args = compile_args(DEBUG)

# Extension name -> the sub-package it is built into (the process that runs it, or wire/ for both).
MODULES = {"_record_builder": "wire", "_packet": "wire", "_codec": "spop", "_tracker": "servernode",
           "_sampler": "servernode", "_lease_answer": "servernode", "_slotmap": "lbnode"}
if os.environ.get("SPOA_MODULES"):
    wanted = os.environ["SPOA_MODULES"].split(",")
    unknown = set(wanted) - set(MODULES)
    if unknown:
        raise SystemExit(f"SPOA_MODULES: unknown module(s) {sorted(unknown)}; known: {sorted(MODULES)}")
    MODULES = {name: MODULES[name] for name in wanted}

extensions = [
    Extension(f"spoa.{pkg}.{name}", [f"cext/spoa/{pkg}/{name}.pyx"], extra_compile_args=extra_compile_args)
    for name, pkg in MODULES.items()
]

setup(
    # The HAProxy include stays at the top of the checkout (the product's
    # shape) and ships inside the package as spoa.haproxy_include, read with
    # importlib.resources (spoa/tools/haproxy_include.py).
    packages=find_packages(include=["spoa", "spoa.*"]) + ["spoa.haproxy_include"],
    package_dir={"spoa.haproxy_include": "haproxy"},
    package_data={"spoa.haproxy_include": ["*.cfg", "*.conf"]},
    ext_modules=cythonize(
        extensions,
        include_path=["cext"],
        compiler_directives=directives(DEBUG),
        annotate=DEBUG,
    ),
)
