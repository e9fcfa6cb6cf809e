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
import hashlib
import logging
import struct
import time
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from ..netutil import now_ms
from ..spop.codec import FrameWriter
from ..spop.constants import FrameType, Scope
from ..wire.records import DIR_IN, DIR_OUT, CounterSource, LeaseSource, PacketHeader
from .sampler import pack_key
from .tracker import SegmentTracker

log = logging.getLogger("spoa.servernode.lease_module")

# The SPOE messages of haproxy/spoe-lease.conf.
LEASE_MESSAGES = ("lease-session", "lease-request")
# TCP states (include/net/tcp_states.h) in which the socket is closing.
_CLOSING_STATES = frozenset((4, 5, 8, 9, 11))  # FIN_WAIT1/2, CLOSE_WAIT, LAST_ACK, CLOSING
# The arguments on_message reads, in one Message.get_addresses() pass.
_IDENTITY_ARGS = ("cid", "src", "src_port", "dst", "dst_port", "frontend")
_COUNTER_ARGS = ("bytes_in", "bytes_out")
# Distinct encoded answers kept (lease ms x source x level x anomaly).
_MAX_ENCODED_ANSWERS = 4096



def connection_id(cid: Any) -> bytes:
    """16 bytes for HAProxy's sess.cid: the UUID itself, or a hash of any other text."""
    # The codec gives a str: tested first and by type, it is every message's case.
    if type(cid) is not str:
        cid = cid.decode("utf-8", "surrogateescape") if isinstance(cid, bytes) else str(cid)
    if len(cid) == 36:
        # HAProxy's uuid: 8-4-4-4-12 hex digits (10x cheaper than uuid.UUID)
        try:
            return bytes.fromhex(cid.replace("-", ""))
        except ValueError:
            pass
    return hashlib.blake2b(cid.encode("utf-8", "surrogateescape"), digest_size=16).digest()


@dataclass(frozen=True)
class LeaseSettings:
    """What this server node accepts from the LB nodes (the spec's "pre-defined bounds")."""

    standard_ms: int = 30000  # used without a hint, or when a hint is refused
    min_ms: int = 1000  # a hint below this is refused (fallback)
    max_ms: int = 3_600_000  # a hint above this is refused (fallback)
    hint_ttl_ms: int = 5000  # a hint older than this is stale: the LB node went quiet
    refresh_fraction: float = 0.34  # publish a connection every lease * this (>= every interval)
    # sess.lease.class: "short" up to the first bound, "medium" up to the
    # second, "long" above: what TCP-mode frontends route on (no set-timeout there).
    class_bounds_ms: tuple[int, int] = (60_000, 600_000)

    def lease_class(self, lease_ms: int) -> str:
        short, medium = self.class_bounds_ms
        return "short" if lease_ms <= short else "medium" if lease_ms <= medium else "long"


LEASE_SOURCE_NAMES = {LeaseSource.STANDARD: "standard", LeaseSource.PREDICTED: "predicted",
                      LeaseSource.FALLBACK: "fallback"}
LEASE_SOURCE_IDS = {name: int(source) for source, name in LEASE_SOURCE_NAMES.items()}


