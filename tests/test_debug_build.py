"""SPOA_DEBUG_BUILD=1 checks every index: no .pyx header turns the checks off
(a header wins over the build's directives: the debug build once compiled to
the same C as the release one), and a module built with the debug options
raises on an out-of-bounds index where the release build reads memory."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CEXT = REPO / "cext"


def _options():
    spec = importlib.util.spec_from_file_location("build_options", CEXT / "build_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_module_header_overrides_the_build_directives():
    for pyx in CEXT.rglob("*.pyx"):
        header = [line for line in pyx.read_text().splitlines()[:5] if line.startswith("# cython:")]
        assert header, f"{pyx}: no `# cython:` header"
        assert not re.search(r"boundscheck|wraparound", " ".join(header)), f"{pyx}: {header}"
        # a per-function override must say why, next to it
        for number, line in enumerate(pyx.read_text().splitlines(), 1):
            assert "cython.boundscheck" not in line and "cython.wraparound" not in line, f"{pyx}:{number}"


PROBE = """\
def read(const long long[:] values, Py_ssize_t i):
    return values[i]
"""

BUILD = """\
import sys
from Cython.Build import cythonize
from setuptools import Extension, setup
sys.path.insert(0, {cext!r})
from build_options import compile_args, directives
debug = {debug!r}
setup(name="probe", script_args=["build_ext", "--inplace", "-q"],
      ext_modules=cythonize([Extension("probe", ["probe.pyx"], extra_compile_args=compile_args(debug))],
                            compiler_directives=directives(debug), quiet=True))
"""


@pytest.mark.parametrize("debug", [True, False], ids=["debug", "release"])
def test_the_debug_options_check_an_out_of_bounds_index(tmp_path, debug):
    (tmp_path / "probe.pyx").write_text(PROBE)
    (tmp_path / "build_probe.py").write_text(BUILD.format(cext=str(CEXT), debug=debug))
    subprocess.run([sys.executable, "build_probe.py"], cwd=tmp_path, check=True, capture_output=True, timeout=300)
    generated = (tmp_path / "probe.c").read_text()
    assert ("__Pyx_RaiseBufferIndexError(" in generated.split("__pyx_pf_5probe_read", 1)[1]) == debug
    if debug:  # (the release build would read past the buffer: not run)
        code = ("import array, probe\nvalues = array.array('q', [1, 2, 3])\nassert probe.read(values, 2) == 3\n"
                "try:\n    probe.read(values, 3)\nexcept IndexError as exc:\n    print('IndexError', exc)\n"
                "try:\n    probe.read(values, -4)\nexcept IndexError as exc:\n    print('IndexError', exc)\n")
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True,
                             text=True, timeout=60).stdout
        assert out.count("IndexError") == 2, out
