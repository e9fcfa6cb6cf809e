"""A held connection's segments as fixed-size records: the per-segment state a successor needs.

Next to each blob of connection records (rows.py) the writer stores the segment records of
the same connections (field `g:N` next to chunk `c:N`, `g:base` next to `base`): per segment
of each connection its key in SegmentHistory (direction, start_byte_offset), its last report
(byte_count, level, timestamp_last_activity) and its rolling history (the ring of bytes per
interval the anomaly detector reads). A connection's records in a blob carry its whole
segment set (a record's granularity array is whole), so a loader takes each connection's
segments from the blob that holds its last record (`latest_segments`), and nothing older.

The segment set itself would come back with the connection's next record at its new owner;
what only the store can give back is the history: without it an adopted connection's
segments would start their rates from nothing, as new ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...wire.slots import CONN_KEY_BYTES

SEG_BASE_FIELD = b"g:base"
SEG_CHUNK_PREFIX = b"g:"


def segment_field(chunk: bytes) -> bytes:
    """The segments' field next to a chunk field `c:N` (or the base)."""
    return SEG_BASE_FIELD if chunk == b"base" else SEG_CHUNK_PREFIX + chunk.partition(b":")[2]


class SegmentCodec:
    """SegmentHistory segments to records (key of the connection, the segment's state) and back."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def dtype(self) -> np.dtype:
        history = self.table.segments.history
        return np.dtype([("key", f"V{CONN_KEY_BYTES}"), ("direction", np.uint8), ("start", np.uint64),
                         ("byte_count", np.uint64), ("level", np.int8), ("last_activity", np.uint64),
                         ("ring", history.dtype, (history.length,)), ("pos", np.int32), ("count", np.int32)])

    def layout(self) -> bytes:
        return repr(self.dtype().descr).encode()

    def pack(self, rows: np.ndarray, keys: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the records of the live segments of table `rows`, each record's slot), grouped by
        slot; keys: uint8[n, 24], the rows' connection keys; slots: the rows' slots. A loader
        finds a connection's segments by its key, so only the grouping by slot matters (each
        slot's records are one view): the segment indexes are ordered by their slot as uint16
        (numpy's stable sort of 16-bit integers is a radix sort, linear) before the records are
        made, and nothing moves the records again."""
        segments = self.table.segments
        live = np.flatnonzero(segments.keys.in_use)
        live = live[segments.seen[live] == segments.conn_epoch[segments.owner[live]]]
        position = np.full(self.table.capacity, -1, np.int64)
        position[rows] = np.arange(len(rows))
        which = position[segments.owner[live]]
        segs, which = live[which >= 0], which[which >= 0]
        order = np.argsort(slots[which].astype(np.uint16), kind="stable")
        segs, which = segs[order], which[order]
        packed = np.empty(len(segs), self.dtype())
        np.take(keys.view(f"V{CONN_KEY_BYTES}").reshape(-1), which, out=packed["key"], mode="clip")
        history = segments.history
        # each field gathered straight into the records (see RowCodec.pack)
        for name, source in (("direction", segments.direction), ("start", segments.start),
                             ("byte_count", segments.byte_count), ("level", segments.level),
                             ("last_activity", segments.last_activity), ("ring", history.buf),
                             ("pos", history.pos), ("count", history.count)):
            np.take(source, segs, axis=0, out=packed[name], mode="clip")
        return packed, slots[which]

    def unpack(self, blob: bytes) -> np.ndarray:
        return np.frombuffer(blob, self.dtype())

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


def latest_segments(row_blobs: list[np.ndarray], segment_blobs: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """Of segment records stored next to row records (blob i's segments next to its rows, in
    the order written), each connection's from the blob that holds its last row record."""
    last: dict[bytes, int] = {}
    for i, records in enumerate(row_blobs):
        for key in records["key"].tolist():
            last[key] = i
    kept = [segs[np.fromiter((last.get(k) == i for k in segs["key"].tolist()), bool, len(segs))]
            for i, segs in enumerate(segment_blobs) if len(segs)]
    return np.concatenate(kept) if kept else np.empty(0, dtype)
