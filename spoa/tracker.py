"""The segment tracker: the compiled core, or its pure-Python twin.

Same switch as spoa.codec: SPOA_NO_EXTENSIONS=1 forces the twin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .codec import NO_EXTENSIONS

if TYPE_CHECKING or NO_EXTENSIONS:
    from ._tracker_py import SegmentTracker

    IMPLEMENTATION = "python"
else:
    try:
        from ._tracker import SegmentTracker

        IMPLEMENTATION = "cython"
    except ImportError:  # pragma: no cover - the loaded-module test fails in CI
        from ._tracker_py import SegmentTracker

        IMPLEMENTATION = "python"

__all__ = ["IMPLEMENTATION", "SegmentTracker"]
