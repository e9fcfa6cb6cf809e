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

from .hints import Hint, encode_hints
from .records import ConnFlags, LeaseSource

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
    """Per-connection state in numpy arrays indexed by slot."""

    def __init__(self, capacity: int, forecaster: Any, policy: Any, standard_ms: int, interval_ms: int,
                 remember_expired: int = 100_000, anomaly: Any = None, history: Any = None) -> None:
        self.capacity = capacity
        self.forecaster = forecaster
        self.policy = policy
        self.standard_ms = standard_ms
        self.interval_ms = interval_ms
        self.anomaly = anomaly
        self.history = history  # per-interval volumes for ARIMA refits (None otherwise)
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
        self.klass: list[tuple[int, str] | None] = [None] * capacity
        self.segments: list[tuple] = [()] * capacity  # cached granularity array per connection
        self.refreshed: set[int] = set()  # slots refreshed this interval
        self.class_lease: dict[tuple[int, str], float] = {}  # EWMA of leases granted per class
        self.recently_expired: OrderedDict[tuple[int, bytes], int] = OrderedDict()
        self.remember_expired = remember_expired
        self.stats = LbNodeStats()

    # -- ingestion ----------------------------------------------------------------------
    def ingest(self, node_id: int, records: list, now: int) -> None:
        stats = self.stats
        stats.packets += 1
        stats.records += len(records)
        for rec in records:
            key = (node_id, rec.conn_id)
            slot = self.slots.get(key)
            if slot is None:
                if rec.flags & ConnFlags.CLOSED:
                    self.recently_expired.pop(key, None)
                    continue  # final report of a connection we no longer hold
                if self.recently_expired.pop(key, None) is not None:
                    stats.premature_expiries += 1
                slot = self._allocate(key, (node_id, rec.frontend), now)
                if slot is None:
                    continue
            total = rec.bytes_in_total + rec.bytes_out_total
            last = int(self.last_total[slot])
            if total >= last:
                self.volume[slot] += total - last
            self.last_total[slot] = total
            if now > self.refreshed_at[slot]:
                self.elapsed[slot] = max(1, round((now - int(self.refreshed_at[slot])) / self.interval_ms))
            self.refreshed_at[slot] = now
            self.expires[slot] = now + self.lease[slot]
            self.level[slot] = rec.granularity_level
            self.segments[slot] = rec.segments
            stats.refreshes += 1
            if rec.flags & ConnFlags.CLOSED:
                self._release(slot)
                stats.closed += 1
            else:
                self.refreshed.add(slot)

    def _allocate(self, key: tuple[int, bytes], klass: tuple[int, str], now: int) -> int | None:
        if not self.free:
            self.stats.refused += 1
            return None
        slot = self.free.pop()
        self.slots[key] = slot
        self.keys[slot] = key
        self.klass[slot] = klass
        prior = self.class_lease.get(klass)
        self.lease[slot] = int(prior) if prior is not None else self.standard_ms
        self.source[slot] = LeaseSource.PREDICTED if prior is not None else LeaseSource.STANDARD
        self.last_total[slot] = 0
        self.volume[slot] = 0.0
        self.elapsed[slot] = 1
        self.refreshed_at[slot] = now
        self.flagged[slot] = False
        slots = np.array([slot])
        self.forecaster.reset(slots)
        self.policy_reset(slots)
        if self.history is not None:
            self.history.reset(slots)
        self.stats.new_connections += 1
        return slot

    def policy_reset(self, slots: np.ndarray) -> None:
        reset = getattr(self.policy, "reset", None)
        if reset is not None:
            reset(slots)

    def _release(self, slot: int) -> None:
        key = self.keys[slot]
        del self.slots[key]
        self.keys[slot] = None
        self.klass[slot] = None
        self.segments[slot] = ()
        self.refreshed.discard(slot)
        self.free.append(slot)

    # -- per interval ----------------------------------------------------------------------
    def end_interval(self, now: int) -> dict[int, list[Hint]]:
        """Forecast, lease and expire; the hints to send, by server node id."""
        hints: dict[int, list[Hint]] = {}
        if self.refreshed:
            slots = np.fromiter(self.refreshed, np.int64, len(self.refreshed))
            self.refreshed.clear()
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
            for slot, lease, source in zip(slots.tolist(), leases.tolist(), sources.tolist()):
                node_id, conn_id = self.keys[slot]
                hints.setdefault(node_id, []).append(
                    Hint(conn_id, int(lease), int(source), int(self.level[slot]), bool(self.flagged[slot])))
                self.stats.leases["predicted" if source == LeaseSource.PREDICTED else "fallback"] += 1
        self._expire(now)
        return hints

    def _leases(self, slots, per_interval, predicted, now):
        observe = getattr(self.policy, "observe", None)
        if observe is not None:  # activity policy: driven by when traffic happens
            observe(slots, per_interval > 0, now)
            # cold connections (no gap seen yet) start from their class's leases
            prior = np.array([self.class_lease.get(self.klass[slot], np.nan) for slot in slots.tolist()])
            return self.policy.leases(slots, prior)
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
        by_class: dict[str, list[int]] = {}
        for i, slot in enumerate(slots.tolist()):
            by_class.setdefault(self.klass[slot][1], []).append(i)
        for klass, idx in by_class.items():
            class_rates = rates[idx]
            flags = self.anomaly.flag(klass, class_rates)
            self.anomaly.observe(klass, class_rates[class_rates > 0])
            self.flagged[slots[idx]] = flags
            self.stats.anomalies += int(np.count_nonzero(flags))

    def _learn_classes(self, slots: np.ndarray, leases: np.ndarray) -> None:
        for slot, lease in zip(slots.tolist(), leases.tolist()):
            klass = self.klass[slot]
            prior = self.class_lease.get(klass)
            self.class_lease[klass] = lease if prior is None else 0.9 * prior + 0.1 * lease

    def _expire(self, now: int) -> None:
        live = np.fromiter(self.slots.values(), np.int64, len(self.slots))
        if not len(live):
            return
        lapsed = live[self.expires[live] < now]
        for slot in lapsed.tolist():
            key = self.keys[slot]
            self._release(slot)
            self.stats.expired += 1
            self.recently_expired[key] = now
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
        self.transport: Any = None  # the receiving socket; hints leave through it
        self.addresses: dict[int, Any] = {}  # server node id -> where its packets come from
        self._sequence = now_ms()  # ahead of what a replay guard saw before a restart

    def on_packet(self, header: Any, records: list, addr: Any) -> None:
        self.addresses[header.node_id] = addr
        self.table.ingest(header.node_id, records, now_ms())

    def tick(self) -> None:
        hints = self.table.end_interval(now_ms())
        if self.transport is None:
            return
        stats = self.table.stats
        for node_id, node_hints in hints.items():
            addr = self.addresses.get(node_id)
            if addr is None:
                continue
            self._sequence += 1
            for datagram in encode_hints(self.lbnode_id, self._sequence, now_ms(), node_hints, self.key, self.mtu):
                try:
                    self.transport.sendto(datagram, addr)
                except OSError:
                    stats.hint_send_errors += 1
                else:
                    stats.hint_datagrams += 1
            stats.hints_sent += len(node_hints)
