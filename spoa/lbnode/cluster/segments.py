"""A held connection's segments as fixed-size records: the per-segment state a successor needs.

Next to each blob of connection records (rows.py) the writer stores the segment records of
the same connections (field `g:N` next to chunk `c:N`, `g:base` next to `base`): per segment
of each connection its key in SegmentHistory (direction, start_byte_offset), its last report
(byte_count, level, timestamp_last_activity) and its rolling history (the ring of bytes per
interval the anomaly detector reads: whole in `g:base`, its last cells in a chunk's delta
records, deltas.py). A connection's records in a blob carry its whole segment set (a record's
granularity array is whole), so a loader takes each connection's segments from the blob that
holds its last record (`latest_segments`), each one's ring rebuilt from its records in that
blob and before.

The segment set itself would come back with the connection's next record at its new owner;
what only the store can give back is the history: without it an adopted connection's
segments would start their rates from nothing, as new ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...wire.slots import CONN_KEY_BYTES
from .deltas import Ring, delta_dtype, last_cells, replay

SEG_BASE_FIELD = b"g:base"
SEG_CHUNK_PREFIX = b"g:"


def segment_field(chunk: bytes) -> bytes:
    """The segments' field next to a chunk field `c:N` (or the base)."""
    return SEG_BASE_FIELD if chunk == b"base" else SEG_CHUNK_PREFIX + chunk.partition(b":")[2]


class SegmentCodec:
    """SegmentHistory segments to records (key of the connection, the segment's state) and back."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self._dtypes: tuple[int, np.dtype, np.dtype, bytes] | None = None  # (ring length, dtypes, layout)

    def dtype(self) -> np.dtype:
        return self._cached()[1]

    def delta_dtype(self) -> np.dtype:
        return self._cached()[2]

    def layout(self) -> bytes:
        return self._cached()[3]

    def _cached(self) -> tuple[int, np.dtype, np.dtype, bytes]:
        length = self.table.segments.history.length
        if self._dtypes is None or self._dtypes[0] != length:
            dtype = self._make_dtype()
            self._dtypes = (length, dtype, delta_dtype(dtype, [self.ring()]), repr(dtype.descr).encode())
        return self._dtypes

    def _make_dtype(self) -> np.dtype:
        history = self.table.segments.history
        return np.dtype([("key", f"V{CONN_KEY_BYTES}"), ("direction", np.uint8), ("start", np.uint64),
                         ("byte_count", np.uint64), ("level", np.int8), ("last_activity", np.uint64),
                         ("ring", history.dtype, (history.length,)), ("pos", np.int32), ("count", np.int32)])

    def ring(self) -> Ring:
        return Ring("ring", "last", "pos", "count", self.table.segments.history.length)

    def pack(self, rows: np.ndarray, keys: np.ndarray, slots: np.ndarray,
             delta: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(the records of the live segments of table `rows`, each record's slot), grouped by
        slot; keys: uint8[n, 24], the rows' connection keys; slots: the rows' slots. A loader
        finds a connection's segments by its key, so only the grouping by slot matters (each
        slot's records are one view): the segment indexes are ordered by their slot as uint16
        (numpy's stable sort of 16-bit integers is a radix sort, linear) before the records are
        made, and nothing moves the records again. With `delta`, each ring's last cells only
        (a chunk's records, deltas.py)."""
        segments = self.table.segments
        live = np.flatnonzero(segments.keys.in_use)
        live = live[segments.seen[live] == segments.conn_epoch[segments.owner[live]]]
        position = np.full(self.table.capacity, -1, np.int64)
        position[rows] = np.arange(len(rows))
        which = position[segments.owner[live]]
        segs, which = live[which >= 0], which[which >= 0]
        order = np.argsort(slots[which].astype(np.uint16), kind="stable")
        segs, which = segs[order], which[order]
        packed = np.empty(len(segs), self.delta_dtype() if delta else self.dtype())
        packed["key"] = keys.view(f"V{CONN_KEY_BYTES}").reshape(-1)[which]
        history = segments.history
        # each field gathered, then written into the records (see RowCodec.pack)
        for name, source in (("direction", segments.direction), ("start", segments.start),
                             ("byte_count", segments.byte_count), ("level", segments.level),
                             ("last_activity", segments.last_activity), ("pos", history.pos),
                             ("count", history.count)) + (() if delta else (("ring", history.buf),)):
            packed[name] = source[segs]
        if delta:
            last_cells(history.buf, history.pos, segs, packed["last"])
        return packed, slots[which]

    def unpack(self, blob: bytes, delta: bool = False) -> np.ndarray:
        return np.frombuffer(blob, self.delta_dtype() if delta else self.dtype())

    def restore(self, rows: np.ndarray, keys: np.ndarray, packed: np.ndarray) -> int:
        """The segments of adopted connections (`rows` of the table, their keys V24) set from
        their records; how many were taken (a full segment history refuses the rest, counted
        in its `refused`)."""
        if not len(packed) or not len(rows):
            return 0
        row_of = dict(zip(keys.tolist(), rows.tolist()))
        owner = np.fromiter((row_of.get(k, -1) for k in packed["key"].tolist()), np.int64, len(packed))
        packed, owner = packed[owner >= 0], owner[owner >= 0]
        return self.table.segments.adopt(owner, packed)


def _segment_keys(records: np.ndarray) -> np.ndarray:
    """Each record's segment identity (connection key, direction, start) as one void."""
    raw = np.empty((len(records), CONN_KEY_BYTES + 9), np.uint8)
    raw[:, :CONN_KEY_BYTES] = np.ascontiguousarray(records["key"]).view(np.uint8).reshape(-1, CONN_KEY_BYTES)
    raw[:, CONN_KEY_BYTES] = records["direction"]
    raw[:, CONN_KEY_BYTES + 1:] = records["start"].astype("<u8").view(np.uint8).reshape(-1, 8)
    return raw.view(f"V{CONN_KEY_BYTES + 9}").reshape(-1)


def latest_segments(row_blob_of: dict[bytes, int], base: np.ndarray, deltas: np.ndarray, base_sizes: list[int],
                    chunk_sizes: list[int], ring: Ring) -> tuple[np.ndarray, int]:
    """Of segment records stored next to row records (`base`: bases' whole records, then
    `deltas`: chunks' delta records in the order written; blob i holding `(base_sizes +
    chunk_sizes)[i]` records, the numbering of the row blobs), each connection's segments from
    the blob that holds its last row record (`row_blob_of`: connection key -> that blob), each
    with its state from its last record there and its ring rebuilt (deltas.replay); and how
    many records could not continue their rings exactly."""
    records, last, inexact = replay(base, deltas, _segment_keys(base), _segment_keys(deltas), [ring]) \
        if len(deltas) else (base, np.arange(len(base)), 0)
    blob_of = np.repeat(np.arange(len(base_sizes) + len(chunk_sizes)), base_sizes + chunk_sizes)[last]
    kept = np.fromiter((row_blob_of.get(k) == b for k, b in zip(records["key"].tolist(), blob_of.tolist())),
                       bool, len(records))
    return records[kept], inexact
