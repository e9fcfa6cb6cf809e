"""The lease answer (handler of the lease-* SPOE messages): the compiled one, or its
pure-Python twin (see spoa._accel)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._accel import load
from . import _lease_answer_py

if TYPE_CHECKING:
    IMPLEMENTATION = "python"
else:
    _impl, IMPLEMENTATION = load("servernode._lease_answer", "servernode._lease_answer_py")
    if IMPLEMENTATION == "cython":
        from ._tracker import SegmentTracker as _CompiledTracker  # importable: _lease_answer cimports it


def lease_answer(tracker: Any, settings: Any, spoe_counters: Any = None) -> Any:
    """The answer for tracker: the compiled one reads the compiled tracker's slab, so a
    pure-Python tracker (a twin under test) gets the pure-Python answer."""
    if IMPLEMENTATION == "cython" and type(tracker) is _CompiledTracker:
        return _impl.LeaseAnswer(tracker, settings, spoe_counters)
    return _lease_answer_py.LeaseAnswer(tracker, settings, spoe_counters)


__all__ = ["IMPLEMENTATION", "lease_answer"]
