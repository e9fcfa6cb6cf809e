"""A held connection's whole state as one fixed-size blob: what a successor needs to go on.

The blob of a table row is the row of a numpy structured array whose fields are
- the LeaseTable columns a lease and its history depend on (ROW_COLUMNS: deadline, last
  cumulative total, lease and its source, volume not yet forecast, ...), plus the row's
  frontend as an index into its slot's list of frontend names (the traffic class is
  server node + frontend, the node id is in the field name);
- every per-row array of the table's parts (forecaster, lease policy, rolling history,
  and the parts they hold, such as the activity policy's ring of silences): found as the
  numpy arrays whose first dimension is the table's capacity, the convention their
  `resize` keeps. So the forecasters' and policies' state persists without each of them
  declaring it, and a new forecaster's state is included the day it exists.

The layout (field names, dtypes, shapes) is written next to the rows; a loader whose
layout differs (another forecaster, another history length) refuses those rows, counted,
instead of reading them wrongly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# LeaseTable columns a successor needs (born, refreshed and position are this process's own).
ROW_COLUMNS = ("expires", "refreshed_at", "last_total", "volume", "elapsed", "lease", "source", "level", "flagged")
TABLE_PARTS = ("forecaster", "policy", "history")


def _part_arrays(name: str, part: Any, capacity: int, found: list) -> None:
    """(name.attr, array) of each per-row array of `part`, and of the parts it holds."""
    for attr, value in sorted(vars(part).items()):
        if isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == capacity:
            found.append((f"{name}.{attr}", part, attr))
        elif hasattr(value, "resize") and getattr(value, "capacity", None) == capacity:
            _part_arrays(f"{name}.{attr}", value, capacity, found)


class RowCodec:
    """Table rows to blobs and back, for one LeaseTable (its arrays are read at each call:
    they are replaced when the table grows)."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def _fields(self) -> list[tuple[str, Any, str]]:
        table = self.table
        fields = [(f"table.{column}", table, column) for column in ROW_COLUMNS]
        for name in TABLE_PARTS:
            part = getattr(table, name, None)
            if part is not None:
                _part_arrays(name, part, table.capacity, fields)
        return fields

    def dtype(self) -> np.dtype:
        columns = [(name, getattr(owner, attr).dtype, getattr(owner, attr).shape[1:])
                   for name, owner, attr in self._fields()]
        return np.dtype([("frontend", np.uint32)] + columns)

    def layout(self) -> bytes:
        """What a blob holds, as text: equal layouts read each other's blobs."""
        return repr(self.dtype().descr).encode()

    def pack(self, rows: np.ndarray, frontends: np.ndarray) -> tuple[bytes, int]:
        """The blobs of `rows` back to back (itemsize bytes each), and that itemsize;
        `frontends`: each row's index into its slot's frontend names."""
        packed = np.empty(len(rows), self.dtype())
        for name, owner, attr in self._fields():
            packed[name] = getattr(owner, attr)[rows]
        packed["frontend"] = frontends
        return packed.tobytes(), packed.dtype.itemsize

    def unpack(self, blobs: bytes) -> np.ndarray:
        """Blobs back to back (as pack gives them) as a structured array."""
        return np.frombuffer(blobs, self.dtype())

    def restore(self, rows: np.ndarray, packed: np.ndarray) -> None:
        """Each row of the table (and of its parts) set from its unpacked blob."""
        for name, owner, attr in self._fields():
            getattr(owner, attr)[rows] = packed[name]
