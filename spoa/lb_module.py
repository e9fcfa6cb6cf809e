"""The server node's LB module: SPOE events in, publishing packets out.

SPOE messages register connections (identity: HAProxy's sess.cid and the
4-tuple). Every interval the module reads the kernel's tcp_info for HAProxy's
client sockets (one sock_diag dump filtered by the frontend ports seen in the
registrations), feeds the cumulative counters to the segment tracker, closes
the connections whose socket left the dump, and publishes the tracker's
records to the LB nodes as connection publishing packets.

Where the kernel dump is unavailable (another network namespace, no
sock_diag), counters HAProxy sends in the messages (bytes_in / bytes_out,
3.0+) are used instead and the packet says so (counter_source).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from .constants import Scope
from .records import DIR_IN, DIR_OUT, CounterSource, PacketHeader
from .tracker import SegmentTracker

log = logging.getLogger("spoa.lb_module")

# The SPOE messages of haproxy/spoe-lease.conf.
LEASE_MESSAGES = ("lease-session", "lease-request")
# TCP states (include/net/tcp_states.h) in which the socket is closing.
_CLOSING_STATES = frozenset((4, 5, 8, 9, 11))  # FIN_WAIT1/2, CLOSE_WAIT, LAST_ACK, CLOSING


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def connection_id(cid: Any) -> bytes:
    """16 bytes for HAProxy's sess.cid: the UUID itself, or a hash of any other text."""
    if isinstance(cid, bytes):
        cid = cid.decode("utf-8", "surrogateescape")
    text = str(cid)
    if len(text) == 36:
        # HAProxy's uuid: 8-4-4-4-12 hex digits (10x cheaper than uuid.UUID)
        try:
            return bytes.fromhex(text.replace("-", ""))
        except ValueError:
            pass
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).digest()


@dataclass
class ModuleStats:
    registrations: int = 0
    registrations_bad: int = 0  # messages missing the identity arguments
    samples: int = 0
    sample_errors: int = 0
    sample_seconds: float = 0.0
    packets_sent: int = 0
    records_published: int = 0
    connections_closed: int = 0
    sources: dict = field(default_factory=lambda: {"kernel": 0, "spoe": 0})


class LbModule:
    def __init__(self, tracker: SegmentTracker, sampler: Any, publisher: Any, interval_ms: int, node_id: int,
                 standard_lease_ms: int) -> None:
        self.tracker = tracker
        self.sampler = sampler  # KernelSampler or None
        self.publisher = publisher  # Publisher or None
        self.interval_ms = interval_ms
        self.node_id = node_id
        self.standard_lease_ms = standard_lease_ms
        self.stats = ModuleStats()
        self._ports: set[int] = set()
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

    # -- SPOE side ------------------------------------------------------------------
    def on_message(self, message: Any, actions: Any) -> None:
        """Handler for the lease-* messages: register, answer with the lease in force."""
        src, src_port = message.get_address("src"), message.get("src_port")
        dst, dst_port = message.get_address("dst"), message.get("dst_port")
        cid = message.get("cid")
        if not isinstance(src, str) or not isinstance(dst, str) or not isinstance(src_port, int) \
                or not isinstance(dst_port, int):
            self.stats.registrations_bad += 1
        else:
            key = (dst, dst_port, src, src_port)  # HAProxy's socket: local, remote
            now = now_ms()
            if self.tracker.register(key, connection_id(cid if cid is not None else key), src, src_port,
                                     dst, dst_port, str(message.get("frontend") or ""), now):
                self.stats.registrations += 1
                if dst_port not in self._ports:
                    self._ports.add(dst_port)
                    if self.sampler is not None:
                        self.sampler.set_ports(self._ports)
                self._spoe_counters(key, message, now)
        actions.set_var(Scope.SESS, "duration_ms", self.standard_lease_ms)
        actions.set_var(Scope.SESS, "source", "standard")
        # A fresh number per answer: shows in HAProxy that the value is live.
        actions.set_var(Scope.TXN, "seq", next(self._answers))

    def _spoe_counters(self, key: tuple, message: Any, now: int) -> None:
        """3.0+ sends bytes_in/bytes_out: the fallback when the kernel cannot be read."""
        if self.sampler is not None:
            return
        bytes_in, bytes_out = message.get("bytes_in"), message.get("bytes_out")
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
            self._apply_kernel_sample(now)
        self.tracker.end_interval(now)
        records = self.tracker.publish()
        self.tracker.begin_interval(now)
        if self.publisher is not None and records:
            self._sequence += 1
            header = PacketHeader(node_id=self.node_id, sequence=self._sequence, timestamp_ms=now,
                                  interval_ms=self.interval_ms)
            self.publisher.send(header, records)
            self.stats.packets_sent += 1
            self.stats.records_published += len(records)

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
        tracker = self.tracker
        kernel = CounterSource.KERNEL
        keys = tracker.keys()
        if not self._kernel_sees_haproxy:
            self._kernel_sees_haproxy = any(key in sample for key in keys)
        for key in keys:
            info = sample.get(key)
            if info is None:
                if self._kernel_sees_haproxy:
                    # Closed, possibly before any sample saw it: its final
                    # record carries what the last sample (if any) counted.
                    tracker.close(key, now)
                    self.stats.connections_closed += 1
                continue
            tracker.update(key, DIR_IN, info.bytes_received, info.data_segs_in,
                           now - info.last_data_recv_ms, kernel)
            tracker.update(key, DIR_OUT, info.bytes_acked, info.data_segs_out,
                           now - info.last_data_sent_ms, kernel)
            tracker.touch(key, now)
            if info.state in _CLOSING_STATES:
                tracker.set_closing(key)
            self.stats.sources["kernel"] += 1
