"""The server node's lease module: SPOE events in, publishing packets out.

SPOE messages register connections (identity: HAProxy's sess.cid and the
4-tuple). Every interval the module reads the kernel's tcp_info for HAProxy's
client sockets (one sock_diag dump filtered by the frontend ports seen in the
registrations), feeds the cumulative counters to the segment tracker, closes
the connections whose socket left the dump, and publishes the tracker's
records to the LB nodes as connection publishing packets. Tracker, sample and
registrations share one key, spoa.wire.records.pack_key of HAProxy's socket;
hints name connections by id. All per-connection state (ids, the last hint,
the last publish time) lives in the tracker's slab: this module holds the
lease policy and nothing per connection.

Where the kernel dump is unavailable (another network namespace, no
sock_diag), counters HAProxy sends in the messages (bytes_in / bytes_out,
3.0+) are used instead and the packet says so (counter_source).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..netutil import now_ms
from ..wire.records import DIR_IN, DIR_OUT, CounterSource, PacketHeader
from .lease_answer import lease_answer
from .lease_message import LEASE_SOURCE_IDS, LEASE_SOURCE_NAMES, LeaseSettings, connection_id, lease_in_force
from .tracker import SegmentTracker

log = logging.getLogger("spoa.servernode.lease_module")

# The SPOE messages of haproxy/spoe-lease.conf.
LEASE_MESSAGES = ("lease-session", "lease-request")
# TCP states (include/net/tcp_states.h) in which the socket is closing.
_CLOSING_STATES = frozenset((4, 5, 8, 9, 11))  # FIN_WAIT1/2, CLOSE_WAIT, LAST_ACK, CLOSING
_COUNTER_ARGS = ("bytes_in", "bytes_out")
# Re-exported: where the agent's callers and tests have always found them.
__all__ = ["LEASE_MESSAGES", "LEASE_SOURCE_IDS", "LEASE_SOURCE_NAMES", "LeaseModule", "LeaseSettings", "ModuleStats",
           "connection_id"]


@dataclass
class ModuleStats:
    answer: Any = field(default=None, repr=False, compare=False)  # the LeaseAnswer: it counts what the messages did
    samples: int = 0
    sample_errors: int = 0
    sample_seconds: float = 0.0
    packets_sent: int = 0
    records_published: int = 0
    records_deferred: int = 0  # not republished this interval: their lease is long enough
    connections_closed: int = 0
    hints_applied: int = 0  # taken for a tracked connection
    # hints not taken, by reason: unknown_connection (not tracked here, e.g.
    # closed meanwhile), out_of_bounds (outside [lease.min_ms, lease.max_ms]:
    # the standard lease applies, source fallback)
    hints_refused: dict = field(default_factory=lambda: {"unknown_connection": 0, "out_of_bounds": 0})
    lbnode_silences: int = 0  # times no hint came for longer than a hint stays fresh
    sources: dict = field(default_factory=lambda: {"kernel": 0, "spoe": 0})

    @property
    def registrations(self) -> int:
        """lease messages that registered or refreshed a connection"""
        return self.answer.registrations

    @property
    def registrations_bad(self) -> int:
        """lease messages naming no connection (identity arguments missing, or not an address or port)"""
        return self.answer.registrations_bad

    @property
    def leases(self) -> dict:
        """answers given, by lease source"""
        return self.answer.leases


class LeaseModule:
    def __init__(self, tracker: SegmentTracker, sampler: Any, publisher: Any, interval_ms: int, node_id: int,
                 lease: LeaseSettings) -> None:
        self.tracker = tracker
        self.sampler = sampler  # KernelSampler or None
        self.publisher = publisher  # Publisher or None
        if publisher is not None:
            publisher.on_hints = self.on_hints
        self.interval_ms = interval_ms
        self.node_id = node_id
        self._answer = lease_answer(tracker, lease, self._spoe_counters if sampler is None else None)
        self.lease = lease
        self.stats = ModuleStats(self._answer)
        # Set once the kernel dump has shown a registered connection: we share
        # HAProxy's network namespace, so a registered socket missing from the
        # dump has closed. Until then, absence proves nothing (the agent may
        # run elsewhere) and connections end by expiry or SPOE counters.
        self._kernel_sees_haproxy = False
        # Packet sequences start at the clock, so that after a restart they
        # still run ahead of what the LB nodes' replay guards last saw.
        self._sequence = now_ms()
        self._task: asyncio.Task | None = None
        # Unix ms since which hints are overdue (None: they arrive). An LB node
        # that is down answers nothing (UDP has no error to see here), so
        # silence while publishing is the sign, said once per outage.
        self._silent_since: int | None = None
        self._started_ms = now_ms()

    @property
    def lease(self) -> LeaseSettings:
        return self._answer.settings

    @lease.setter
    def lease(self, lease: LeaseSettings) -> None:
        """Also on a live reload (SIGHUP): the answers and the refresh cadence
        follow the new settings (the cadence from the next record or hint on)."""
        self.tracker.set_refresh(self.interval_ms, lease.refresh_fraction, lease.hint_ttl_ms)
        self._answer.settings = lease

    # -- SPOE side ------------------------------------------------------------------
    @property
    def on_message(self) -> Any:
        """Handler for the lease-* messages (spoa.servernode.lease_answer): register, answer
        with the lease in force. The compiled one is called in C by the agent's message loop."""
        return self._answer

    # -- hints from the LB nodes ------------------------------------------------------
    def on_hints(self, header: Any, hints: list) -> None:
        now = now_ms()
        if self._silent_since is not None:
            log.info("lease hints arrive again (LB node %s), after %.1f s without", header.node_id,
                     (now - self._silent_since) / 1000)
            self._silent_since = None
        stats, lease, tracker = self.stats, self.lease, self.tracker
        for hint in hints:
            # The lease it puts in force: the tracker keeps it, and from it the refresh cadence.
            lease_ms, source, _, _ = lease_in_force(lease, hint.lease_ms, hint.source, hint.granularity_level, 0,
                                                    now, now)
            if not tracker.set_hint(hint.conn_id, hint.lease_ms, hint.source, hint.granularity_level, hint.anomaly,
                                    now, lease_ms, LEASE_SOURCE_IDS[source]):
                stats.hints_refused["unknown_connection"] += 1
            elif lease.min_ms <= hint.lease_ms <= lease.max_ms:
                stats.hints_applied += 1
            else:
                stats.hints_refused["out_of_bounds"] += 1

    def _spoe_counters(self, key: bytes, message: Any, now: int) -> None:
        """3.0+ sends bytes_in/bytes_out: the fallback when the kernel cannot be read."""
        bytes_in, bytes_out = message.get_addresses(_COUNTER_ARGS)
        if isinstance(bytes_in, int) and isinstance(bytes_out, int) and bytes_in >= 0 and bytes_out >= 0:
            self.tracker.update(key, DIR_IN, bytes_in, 0, now, CounterSource.SPOE)
            self.tracker.update(key, DIR_OUT, bytes_out, 0, now, CounterSource.SPOE)
            self.stats.sources["spoe"] += 1

    # -- interval loop ------------------------------------------------------------------
    def start(self) -> None:
        self.tracker.begin_interval(now_ms())
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        # Last word: publish what is known, so nothing tracked is silently dropped.
        self.tick()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.interval_ms / 1000
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            try:
                self.tick()
            except Exception:  # one bad interval must not stop publishing
                log.exception("interval failed")

    def tick(self) -> None:
        """One interval: sample, close vanished sockets, adapt, publish, restart."""
        now = now_ms()
        answer = self._answer
        if self.sampler is not None and answer.ports:
            if answer.ports_changed:
                answer.ports_changed = False
                self.sampler.set_ports(answer.ports)
            self._apply_kernel_sample(now)
        self.tracker.end_interval(now)
        deferred = self.tracker.stats["deferred"]
        records = self.tracker.publish_batch(now)  # in wire form, written from the tracker's slab
        self.stats.records_deferred += self.tracker.stats["deferred"] - deferred
        self.tracker.begin_interval(now)
        if self.publisher is not None:
            self._watch_hints(now)
        if self.publisher is not None and len(records):
            self._sequence += 1
            header = PacketHeader(node_id=self.node_id, sequence=self._sequence, timestamp_ms=now,
                                  interval_ms=self.interval_ms)
            self._sequence = self.publisher.send(header, records)  # one sequence per packet (per LB node routed to, per 32k records)
            self.stats.packets_sent += 1
            self.stats.records_published += len(records)

    def _watch_hints(self, now: int) -> None:
        """Warn once when no hint came for longer than a hint stays fresh while
        connections are tracked: leases have then fallen back to the standard one."""
        if self._silent_since is not None or not len(self.tracker):
            return
        last = self.publisher.last_hint_ms or self._started_ms
        overdue = max(self.lease.hint_ttl_ms, 3 * self.interval_ms)
        if now - last > overdue:
            self._silent_since = last
            self.stats.lbnode_silences += 1
            log.warning("no lease hint from any LB node for %.1f s (publishing to %s): leases fall back to the "
                        "standard %d ms until hints return", (now - last) / 1000, self.publisher.describe(),
                        self.lease.standard_ms)

    def _apply_kernel_sample(self, now: int) -> None:
        started = time.perf_counter()
        try:
            sample = self.sampler.sample()
        except OSError as exc:
            self.stats.sample_errors += 1
            log.warning("kernel sample failed: %s", exc)
            return
        self.stats.samples += 1
        self.stats.sample_seconds += time.perf_counter() - started
        # One call joins the sample to the tracker (SegmentTracker.apply_sample):
        # counters of the sampled connections, closing states, and, once the
        # kernel has shown one of ours, closes for those missing (closed,
        # possibly before any sample saw them: their final record carries what
        # the last sample, if any, counted).
        known, closed = self.tracker.apply_sample(sample, now, CounterSource.KERNEL, _CLOSING_STATES,
                                                  self._kernel_sees_haproxy)
        if known:
            self._kernel_sees_haproxy = True
        self.stats.connections_closed += closed
        self.stats.sources["kernel"] += known
