"""The LB node: connection state held under leases, predicted lease durations.

Publishing packets refresh each connection's state; state not refreshed
before its lease ends is dropped (counted `expired`). A refresh for a
connection dropped that way while it was still alive is a *premature expiry*,
the quality metric: the lease was too short.

Per interval, for the connections refreshed in it (all vectorized over
slots): the volume since the previous refresh, normalised per interval,
feeds the forecaster; the lease policy turns forecasts (volume policy) or
inter-activity gaps (activity policy) into leases within bounds; each server
node gets hints back (lease, source, granularity, anomaly) on the address
its packets came from.

Cold start: a new connection's first lease is its class's recent mean lease
(class = server node + frontend), else the standard lease.

Records arrive as ColumnBatch columns (spoa.wire.packet, many datagrams per batch)
and are ingested with whole-array operations; the key -> slot maps are
SlotMaps (spoa/lbnode/_slotmap_py.py, compiled in cext/spoa/lbnode/_slotmap.pyx). Each
connection's segments have their own state (SegmentHistory: last report and a
bounded ring of bytes per interval), whose rates feed the anomaly detector.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..netutil import now_ms
from ..wire.forward import encode_forward
from ..wire.hints import ANOMALY, HINT_DTYPE, encode_hints
from ..wire.records import ConnectionRecord, ConnFlags, LeaseSource
from ..wire.stream_transport import DatagramStream
from ..wire.tier_map import encode_tier_map
from .anomaly import class_key
from .segment_history import SegmentHistory
from .slotmap import REFUSED, SlotMap, doubled_capacity


log = logging.getLogger("spoa.lbnode")



@dataclass
class LbNodeStats:
    packets: int = 0
    records: int = 0
    refreshes: int = 0
    new_connections: int = 0
    closed: int = 0
    expired: int = 0
    premature_expiries: int = 0
    refused: int = 0  # no free slot (max_connections)
    hints_sent: int = 0
    hint_datagrams: int = 0
    hint_send_errors: int = 0
    leases: dict = field(default_factory=lambda: {"predicted": 0, "fallback": 0})
    anomalies: int = 0
    forecast_abs_error: float = 0.0  # sum of |forecast - actual| (bytes per interval)
    forecast_samples: int = 0


def columns(node_id: int, records: Sequence[ConnectionRecord]) -> SimpleNamespace:
    """Records of one server node as the ColumnBatch columns LeaseTable reads
    (for callers that hold records: tests, the backtest's reference run)."""
    segs = [seg for rec in records for seg in rec.segments]
    frontends: dict[str, int] = {}
    return SimpleNamespace(
        n=len(records), datagrams=1,
        node_id=np.full(len(records), node_id, np.uint64),
        conn_id=np.array([rec.conn_id for rec in records], "V16").reshape(len(records)),
        flags=np.array([rec.flags for rec in records], np.uint8),
        frontend=np.array([frontends.setdefault(rec.frontend, len(frontends)) for rec in records], np.uint32),
        frontends=list(frontends),
        granularity_level=np.array([rec.granularity_level for rec in records], np.int8),
        bytes_in_total=np.array([rec.bytes_in_total for rec in records], np.uint64),
        bytes_out_total=np.array([rec.bytes_out_total for rec in records], np.uint64),
        seg_start=np.cumsum([0] + [len(rec.segments) for rec in records], dtype=np.int64),
        direction=np.array([seg.direction for seg in segs], np.uint8),
        level=np.array([seg.level for seg in segs], np.int8),
        start_byte_offset=np.array([seg.start_byte_offset for seg in segs], np.uint64),
        byte_count=np.array([seg.byte_count for seg in segs], np.uint64),
        bytes_transferred=np.array([seg.bytes_transferred for seg in segs], np.uint64),
        timestamp_last_activity_ms=np.array([seg.timestamp_last_activity_ms for seg in segs], np.uint64),
    )  # fmt: skip


# Slots a table starts with; it doubles from there up to its bound.
INITIAL_CAPACITY = 1024
# A tier's LB node sends its map to the server nodes every this many intervals (a lost map
# datagram is made good this soon), and in each of the MAP_AFTER_CHANGE intervals after its
# view changed (when a lost one would leave records going to a dead node).
MAP_EVERY_INTERVALS = 4
MAP_AFTER_CHANGE = 3

# The per-connection arrays of a LeaseTable: (name, dtype, value of a fresh slot, what).
_PER_SLOT = (
    ("born", np.int64, 0, "allocation order (expiry walks lapsed slots in it)"),
    ("expires", np.int64, 0, "unix ms the lease ends"),
    ("refreshed_at", np.int64, 0, "unix ms of the last refresh"),
    ("last_total", np.uint64, 0, "bytes in + out at the last refresh"),
    ("volume", np.float64, 0, "bytes since the previous interval's refresh"),
    ("elapsed", np.int64, 1, "intervals those bytes span"),
    ("lease", np.int64, 0, "lease in force, ms"),
    ("source", np.uint8, 0, "LeaseSource of it"),
    ("level", np.int8, 0, "granularity level reported"),
    ("flagged", bool, False, "anomaly"),
    ("class_id", np.int32, 0, "traffic class: server node + frontend"),
    ("refreshed", bool, False, "refreshed during this interval"),
    ("position", np.int64, 0, "scratch: a slot's row in the batch being ingested"),
)


class LeaseTable:
    """Per-connection state in numpy arrays indexed by slot.

    A batch of records (ColumnBatch columns) is ingested with whole-array
    operations: the (server node, conn_id) -> slot lookup is a SlotMap (a C
    hash table), the refresh is a handful of gathers and scatters; Python
    touches each new connection once (its premature-expiry check), and each
    lapsed one at expiry.
    """

    def __init__(self, capacity: int, forecaster: Any, policy: Any, standard_ms: int, interval_ms: int,
                 remember_expired: int = 100_000, anomaly: Any = None, history: Any = None,
                 segments: SegmentHistory | None = None) -> None:
        # At most `capacity` connections; the arrays start small and double
        # as connections arrive, so memory follows what is held.
        self.max_capacity = capacity
        self.capacity = 0
        self.forecaster = forecaster
        self.policy = policy
        self.standard_ms = standard_ms
        self.interval_ms = interval_ms
        self.anomaly = anomaly
        self.history = history  # rolling per-interval volumes per connection (a History ring), or None
        # per-segment state; its rates feed the anomaly detector
        self.segments = segments if segments is not None else SegmentHistory(2 * capacity)
        self.keys = SlotMap(1)  # (server node id, conn_id) -> slot
        for name, dtype, _fresh, _what in _PER_SLOT:
            setattr(self, name, np.zeros(0, dtype))
        self.classes: dict[tuple[int, str], int] = {}  # traffic class -> id
        self.class_names: list[str] = []  # id -> frontend name
        self.class_lease = np.full(0, np.nan)  # id -> EWMA of leases granted (NaN: none yet)
        # expired key -> its last cumulative total (a later refresh is a premature expiry)
        self.recently_expired: OrderedDict[tuple[int, bytes], int] = OrderedDict()
        self.remember_expired = remember_expired
        self.allocations = 0
        # called with the rows of connections ending here (closed, expired) before they are
        # released: the tier deletes their stored state (spoa/lbnode/cluster/writer.py)
        self.on_release: Any = None
        self.stats = LbNodeStats()
        self._grow(min(capacity, INITIAL_CAPACITY))

    def _grow(self, capacity: int) -> None:
        """Every per-connection array (and the forecaster's, the policy's, the
        history's) to `capacity` slots; held slots keep their state."""
        old = self.capacity
        self.keys.grow(capacity)
        self.node = self.keys.key_a  # server node id (where hints go)
        self.conn_id = self.keys.key_b.view("S16").reshape(capacity)  # connection id (what hints name)
        for name, dtype, fresh, _what in _PER_SLOT:
            grown = np.full(capacity, fresh, dtype)
            grown[:old] = getattr(self, name)
            setattr(self, name, grown)
        for part in (self.forecaster, self.policy, self.history):
            resize = getattr(part, "resize", None)
            if resize is not None:
                resize(capacity)
        self.segments.grow_connections(capacity)
        self.capacity = capacity

    def _resolve(self, batch: Any, create: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The batch's slots and which are new; the table doubles (up to its
        bound) when the new ones do not fit, then resolves again."""
        key_b = batch.conn_id.view(np.uint64).reshape(batch.n, 2)
        slots, fresh = self.keys.resolve(batch.node_id, key_b, create)
        refused = int(np.count_nonzero(slots == REFUSED))
        if refused and self.capacity < self.max_capacity:
            self._grow(doubled_capacity(self.capacity, len(self.keys) + refused, self.max_capacity))
            slots, again = self.keys.resolve(batch.node_id, key_b, create)
            fresh |= again  # those created by the first pass come back as known
        return slots, fresh

    def slot(self, node_id: int, conn_id: bytes) -> int | None:
        """The slot holding a connection, or None."""
        key_b = np.frombuffer(conn_id, np.uint64).reshape(1, 2)
        found = int(self.keys.lookup(np.array([node_id], np.uint64), key_b)[0])
        return None if found < 0 else found

    def newest(self, count: int) -> np.ndarray:
        """The `count` most recently allocated live slots, oldest first."""
        live = np.flatnonzero(self.keys.in_use)
        return live[np.argsort(self.born[live], kind="stable")][-count:]

    # -- ingestion ----------------------------------------------------------------------
    def ingest(self, node_id: int, records: Sequence[ConnectionRecord], now: int) -> None:
        """One datagram's records (callers that hold records; the receiver sends batches)."""
        self.ingest_batch(columns(node_id, records), now)

    def ingest_batch(self, batch: Any, now: int) -> None:
        """Every record of a ColumnBatch, as if its datagrams were ingested one
        after the other at `now`. A connection reported more than once in the
        batch is refreshed once per report, in order; its closed report, if
        any, releases it after the batch."""
        stats = self.stats
        stats.packets += batch.datagrams
        n = batch.n
        stats.records += n
        if not n:
            return
        closed = (batch.flags & ConnFlags.CLOSED) != 0
        # a closed report of a connection not held creates nothing
        slots, fresh = self._resolve(batch, ~closed)
        stats.refused += int(np.count_nonzero(slots == REFUSED))
        resumed = self._forget_expired(batch, slots, fresh) if self.recently_expired else {}
        new = np.flatnonzero(fresh)
        if len(new):
            self._allocate(batch, new, slots[new], now, resumed)
        held = np.flatnonzero(slots >= 0)
        rank = self._rank(slots[held])
        if rank is None and len(held) == n:  # the common case: every record, once each
            self._refresh(batch, slice(None), slots, now)
        else:
            for rows in [held] if rank is None else [held[rank == k] for k in range(int(rank.max()) + 1)]:
                self._refresh(batch, rows, slots[rows], now)
        ended = np.unique(slots[held[closed[held]]])
        if len(ended):
            self.policy.closed(ended, self.class_id[ended], now)  # how idle its class's connections close
        self._release(ended)
        stats.closed += len(ended)

    def _forget_expired(self, batch: Any, slots: np.ndarray, fresh: np.ndarray) -> dict[int, int]:
        """Reports of connections not held take them out of recently_expired;
        {slot: last total} of the new connections found there (premature expiries)."""
        rows = np.flatnonzero(fresh | (slots < 0))
        pop = self.recently_expired.pop
        resumed = {}
        for row, key in zip(rows.tolist(), zip(batch.node_id[rows].tolist(), batch.conn_id[rows].tolist())):
            last_total = pop(key, None)
            if last_total is not None and fresh[row]:
                resumed[int(slots[row])] = last_total
        return resumed

    def _rank(self, slots: np.ndarray) -> np.ndarray | None:
        """Each entry's occurrence number among equal slots (0, 1, ...); None when all differ."""
        order = np.arange(len(slots))
        self.position[slots] = order
        if (self.position[slots] == order).all():
            return None
        by_slot = np.argsort(slots, kind="stable")
        ordered = slots[by_slot]
        first = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        rank = np.empty(len(slots), np.int64)
        rank[by_slot] = order - np.repeat(first, np.diff(np.r_[first, len(slots)]))
        return rank

    def _allocate(self, batch: Any, rows: np.ndarray, slots: np.ndarray, now: int, resumed: dict[int, int]) -> None:
        """New connections: their class, first lease, and resumption after a premature expiry."""
        self.born[slots] = self.allocations + np.arange(len(slots))
        self.allocations += len(slots)
        pairs = np.stack([batch.node_id[rows], batch.frontend[rows].astype(np.uint64)], axis=1)
        unique, first, inverse = np.unique(pairs, axis=0, return_index=True, return_inverse=True)
        ids = np.empty(len(unique), np.int32)
        for u in np.argsort(first).tolist():  # classes get their ids in the order they are met
            ids[u] = self.class_of(int(unique[u, 0]), batch.frontends[int(unique[u, 1])])
        self.class_id[slots] = ids[inverse.reshape(-1)]
        self.stats.new_connections += len(slots)
        self._start(slots, now)
        for slot, last_total in resumed.items():
            # A connection back from a premature expiry: only what it moved since
            # its last record is new volume, not its whole cumulative count.
            self.last_total[slot] = last_total
        self.stats.premature_expiries += len(resumed)

    def class_of(self, node_id: int, frontend: str) -> int:
        """The id of a traffic class (server node + frontend), given one when first met."""
        klass = (node_id, frontend)
        cid = self.classes.get(klass)
        if cid is None:
            cid = self.classes[klass] = len(self.class_names)
            self.class_names.append(frontend)
            self.class_lease = np.append(self.class_lease, np.nan)
        return cid

    def adopt(self, node_ids: np.ndarray, conn_ids: np.ndarray, class_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows for connections another LB node held (the tier, spoa/lbnode/cluster: their state
        loaded from the store), and which are new here (REFUSED: no room). A new row gets its
        class and allocation order; the caller restores the rest of its state. Not new
        connections: counted by the caller as adopted."""
        slots, fresh = self._resolve(SimpleNamespace(n=len(node_ids), node_id=node_ids, conn_id=conn_ids),
                                     np.ones(len(node_ids), bool))
        rows = slots[fresh]
        self.born[rows] = self.allocations + np.arange(len(rows))
        self.allocations += len(rows)
        self.class_id[rows] = class_ids[fresh]
        self.refreshed[rows] = False
        return slots, fresh

    def hand_over(self, slots: np.ndarray) -> None:
        """Let go of connections another LB node owns now: released, neither expired nor
        closed, and not reported to on_release (their stored state is the new owner's)."""
        self._release(slots, handed_over=True)

    def _refresh(self, batch: Any, rows: np.ndarray | slice, slots: np.ndarray, now: int) -> None:
        """Records `rows` of the batch (slice(None): all) refresh the distinct `slots`."""
        total = batch.bytes_in_total[rows] + batch.bytes_out_total[rows]
        last = self.last_total[slots]
        # totals are cumulative: the growth since the last record is the volume
        self.volume[slots] += np.where(total >= last, total - last, 0).astype(np.float64)
        self.last_total[slots] = total
        since = now - self.refreshed_at[slots]
        self.elapsed[slots] = np.where(since > 0, np.maximum(1, np.rint(since / self.interval_ms)),
                                       self.elapsed[slots])
        self.refreshed_at[slots] = now
        self.expires[slots] = now + self.lease[slots]
        self.level[slots] = batch.granularity_level[rows]
        self.refreshed[slots] = True
        self.stats.refreshes += len(slots)
        # each record's segment rows, seg_start[row]:seg_start[row + 1], back to back
        if isinstance(rows, slice):
            counts = np.diff(batch.seg_start)
            self.segments.update(slots, np.repeat(slots, counts), rows, batch)
            return
        first = batch.seg_start[rows]
        counts = batch.seg_start[rows + 1] - first
        shift = np.repeat(first - (np.cumsum(counts) - counts), counts)
        self.segments.update(slots, np.repeat(slots, counts), np.arange(len(shift)) + shift, batch)

    def _start(self, slots: np.ndarray, now: int) -> None:
        """First lease of new connections: their class's, else the standard one."""
        prior = self.class_lease[self.class_id[slots]]
        known = np.isfinite(prior)
        self.lease[slots] = np.where(known, np.nan_to_num(prior), self.standard_ms).astype(np.int64)
        self.source[slots] = np.where(known, LeaseSource.PREDICTED, LeaseSource.STANDARD)
        self.last_total[slots] = 0
        self.volume[slots] = 0.0
        self.elapsed[slots] = 1
        self.refreshed_at[slots] = now
        self.flagged[slots] = False
        self.forecaster.reset(slots)
        self.policy.reset(slots, now)
        if self.history is not None:
            self.history.reset(slots)

    def _release(self, slots: np.ndarray, handed_over: bool = False) -> None:
        if self.on_release is not None and not handed_over and len(slots):
            self.on_release(slots)  # while the rows still hold their keys
        self.keys.release(slots)
        self.refreshed[slots] = False
        self.segments.release_connections(slots)

    # -- per interval ----------------------------------------------------------------------
    def end_interval(self, now: int) -> dict[int, np.ndarray]:
        """Forecast, lease and expire; the hints to send (HINT_DTYPE arrays) by server node id."""
        hints: dict[int, np.ndarray] = {}
        segments, segment_rates = self.segments.end_interval()
        slots = np.flatnonzero(self.refreshed)
        if len(slots):
            self.refreshed[slots] = False
            per_interval = self.volume[slots] / self.elapsed[slots]
            self._score(slots, per_interval)
            self.forecaster.update(slots, per_interval)
            if self.history is not None:
                self.history.push(slots, per_interval)
            predicted = self.forecaster.forecast(slots)
            leases, sources = self._leases(slots, per_interval, predicted, now)
            self.lease[slots] = leases
            self.source[slots] = sources
            self.expires[slots] = self.refreshed_at[slots] + leases
            self.volume[slots] = 0.0
            self._flag(slots, segments, segment_rates)
            self._learn_classes(slots, leases)
            predicted_count = int(np.count_nonzero(sources == LeaseSource.PREDICTED))
            self.stats.leases["predicted"] += predicted_count
            self.stats.leases["fallback"] += len(slots) - predicted_count
            hints = self._hints(slots, leases, sources)
        self._expire(now)
        return hints

    def _hints(self, slots: np.ndarray, leases: np.ndarray, sources: np.ndarray) -> dict[int, np.ndarray]:
        entries = np.zeros(len(slots), HINT_DTYPE)
        entries["conn_id"] = self.conn_id[slots]
        entries["lease_ms"] = np.clip(leases, 0, 0xFFFFFFFF)
        entries["source"] = sources
        entries["level"] = self.level[slots]
        entries["flags"] = np.where(self.flagged[slots], ANOMALY, 0)
        nodes = self.node[slots]
        if (nodes == nodes[0]).all():  # the common case: one server node
            return {int(nodes[0]): entries}
        return {int(n): entries[nodes == n] for n in np.unique(nodes)}

    def _leases(self, slots, per_interval, predicted, now):
        classes = self.class_id[slots]
        self.policy.observe(slots, per_interval, now, classes)
        # cold connections (activity policy: no gap seen yet) start from their class's leases
        return self.policy.leases(slots, predicted, self.class_lease[classes], classes, now)

    def _score(self, slots: np.ndarray, actual: np.ndarray) -> None:
        """Forecast error of the previous interval's forecast against what came."""
        previous = self.forecaster.forecast(slots)
        ok = np.isfinite(previous)
        self.stats.forecast_abs_error += float(np.abs(previous[ok] - actual[ok]).sum())
        self.stats.forecast_samples += int(ok.sum())

    def _flag(self, slots: np.ndarray, segments: np.ndarray, rates: np.ndarray) -> None:
        """A connection is anomalous when one of its segments' rate (bytes this
        interval) is above its class's bar: per traffic class (frontend and
        direction) as it stood before this interval, then the rates join it."""
        if self.anomaly is None:
            return
        self.flagged[slots] = False
        owner = self.segments.owner[segments]
        group = self.class_id[owner].astype(np.int64) * 2 + self.segments.direction[segments]
        for g in np.unique(group).tolist():
            members = group == g
            name = class_key(self.class_names[g >> 1], g & 1)
            group_rates = rates[members]
            self.flagged[owner[members][self.anomaly.flag(name, group_rates)]] = True
            self.anomaly.observe(name, group_rates[group_rates > 0])
        self.stats.anomalies += int(np.count_nonzero(self.flagged[slots]))

    def _learn_classes(self, slots: np.ndarray, leases: np.ndarray) -> None:
        """Each class's lease prior: an EWMA (0.1) of its interval mean lease."""
        classes = self.class_id[slots]
        counts = np.bincount(classes, minlength=len(self.class_lease))
        sums = np.bincount(classes, weights=leases, minlength=len(self.class_lease))
        seen = counts > 0
        mean = sums[seen] / counts[seen]
        prior = self.class_lease[seen]
        self.class_lease[seen] = np.where(np.isnan(prior), mean, 0.9 * prior + 0.1 * mean)

    def _expire(self, now: int) -> None:
        live = np.flatnonzero(self.keys.in_use)
        lapsed = live[self.expires[live] < now]
        if not len(lapsed):
            return
        lapsed = lapsed[np.argsort(self.born[lapsed], kind="stable")]  # the oldest is forgotten first
        keys = zip(self.node[lapsed].tolist(), self.keys.key_b[lapsed].view("V16").reshape(-1).tolist())
        for key, last_total in zip(keys, self.last_total[lapsed].tolist()):
            self.recently_expired[key] = last_total  # to detect and resume it
            if len(self.recently_expired) > self.remember_expired:
                self.recently_expired.popitem(last=False)
        self._release(lapsed)
        self.stats.expired += len(lapsed)

    def __len__(self) -> int:
        return len(self.keys)


class LbNode:
    """Ties the table to the network: packets in, hints out, one interval timer."""

    def __init__(self, table: LeaseTable, key: bytes, lbnode_id: int, interval_ms: int, mtu: int = 1400) -> None:
        self.table = table
        self.key = key
        self.lbnode_id = lbnode_id
        self.interval_ms = interval_ms
        self.mtu = mtu
        self.transport: Any = None  # the UDP socket; hints to UDP senders leave through it
        # server node id -> where its packets come from: a UDP address, or the
        # DatagramStream of a TCP sender (hints go back on that connection)
        self.addresses: dict[int, Any] = {}
        # One sequence per hint datagram (the agents' replay guards accept each
        # once). Seeded from the clock in µs, so that after a restart it still
        # runs ahead of what the previous process sent: that one could not send
        # more than a million datagrams a second.
        self._sequence = time.time_ns() // 1000
        self.receiver: Any = None  # the BatchReceiver feeding on_batch: flushed before each interval ends
        self.tier: Any = None  # with lbnode `cluster:`, its TierMember (spoa/lbnode/cluster/tier.py)
        self.send_errors = {"hint": 0, "map": 0, "forward": 0}  # datagrams the socket refused, by kind
        self.maps_sent = 0  # tier map datagrams sent to server nodes
        self._announced: tuple = ()  # the members of the last tier map sent
        self._intervals = 0
        self._changed_maps = 0  # intervals the changed map is still sent in

    def on_datagram(self, header: Any, addr: Any) -> None:
        self.addresses[header.node_id] = addr

    def on_batch(self, batch: Any) -> None:
        if self.tier is not None:
            batch, forwards = self.tier.owned_records(batch, self.receiver.routed if self.receiver else [])
            for datagram, sender, owner in forwards:
                self._send(encode_forward(datagram, sender, self.key), owner, "forward")
        self.table.ingest_batch(batch, now_ms())

    def _send(self, datagram: bytes, addr: Any, what: str) -> bool:
        """One datagram to a server node (a UDP address or its TCP stream) or, forwarded, to
        another LB node; a failure is counted by `what` (hint, map, forward), never raised."""
        try:
            if isinstance(addr, DatagramStream):
                addr.send(datagram)
            else:
                self.transport.sendto(datagram, addr)
        except OSError:
            self.send_errors[what] += 1
            return False
        return True

    def _announce(self, tier: Any) -> None:
        """The tier's map (its live members, spoa.wire.tier_map) to every server node heard
        from: in each of the MAP_AFTER_CHANGE intervals after its view changed (one lost map
        must not leave a server node sending to a dead node until the next periodic one), and
        every MAP_EVERY_INTERVALS intervals."""
        self._intervals += 1
        tier_map = tier.tier_map(self.lbnode_id)
        if tier_map is None:
            return
        if tier_map.members != self._announced:
            self._announced, self._changed_maps = tier_map.members, MAP_AFTER_CHANGE
        if not self._changed_maps and self._intervals % MAP_EVERY_INTERVALS:
            return
        self._changed_maps = max(0, self._changed_maps - 1)
        datagram = encode_tier_map(tier_map, self.key)
        for addr in self.addresses.values():
            if self._send(datagram, addr, "map"):
                self.maps_sent += 1

    def tick(self) -> None:
        if self.receiver is not None:
            self.receiver.flush()  # what arrived this turn belongs to the interval ending now
        tier = self.tier
        changed = np.flatnonzero(self.table.refreshed) if tier is not None else None
        hints = self.table.end_interval(now_ms())
        if tier is not None:  # in a tier: state to the store, hints only for what this node owns
            tier.after_interval(changed)
            hints = tier.own_hints(hints)
        stats = self.table.stats
        for node_id, node_hints in hints.items():
            addr = self.addresses.get(node_id)
            if addr is None:
                continue
            datagrams = encode_hints(self.lbnode_id, self._sequence, now_ms(), node_hints, self.key, self.mtu)
            self._sequence += len(datagrams)
            for datagram in datagrams:
                if self._send(datagram, addr, "hint"):
                    stats.hint_datagrams += 1
                else:
                    stats.hint_send_errors += 1
            stats.hints_sent += len(node_hints)
        if tier is not None:
            self._announce(tier)
