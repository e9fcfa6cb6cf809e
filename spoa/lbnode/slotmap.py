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

__all__ = ["IMPLEMENTATION", "MISSING", "REFUSED", "SlotMap", "doubled_capacity"]


def doubled_capacity(capacity: int, needed: int, bound: int) -> int:
    """The size a table of `capacity` slots grows to for `needed`: doubled
    until it fits, never past `bound` (the tables built on SlotMap grow so)."""
    while capacity < needed:
        capacity *= 2
    return min(capacity, bound)