@dataclass
class ModuleStats:
    registrations: int = 0
    registrations_bad: int = 0  # messages missing the identity arguments
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
    leases: dict = field(default_factory=lambda: {"standard": 0, "predicted": 0, "fallback": 0})
    sources: dict = field(default_factory=lambda: {"kernel": 0, "spoe": 0})


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
        self.lease = lease
        self.stats = ModuleStats()
        self._ports: set[int] = set()
        self._ports_changed = False
        # Set once the kernel dump has shown a registered connection: we share
        # HAProxy's network namespace, so a registered socket missing from the
        # dump has closed. Until then, absence proves nothing (the agent may
        # run elsewhere) and connections end by expiry or SPOE counters.
        self._kernel_sees_haproxy = False
        self._answers = count(1)
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
        return self._lease

    @lease.setter
    def lease(self, lease: LeaseSettings) -> None:
        """Also on a live reload (SIGHUP): the encoded answers and the refresh cadence
        follow the new settings (the cadence from the next record or hint on)."""
        self._lease = lease
        self.tracker.set_refresh(self.interval_ms, lease.refresh_fraction, lease.hint_ttl_ms)
        self._standard_answer = self._encode_answer(lease.standard_ms, "standard", None, None)
        self._encoded_answers: dict[tuple, bytes] = {}

    # -- SPOE side ------------------------------------------------------------------
    def on_message(self, message: Any, actions: Any) -> None:
        """Handler for the lease-* messages: register, answer with the lease in force."""
        # One pass over the arguments for all of them (Message.get_addresses).
        cid, src, src_port, dst, dst_port, frontend = message.get_addresses(_IDENTITY_ARGS)
        now = now_ms()
        entry = None
        try:
            if not 0 < dst_port < 65536:  # HAProxy's listening port: 0 is no socket's
                raise ValueError(dst_port)
            key = pack_key(dst, dst_port, src, src_port)  # HAProxy's socket: local, remote
        except (TypeError, ValueError, OSError, struct.error):  # missing, or not an address / port
            self.stats.registrations_bad += 1
        else:
            # Without a cid, a hash of the 4-tuple: the same id for every message of the connection.
            conn_id = connection_id(cid) if cid is not None else hashlib.blake2b(key, digest_size=16).digest()
            if self.tracker.register(key, conn_id, src, src_port, dst, dst_port, str(frontend or ""), now):
                entry = self.tracker.hint(key)
                self.stats.registrations += 1
                if dst_port not in self._ports:
                    # The sampler's filter is rebuilt once per interval, not per new port.
                    self._ports.add(dst_port)
                    self._ports_changed = True
                if self.sampler is None:
                    self._spoe_counters(key, message, now)
        if entry is None:
            # No hint (yet): the standard answer, the same bytes every time.
            self.stats.leases["standard"] += 1
            actions.put_raw(self._standard_answer)
        else:
            lease = self._lease_of(entry, now)
            self.stats.leases[lease[1]] += 1
            actions.put_raw(self._answer_bytes(lease))
        # A fresh number per answer: shows in HAProxy that the value is live.
        actions.set_var(Scope.TXN, "seq", next(self._answers))

    def _answer_bytes(self, lease: tuple) -> bytes:
        """The sess.lease.* set-var actions for (lease ms, source, level,
        anomaly), encoded once per distinct lease and reused."""
        answer = self._encoded_answers.get(lease)
        if answer is None:
            if len(self._encoded_answers) >= _MAX_ENCODED_ANSWERS:
                self._encoded_answers.clear()  # predicted leases vary: bounded, not per connection
            answer = self._encoded_answers[lease] = self._encode_answer(*lease)
        return answer

    def _encode_answer(self, lease_ms: int, source: str, level: int | None, anomaly: int | None) -> bytes:
        w = FrameWriter()
        w.begin_frame(FrameType.ACK, 0, 0)
        start = w.mark()
        w.set_var(Scope.SESS, "duration_ms", lease_ms)
        w.set_var(Scope.SESS, "source", source)
        w.set_var(Scope.SESS, "class", self.lease.lease_class(lease_ms))
        if level is not None:
            w.set_var(Scope.SESS, "granularity", level)
            # Always 0 or 1 once hints flow, never only-when-1: a sess variable
            # outlives the request, so a flag that clears must be overwritten.
            w.set_var(Scope.SESS, "anomaly", anomaly)
        w.end_frame()
        return w.take()[start:]

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
            lease_ms, source, _, _ = self._lease_of((hint.lease_ms, hint.source, hint.granularity_level, 0, now), now)
            if not tracker.set_hint(hint.conn_id, hint.lease_ms, hint.source, hint.granularity_level, hint.anomaly,
                                    now, lease_ms, LEASE_SOURCE_IDS[source]):
                stats.hints_refused["unknown_connection"] += 1
            elif lease.min_ms <= hint.lease_ms <= lease.max_ms:
                stats.hints_applied += 1
            else:
                stats.hints_refused["out_of_bounds"] += 1

    def _lease_of(self, hint: tuple, now: int) -> tuple[int, str, int, int]:
        """(lease ms, source name, granularity level, anomaly 0/1) in force for a
        connection whose last hint is hint: SegmentTracker.hint()'s (lease ms,
        source, level, anomaly, received unix ms); without one, on_message
        answers the standard lease (source "standard", no level nor anomaly).

        A hint is honoured only inside [min_ms, max_ms] and while fresh; any
        other case is the standard lease ("fallback": a hint was refused or went
        stale). The anomaly flag is the last hint's (whatever its lease's
        bounds: the flag is about the traffic, not the lease) while that hint is
        fresh, 0 once it is stale: a quiet LB node's old judgement must not hold
        a connection flagged.
        """
        lease_ms, source, level, anomaly, received = hint
        fresh = now - received <= self.lease.hint_ttl_ms
        anomaly = 1 if fresh and anomaly else 0
        if fresh and source == LeaseSource.PREDICTED and self.lease.min_ms <= lease_ms <= self.lease.max_ms:
            return lease_ms, "predicted", level, anomaly
        return self.lease.standard_ms, "fallback", level, anomaly

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
        if self.sampler is not None and self._ports:
            if self._ports_changed:
                self._ports_changed = False
                self.sampler.set_ports(self._ports)
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
