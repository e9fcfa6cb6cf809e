"""Per-segment state at the LB node: the last report of every segment of the
held connections and a bounded ring of its bytes per interval (the rolling
per-segment history), in numpy arrays indexed by segment slot. Its rates
feed the anomaly detector; LeaseTable (spoa/lbnode/node.py) owns one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .forecast import History
from .slotmap import REFUSED, SlotMap, doubled_capacity


# Segment slots a history starts with; it doubles from there up to its bound.
INITIAL_SEGMENTS = 2048

# The per-segment arrays: (name, dtype, value of a fresh slot).
_PER_SEGMENT = (
    ("owner", np.int64, -1),  # connection slot
    ("direction", np.uint8, 0),  # DIR_IN / DIR_OUT
    ("byte_count", np.uint64, 0),  # as last reported
    ("level", np.int8, 0),  # granularity level, as last reported
    ("last_activity", np.uint64, 0),  # unix ms of its last byte (0: never)
    ("transferred", np.float64, 0.0),  # bytes reported during this interval
    ("refreshed", bool, False),  # reported during this interval
    ("seen", np.int64, -1),  # update (epoch) that last reported it
)


class SegmentHistory:
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
    refreshed in it. At most `capacity` segments are held (the arrays grow
    to it as segments arrive): beyond, new segments are not tracked and
    counted in `refused`.
    """

    def __init__(self, capacity: int, conn_capacity: int = 0, history: int = 8) -> None:
        # At most `capacity` segments; the arrays start small and double as
        # segments arrive (the connection side grows with the LeaseTable).
        self.max_capacity = capacity
        self.capacity = 0
        self.keys = SlotMap(1)  # (connection slot x 2 + direction, start offset) -> segment slot
        for name, dtype, _fresh in _PER_SEGMENT:
            setattr(self, name, np.zeros(0, dtype))
        self.history = History(0, history, np.float32)  # bytes per interval, the last `history`
        # connection slot -> epoch of its last update (-1: released): a segment
        # is live while its `seen` equals its owner's epoch
        self.conn_epoch = np.full(0, -1, np.int64)
        self.epoch = 0
        self.refused = 0  # segments not tracked: table full
        self.dropped = 0  # segment slots reclaimed (merged away, or their connection released)
        self.grow(min(capacity, INITIAL_SEGMENTS))
        self.grow_connections(conn_capacity)

    def grow(self, capacity: int) -> None:
        """Every per-segment array to `capacity` slots; held segments keep their state."""
        old = self.capacity
        self.keys.grow(capacity)
        self.start = self.keys.key_b[:, 0]  # start_byte_offset (a view of the key)
        for name, dtype, fresh in _PER_SEGMENT:
            grown = np.full(capacity, fresh, dtype)
            grown[:old] = getattr(self, name)
            setattr(self, name, grown)
        self.history.resize(capacity)
        self.capacity = capacity

    def grow_connections(self, conn_capacity: int) -> None:
        """Room for connection slots up to `conn_capacity` (the LeaseTable grew)."""
        old = len(self.conn_epoch)
        if conn_capacity > old:
            grown = np.full(conn_capacity, -1, np.int64)
            grown[:old] = self.conn_epoch
            self.conn_epoch = grown

    def __len__(self) -> int:
        return len(self.keys)

    def update(self, conns: np.ndarray, owner: np.ndarray, rows: np.ndarray | slice, batch: Any) -> None:
        """Connections `conns` (distinct slots) were refreshed with the segments
        `rows` (slice(None): all) of the batch's segment columns, owned by the
        slots `owner`."""
        self.epoch += 1
        direction = batch.direction[rows]
        segs, fresh, kept = self._resolve(owner, direction, batch.start_byte_offset[rows])
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

    def _resolve(self, owner: np.ndarray, direction: np.ndarray, start: np.ndarray) -> tuple:
        """(segment slots, which are fresh, which were given a slot) of the segments keyed
        (owner connection slot, direction, start offset); room is made from stale segments
        first, then by growing; what still finds none is counted in `refused`."""
        key_b = np.zeros((len(start), 2), np.uint64)
        key_b[:, 0] = start
        key_a = owner.astype(np.uint64) * 2 + direction
        segs, fresh = self.keys.resolve(key_a, key_b)
        if (segs == REFUSED).any():
            self.sweep()
            needed = len(self.keys) + int(np.count_nonzero(segs == REFUSED))
            if needed > self.capacity < self.max_capacity:
                self.grow(doubled_capacity(self.capacity, needed, self.max_capacity))
            segs, fresh = self.keys.resolve(key_a, key_b)
        kept = segs >= 0
        self.refused += len(segs) - int(np.count_nonzero(kept))
        return segs, fresh, kept

    def adopt(self, conns: np.ndarray, stored: np.ndarray) -> int:
        """Segments of connections adopted from the store (spoa/lbnode/cluster/segments.py):
        connection slot `conns[i]` gets segment `stored[i]` (its direction, start, last report
        and history ring), live as if its last update had just come, so the connection's next
        record continues each segment's history instead of restarting it. How many were taken;
        beyond `capacity` the rest are counted in `refused`."""
        if not len(conns):
            return 0
        self.epoch += 1
        segs, _fresh, kept = self._resolve(conns, stored["direction"], stored["start"])
        segs, conns, stored = segs[kept], conns[kept], stored[kept]
        self.owner[segs] = conns
        for name in ("direction", "byte_count", "level", "last_activity"):
            getattr(self, name)[segs] = stored[name]
        self.transferred[segs] = 0.0
        self.refreshed[segs] = False
        self.history.buf[segs], self.history.pos[segs], self.history.count[segs] = (
            stored["ring"], stored["pos"], stored["count"])
        self.seen[segs] = self.epoch
        self.conn_epoch[conns] = self.epoch
        return len(segs)

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
