"""Compiler options of the Cython core, release or debug (setup.py, and the
test that a debug build really checks: tests/test_debug_build.py)."""


def compile_args(debug: bool) -> list[str]:
    return ["-O0", "-g3"] if debug else ["-O2"]


def directives(debug: bool) -> dict:
    """Set here for every module, never in a .pyx header (a header would win
    over these, and SPOA_DEBUG_BUILD would check nothing): the release build
    indexes without checks, the debug build checks every index."""
    return {"language_level": "3", "embedsignature": True, "boundscheck": debug, "wraparound": debug}
