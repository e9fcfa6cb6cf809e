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
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .hints import ANOMALY, HINT_DTYPE, encode_hints
from .records import ConnFlags, LeaseSource
from .stream_transport import DatagramStream

log = logging.getLogger("spoa.lbnode")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


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


class LeaseTable:
    """Per-connection state in numpy arrays indexed by slot.

    Python touches each record once on ingest (a dict lookup for its slot);
    everything else, per packet and per interval, is array operations.
    """

    def __init__(self, capacity: int, forecaster: Any, policy: Any, standard_ms: int, interval_ms: int,
                 remember_expired: int = 100_000, anomaly: Any = None, history: Any = None) -> None:
        self.capacity = capacity
        self.forecaster = forecaster
        self.policy = policy
        self.standard_ms = standard_ms
        self.interval_ms = interval_ms
        self.anomaly = anomaly
        self.history = history  # rolling per-interval volumes per connection (a History ring), or None
        self.slots: dict[tuple[int, bytes], int] = {}
        self.keys: list[tuple[int, bytes] | None] = [None] * capacity
        self.free = list(range(capacity - 1, -1, -1))
        self.expires = np.zeros(capacity, np.int64)  # unix ms the lease ends
        self.refreshed_at = np.zeros(capacity, np.int64)  # unix ms of the last refresh
        self.last_total = np.zeros(capacity, np.uint64)  # bytes in + out at the last refresh
        self.volume = np.zeros(capacity, np.float64)  # bytes since the previous interval's refresh
        self.elapsed = np.ones(capacity, np.int64)  # intervals those bytes span
        self.lease = np.zeros(capacity, np.int64)  # lease in force, ms
        self.source = np.zeros(capacity, np.uint8)  # LeaseSource of it
        self.level = np.zeros(capacity, np.int8)  # granularity level reported
        self.flagged = np.zeros(capacity, bool)  # anomaly
        self.node = np.zeros(capacity, np.uint64)  # server node id (where hints go)
        self.conn_id = np.zeros(capacity, "S16")  # connection id (what hints name)
        self.class_id = np.zeros(capacity, np.int32)  # traffic class: server node + frontend
        self.refreshed = np.zeros(capacity, bool)  # refreshed during this interval
        self.segments: list[tuple] = [()] * capacity  # cached granularity array per connection
        self.classes: dict[tuple[int, str], int] = {}  # traffic class -> id
        self.class_names: list[str] = []  # id -> frontend name (the anomaly detector's class)
        self.class_lease = np.full(0, np.nan)  # id -> EWMA of leases granted (NaN: none yet)
        # expired key -> its last cumulative total (a later refresh is a premature expiry)
        self.recently_expired: OrderedDict[tuple[int, bytes], int] = OrderedDict()
        self.remember_expired = remember_expired
        self.stats = LbNodeStats()

    # -- ingestion ----------------------------------------------------------------------
    def ingest(self, node_id: int, records: list, now: int) -> None:
        stats = self.stats
        stats.packets += 1
        stats.records += len(records)
        slots_of = self.slots
        slots, totals, levels, closed, new, resumed = [], [], [], [], [], []
        for rec in records:
            key = (node_id, rec.conn_id)
            slot = slots_of.get(key)
            if slot is None:
                if rec.flags & ConnFlags.CLOSED:
                    self.recently_expired.pop(key, None)
                    continue  # final report of a connection we no longer hold
                last_total = self.recently_expired.pop(key, None)
                slot = self._allocate(key, rec.frontend)
                if slot is None:
                    continue
                new.append(slot)
                if last_total is not None:
                    stats.premature_expiries += 1
                    resumed.append((slot, last_total))
            slots.append(slot)
            totals.append(rec.bytes_in_total + rec.bytes_out_total)
            levels.append(rec.granularity_level)
            self.segments[slot] = rec.segments
            if rec.flags & ConnFlags.CLOSED:
                closed.append(slot)
        if new:
            self._start(np.array(new, np.int64), now)
        for slot, last_total in resumed:
            # A connection back from a premature expiry: only what it moved since
            # its last record is new volume, not its whole cumulative count.
            self.last_total[slot] = last_total
        if not slots:
            return
        idx = np.array(slots, np.int64)
        total = np.array(totals, np.uint64)
        last = self.last_total[idx]
        # totals are cumulative: the growth since the last record is the volume
        np.add.at(self.volume, idx, np.where(total >= last, total - last, 0).astype(np.float64))
        self.last_total[idx] = total
        since = now - self.refreshed_at[idx]
        self.elapsed[idx] = np.where(since > 0, np.maximum(1, np.rint(since / self.interval_ms)), self.elapsed[idx])
        self.refreshed_at[idx] = now
        self.expires[idx] = now + self.lease[idx]
        self.level[idx] = levels
        self.refreshed[idx] = True
        stats.refreshes += len(slots)
        for slot in closed:
            self._release(slot)
        stats.closed += len(closed)

    def _allocate(self, key: tuple[int, bytes], frontend: str) -> int | None:
        if not self.free:
            self.stats.refused += 1
            return None
        slot = self.free.pop()
        self.slots[key] = slot
        self.keys[slot] = key
        self.node[slot] = key[0]
        self.conn_id[slot] = key[1]
        klass = (key[0], frontend)
        cid = self.classes.get(klass)
        if cid is None:
            cid = self.classes[klass] = len(self.class_names)
            self.class_names.append(frontend)
            self.class_lease = np.append(self.class_lease, np.nan)
        self.class_id[slot] = cid
        self.stats.new_connections += 1
        return slot

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
        reset = getattr(self.policy, "reset", None)
        if reset is not None:
            reset(slots)
        if self.history is not None:
            self.history.reset(slots)

    def _release(self, slot: int) -> None:
        key = self.keys[slot]
        del self.slots[key]
        self.keys[slot] = None
        self.segments[slot] = ()
        self.refreshed[slot] = False
        self.free.append(slot)

    # -- per interval ----------------------------------------------------------------------
    def end_interval(self, now: int) -> dict[int, np.ndarray]:
        """Forecast, lease and expire; the hints to send (HINT_DTYPE arrays) by server node id."""
        hints: dict[int, np.ndarray] = {}
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
            self._flag(slots, per_interval)
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
        observe = getattr(self.policy, "observe", None)
        if observe is not None:  # activity policy: driven by when traffic happens
            observe(slots, per_interval > 0, now)
            # cold connections (no gap seen yet) start from their class's leases
            return self.policy.leases(slots, self.class_lease[self.class_id[slots]])
        return self.policy.leases(predicted)

    def _score(self, slots: np.ndarray, actual: np.ndarray) -> None:
        """Forecast error of the previous interval's forecast against what came."""
        previous = self.forecaster.forecast(slots)
        ok = np.isfinite(previous)
        self.stats.forecast_abs_error += float(np.abs(previous[ok] - actual[ok]).sum())
        self.stats.forecast_samples += int(ok.sum())

    def _flag(self, slots: np.ndarray, rates: np.ndarray) -> None:
        if self.anomaly is None:
            return
        classes = self.class_id[slots]
        for cid in np.unique(classes).tolist():
            members = classes == cid
            class_rates = rates[members]
            name = self.class_names[cid]
            flags = self.anomaly.flag(name, class_rates)
            self.anomaly.observe(name, class_rates[class_rates > 0])
            self.flagged[slots[members]] = flags
            self.stats.anomalies += int(np.count_nonzero(flags))

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
        live = np.fromiter(self.slots.values(), np.int64, len(self.slots))
        if not len(live):
            return
        lapsed = live[self.expires[live] < now]
        for slot in lapsed.tolist():
            key = self.keys[slot]
            self._release(slot)
            self.stats.expired += 1
            self.recently_expired[key] = int(self.last_total[slot])  # to detect and resume it
            if len(self.recently_expired) > self.remember_expired:
                self.recently_expired.popitem(last=False)

    def __len__(self) -> int:
        return len(self.slots)


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
        self._sequence = now_ms()  # ahead of what a replay guard saw before a restart

    def on_packet(self, header: Any, records: list, addr: Any) -> None:
        self.addresses[header.node_id] = addr
        self.table.ingest(header.node_id, records, now_ms())

    def tick(self) -> None:
        hints = self.table.end_interval(now_ms())
        stats = self.table.stats
        for node_id, node_hints in hints.items():
            addr = self.addresses.get(node_id)
            if addr is None:
                continue
            self._sequence += 1
            for datagram in encode_hints(self.lbnode_id, self._sequence, now_ms(), node_hints, self.key, self.mtu):
                try:
                    if isinstance(addr, DatagramStream):
                        addr.send(datagram)
                    else:
                        self.transport.sendto(datagram, addr)
                except OSError:
                    stats.hint_send_errors += 1
                else:
                    stats.hint_datagrams += 1
            stats.hints_sent += len(node_hints)
