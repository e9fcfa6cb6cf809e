"""Key -> slot allocator: the compiled core, or its pure-Python twin (see spoa._accel)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._accel import load

if TYPE_CHECKING:
    from ._slotmap_py import MISSING, REFUSED, SlotMap

    IMPLEMENTATION = "python"
else:
    _impl, IMPLEMENTATION = load("lbnode._slotmap", "lbnode._slotmap_py")
    SlotMap = _impl.SlotMap
    MISSING = _impl.MISSING  # lookup: the key holds no slot
    REFUSED = _impl.REFUSED  # resolve: no free slot left

__all__ = ["IMPLEMENTATION", "MISSING", "REFUSED", "SlotMap"]
