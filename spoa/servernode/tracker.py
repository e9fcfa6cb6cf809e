"""The segment tracker: the compiled core, or its pure-Python twin (see spoa._accel)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._accel import load

if TYPE_CHECKING:
    from ._tracker_py import KEY_MAX, SegmentTracker

    IMPLEMENTATION = "python"
else:
    _impl, IMPLEMENTATION = load("servernode._tracker", "servernode._tracker_py")
    SegmentTracker = _impl.SegmentTracker
    KEY_MAX = _impl.KEY_MAX  # longest key in bytes (records.pack_key gives 36)

__all__ = ["IMPLEMENTATION", "KEY_MAX", "SegmentTracker"]
