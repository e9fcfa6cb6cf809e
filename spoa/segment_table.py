"""Per-segment state at the LB node: the last report of every segment of the
held connections and a bounded ring of its bytes per interval (the rolling
per-segment history), in numpy arrays indexed by segment slot. Its rates
feed the anomaly detector; LeaseTable (spoa/lbnode.py) owns one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .forecast import History
from .slotmap import REFUSED, SlotMap


class SegmentTable:
    """Per-segment state of the held connections, keyed by (connection slot,
    direction, start_byte_offset), in numpy arrays indexed by segment slot.

    Each refresh of a connection carries its whole granularity array, which
    becomes the connection's segment set: a start offset seen for the first
    time gets a fresh slot; one the array no longer has (the agent merged or
    re-split it) is stale from that moment and its slot is reclaimed at the
    next end_interval, as are the segments of released connections. A stale
    key that comes back before then restarts fresh in its old slot.

    Per interval it sums each segment's bytes_transferred and pushes the sum
    into a bounded ring (History, `history` intervals) of each segment
    refreshed in it. At most `capacity` segments are held: beyond, new
    segments are not tracked and counted in `refused`.
    """

    def __init__(self, capacity: int, conn_capacity: int, history: int = 8) -> None:
        self.capacity = capacity
        self.keys = SlotMap(capacity)  # (connection slot x 2 + direction, start offset) -> segment slot
        self.owner = np.full(capacity, -1, np.int64)  # connection slot
        self.direction = np.zeros(capacity, np.uint8)  # DIR_IN / DIR_OUT
        self.start = self.keys.key_b[:, 0]  # start_byte_offset (a view of the key)
        self.byte_count = np.zeros(capacity, np.uint64)  # as last reported
        self.level = np.zeros(capacity, np.int8)  # granularity level, as last reported
        self.last_activity = np.zeros(capacity, np.uint64)  # unix ms of its last byte (0: never)
        self.transferred = np.zeros(capacity, np.float64)  # bytes reported during this interval
        self.refreshed = np.zeros(capacity, bool)  # reported during this interval
        self.seen = np.full(capacity, -1, np.int64)  # update (epoch) that last reported it
        self.history = History(capacity, history, np.float32)  # bytes per interval, the last `history`
        # connection slot -> epoch of its last update (-1: released): a segment
        # is live while its `seen` equals its owner's epoch
        self.conn_epoch = np.full(conn_capacity, -1, np.int64)
        self.epoch = 0
        self.refused = 0  # segments not tracked: table full
        self.dropped = 0  # segment slots reclaimed (merged away, or their connection released)

    def __len__(self) -> int:
        return len(self.keys)

    def update(self, conns: np.ndarray, owner: np.ndarray, rows: np.ndarray | slice, batch: Any) -> None:
        """Connections `conns` (distinct slots) were refreshed with the segments
        `rows` (slice(None): all) of the batch's segment columns, owned by the
        slots `owner`."""
        self.epoch += 1
        direction = batch.direction[rows]
        start = batch.start_byte_offset[rows]
        key_b = np.zeros((len(start), 2), np.uint64)
        key_b[:, 0] = start
        key_a = owner.astype(np.uint64) * 2 + direction
        segs, fresh = self.keys.resolve(key_a, key_b)
        if (segs == REFUSED).any():
            self.sweep()  # make room from stale segments first
            segs, fresh = self.keys.resolve(key_a, key_b)
        kept = segs >= 0
        self.refused += len(segs) - int(np.count_nonzero(kept))
        if not kept.all():
            rows = np.arange(len(kept))[rows][kept] if isinstance(rows, slice) else rows[kept]
            segs, fresh, owner, direction = segs[kept], fresh[kept], owner[kept], direction[kept]
        restart = segs[fresh | (self.seen[segs] != self.conn_epoch[owner])]
        if len(restart):
            self.history.reset(restart)
            self.transferred[restart] = 0.0
        self.owner[segs] = owner
        self.direction[segs] = direction
        self.byte_count[segs] = batch.byte_count[rows]
        self.level[segs] = batch.level[rows]
        self.last_activity[segs] = batch.timestamp_last_activity_ms[rows]
        np.add.at(self.transferred, segs, batch.bytes_transferred[rows].astype(np.float64))
        self.refreshed[segs] = True
        self.seen[segs] = self.epoch
        self.conn_epoch[conns] = self.epoch

    def release_connections(self, conns: np.ndarray) -> None:
        """Their segments go stale (reclaimed by the next sweep)."""
        self.conn_epoch[conns] = -1

    def sweep(self) -> None:
        """Reclaim the slots of stale segments."""
        live = np.flatnonzero(self.keys.in_use)
        stale = live[self.seen[live] != self.conn_epoch[self.owner[live]]]
        if len(stale):
            self.keys.release(stale)
            self.owner[stale] = -1
            self.refreshed[stale] = False
            self.dropped += len(stale)

    def end_interval(self) -> tuple[np.ndarray, np.ndarray]:
        """(segments reported this interval, their bytes in it); pushed into the history."""
        self.sweep()
        segs = np.flatnonzero(self.refreshed)
        rates = self.transferred[segs]
        self.history.push(segs, rates)
        self.transferred[segs] = 0.0
        self.refreshed[segs] = False
        return segs, rates

    def of_connection(self, conn: int) -> np.ndarray:
        """Live segment slots of one connection, in (direction, start) order (debug, tests)."""
        segs = np.flatnonzero(self.keys.in_use & (self.owner == conn))
        segs = segs[self.seen[segs] == self.conn_epoch[conn]]
        return segs[np.lexsort((self.start[segs], self.direction[segs]))]
