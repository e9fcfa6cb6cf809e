"""A held connection's whole state as one fixed-size record: what a successor needs to go on.

A record is a row of a numpy structured array: the connection's key (server node id and
conn_id, 24 bytes), a deletion flag, and
- the LeaseTable columns a lease and its history depend on (ROW_COLUMNS: deadline, last
  cumulative total, lease and its source, volume not yet forecast, ...), plus the row's
  frontend as an index into its slot's list of frontend names (the traffic class is
  server node + frontend, the node id is in the field name);
- every per-row array of the table's parts (forecaster, lease policy, rolling history,
  and the parts they hold, such as the activity policy's ring of silences): found as the
  numpy arrays whose first dimension is the table's capacity, the convention their
  `resize` keeps. So the forecasters' and policies' state persists without each of them
  declaring it, and a new forecaster's state is included the day it exists.

Records of many connections are stored back to back as one blob (writer.py): a slot's
state is its base blob (whole records) then its chunks (delta records: each history ring's
last cells instead of the whole ring, deltas.py), applied in order (`deltas.replay`: each
connection's last record counts, its rings rebuilt, a deletion removes it). The layout (field
names, dtypes, shapes, the delta format) is written next to them; a loader whose layout differs
(another forecaster, another history length, another format) refuses the slot, counted,
instead of reading it wrongly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..forecast import History
from ...wire.slots import CONN_KEY_BYTES
from .deltas import Ring, delta_dtype, last_cells, replay

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
    """Table rows to records (numpy structured rows: the connection's key, a deletion flag, its
    frontend index, its state) and back, for one LeaseTable (its arrays are read at each call:
    they are replaced when the table grows)."""

    def __init__(self, table: Any) -> None:
        self.table = table
        # (capacity, fields, dtype, rings, delta dtype, layout): found again only when the table grew
        # (its parts may have replaced their arrays, never their set of arrays otherwise); every
        # write reads them
        self._cached: tuple[int, list, np.dtype, list[Ring], np.dtype, bytes] | None = None

    def _fields(self) -> list[tuple[str, Any, str]]:
        return self._layout()[0]

    def dtype(self) -> np.dtype:
        return self._layout()[1]

    def rings(self) -> list[Ring]:
        """The history rings among the fields (forecast.History parts: whole in a base, their
        last cells in a delta)."""
        return self._cached_layout()[3]

    def delta_dtype(self) -> np.dtype:
        return self._cached_layout()[4]

    def _layout(self) -> tuple[list[tuple[str, Any, str]], np.dtype]:
        cached = self._cached_layout()
        return cached[1], cached[2]

    def _cached_layout(self) -> tuple[int, list, np.dtype, list[Ring], np.dtype, bytes]:
        table = self.table
        if self._cached is None or self._cached[0] != table.capacity:
            fields = [(f"table.{column}", table, column) for column in ROW_COLUMNS]
            for name in TABLE_PARTS:
                part = getattr(table, name, None)
                if part is not None:
                    _part_arrays(name, part, table.capacity, fields)
            columns = [(name, getattr(owner, attr).dtype, getattr(owner, attr).shape[1:]) for name, owner, attr in fields]
            # key: server node id (u64 LE) + conn_id; gone: 1 in a deletion (the connection ended)
            dtype = np.dtype([("key", f"V{CONN_KEY_BYTES}"), ("gone", np.uint8), ("frontend", np.uint32)] + columns)
            rings = [Ring(f"{name[:-4]}.buf", f"{name[:-4]}.last", f"{name[:-4]}.pos", f"{name[:-4]}.count",
                          owner.length) for name, owner, attr in fields if attr == "buf" and isinstance(owner, History)]
            self._cached = (table.capacity, fields, dtype, rings, delta_dtype(dtype, rings), repr(dtype.descr).encode())
        return self._cached

    def layout(self) -> bytes:
        """What a record holds, as text: equal layouts read each other's records."""
        return self._cached_layout()[5]

    def pack(self, rows: np.ndarray, keys: np.ndarray, frontends: np.ndarray, delta: bool = False) -> np.ndarray:
        """The records of `rows` (keys: uint8[n, 24]; frontends: each row's index into its
        slot's frontend names), in the order of `rows`: callers order rows first (by slot), so
        the records, the widest arrays here, are written once and never moved. Whole records,
        or with `delta` each ring's last cells only (a chunk's, deltas.py)."""
        _capacity, fields, dtype, rings, deltas, _layout = self._cached_layout()
        packed = np.empty(len(rows), deltas if delta else dtype)
        last = {ring.buf: ring.last for ring in rings} if delta else {}
        for name, owner, attr in fields:
            if name in last:
                last_cells(owner.buf, owner.pos, rows, packed[last[name]])
                continue
            # gathered, then written into the record's field: np.take straight into the strided
            # field (`out=`) measured 1.4x slower here (numpy's take copies item by item into a
            # strided out; the fancy index gathers contiguously)
            packed[name] = getattr(owner, attr)[rows]
        packed["key"] = keys.view(f"V{CONN_KEY_BYTES}").reshape(-1)
        packed["gone"] = 0
        packed["frontend"] = frontends
        return packed

    def deletions(self, keys: np.ndarray) -> np.ndarray:
        """Records saying these connections ended (keys: uint8[n, 24]), in a chunk's format."""
        packed = np.zeros(len(keys), self.delta_dtype())
        packed["key"] = keys.view(f"V{CONN_KEY_BYTES}").reshape(-1)
        packed["gone"] = 1
        return packed

    def unpack(self, blobs: bytes, delta: bool = False) -> np.ndarray:
        """Records back to back (as `pack(...).tobytes()` gives them) as a structured array."""
        return np.frombuffer(blobs, self.delta_dtype() if delta else self.dtype())

    def restore(self, rows: np.ndarray, packed: np.ndarray) -> None:
        """Each row of the table (and of its parts) set from its record."""
        for name, owner, attr in self._fields():
            getattr(owner, attr)[rows] = packed[name]


def record_keys(records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (server node ids uint64[n], conn_ids V16[n]) of records."""
    raw = np.ascontiguousarray(records["key"]).view(np.uint8).reshape(len(records), CONN_KEY_BYTES)
    return raw[:, :8].copy().view("<u8").reshape(-1).astype(np.uint64), raw[:, 8:].copy().view("V16").reshape(-1)


def latest(base: np.ndarray, deltas: np.ndarray, rings: list[Ring]) -> tuple[np.ndarray, np.ndarray, int]:
    """Of a slot's records in the order written (its base's whole records, then its chunks'
    delta records), each connection's state (`deltas.replay`: from its last record, rings
    rebuilt), deletions dropped; the index in base + deltas of each one's last record; how
    many records could not continue their rings exactly."""
    if not len(deltas):  # a base alone: one whole record per connection, none deleted
        return base, np.arange(len(base)), 0
    records, last, inexact = replay(base, deltas, base["key"], deltas["key"], rings)
    kept = records["gone"] == 0
    return records[kept], last[kept], inexact
