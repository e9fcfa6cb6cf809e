"""Sends connection publishing packets to the LB nodes over UDP, and hears their hints.

UDP because a lost packet costs one interval of freshness, never
correctness: every record carries cumulative totals and the full current
segmentation. The LB nodes answer with lease hints on the same socket, to the
address the packets came from.

LB nodes of a tier also send their tier map on that socket: from then on each record goes
only to its slot's owner (spoa.servernode.routing), one packet per owner, each with its own
sequence and the ROUTED header flag. Without a map (no tier, none yet, or gone stale) every
record goes to every configured LB node. The TCP option keeps to the configured nodes:
routing needs the UDP transport.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..netutil import set_receive_buffer
from ..netutil import parse_address
from ..wire.hints import decode_hints, hint_count
from ..wire.packet import REASONS, PacketError, RecordBatch, ReplayGuard, encode_batch
from ..wire.records import ConnectionRecord, HeaderFlags, PacketHeader
from ..wire.stream_transport import StreamClient
from ..wire.tier_map import decode_tier_map, is_tier_map
from .routing import Router

log = logging.getLogger("spoa.servernode.publisher")

# Hint datagrams whose sequences may arrive out of order and still be accepted.
HINT_REPLAY_WINDOW = 1024
# An interval's hints arrive as a burst (56 entries per 1400-byte datagram).
HINT_RECEIVE_BUFFER = 4 << 20
# Records per packet at most: a packet counts its datagrams in a u16 and a record always fits
# one datagram, so at any mtu this many make a packet (a million connections are 31 packets).
PACKET_RECORDS = 32768
# A tier map not renewed for this long is stale (LB nodes resend theirs every 4 intervals).
DEFAULT_MAP_TTL_MS = 10_000


class _HintEndpoint(asyncio.DatagramProtocol):
    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.publisher._on_datagram(data)

    def error_received(self, exc: Exception) -> None:
        # e.g. ICMP port unreachable while an LB node is down: the next
        # interval sends again; nothing to do but count it.
        self.publisher.send_errors += 1


class Publisher:
    def __init__(self, targets: Sequence[str], key: bytes, mtu: int,
                 on_hints: Callable[[Any, list], None] | None = None, transport: str = "udp",
                 map_ttl_ms: int = DEFAULT_MAP_TTL_MS) -> None:
        self.key = key
        self.mtu = mtu
        self.on_hints = on_hints
        self.transport = transport
        self.targets: list[tuple[int, Any]] = []
        self._streams: list[StreamClient] = []
        for target in targets:
            host, port = parse_address(target)
            if transport == "tcp":
                self._streams.append(StreamClient(str(host), int(port), lambda data, _peer: self._on_datagram(data)))
                continue
            info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
            self.targets.append((info[0], info[4]))
        self._transports: dict[int, asyncio.DatagramTransport] = {}
        # Each hint datagram has its own sequence (spoa.wire.hints.encode_hints): an
        # interval's hints for thousands of connections are dozens of them,
        # and the window tolerates their reordering.
        self.guard = ReplayGuard(window=HINT_REPLAY_WINDOW)
        self.datagrams_sent = 0
        self.bytes_sent = 0
        self.send_errors = 0
        self.hint_datagrams = 0  # accepted
        self.hints_received = 0  # entries of accepted datagrams
        # Refused datagrams by reason, and the entries they carried (where
        # their length says how many): with hints_received, what the LB nodes
        # sent adds up.
        self.hints_rejected: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.hint_entries_rejected: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.last_hint_ms: int | None = None  # unix ms of the last accepted hint datagram
        self.router = Router(map_ttl_ms)
        self.maps_rejected: dict[str, int] = dict.fromkeys(REASONS, 0)  # tier map datagrams refused, by reason
        self.records_routed = 0  # records sent to their slot's owner only (the others went to every LB node)
        self._described = ", ".join(targets)

    async def open(self) -> None:
        for stream in self._streams:
            stream.start()
        loop = asyncio.get_running_loop()
        for family in {family for family, _ in self.targets}:
            transport, _ = await loop.create_datagram_endpoint(lambda: _HintEndpoint(self), family=family)
            set_receive_buffer(transport.get_extra_info("socket"), HINT_RECEIVE_BUFFER)
            self._transports[family] = transport

    def send(self, header: PacketHeader, records: RecordBatch | Sequence[ConnectionRecord]) -> int:
        """Publish the interval's records (a RecordBatch, as SegmentTracker.publish_batch makes
        it, or ConnectionRecords); the last packet sequence used: header.sequence, one more per
        further packet (one per LB node routed to, and one per PACKET_RECORDS)."""
        router = self.router
        if not isinstance(records, RecordBatch):
            records = RecordBatch.from_records(records)
        if not self._streams and len(records) and router.route():
            sequence = header.sequence - 1
            for target, group in router.split(header.node_id, records):
                sequence = self._send_packets(header, sequence + 1, group, HeaderFlags.ROUTED, [router.targets[target]])
                self.records_routed += len(group)
            return sequence
        return self._send_packets(header, header.sequence, records, 0, self.targets)

    def _send_packets(self, header: PacketHeader, sequence: int, records: RecordBatch, flags: int,
                      targets: list[tuple[int, Any]]) -> int:
        """`records` as packets of at most PACKET_RECORDS records from `sequence` on; the last
        sequence used."""
        for first in range(0, max(len(records), 1), PACKET_RECORDS):
            if first:
                sequence += 1
            packet = PacketHeader(header.node_id, sequence, header.timestamp_ms, header.interval_ms,
                                  header.flags | flags)
            self._send_datagrams(encode_batch(packet, records, self.key, self.mtu, first, first + PACKET_RECORDS),
                                 targets)
        return sequence

    def _send_datagrams(self, datagrams: list[bytes], targets: list[tuple[int, Any]]) -> None:
        for stream in self._streams:
            for datagram in datagrams:
                if stream.send(datagram):
                    self.datagrams_sent += 1
                    self.bytes_sent += len(datagram)
                else:
                    self.send_errors += 1
        for family, address in targets:
            transport = self._transports.get(family)
            if transport is None:  # a tier member of an address family no configured LB node has
                self.send_errors += len(datagrams)
                continue
            for datagram in datagrams:
                try:
                    transport.sendto(datagram, address)
                except OSError as exc:
                    self.send_errors += 1
                    log.debug("send to %s failed: %s", address, exc)
                else:
                    self.datagrams_sent += 1
                    self.bytes_sent += len(datagram)

    def _on_datagram(self, data: bytes) -> None:
        if is_tier_map(data):
            try:
                tier_map = decode_tier_map(data, self.key)
            except PacketError as exc:
                self.maps_rejected[exc.reason] += 1
                return
            self.router.take(tier_map)
            return
        try:
            header, hints = decode_hints(data, self.key)
            self.guard.check(header, 0)
        except PacketError as exc:
            self.hints_rejected[exc.reason] += 1
            self.hint_entries_rejected[exc.reason] += hint_count(data)
            return
        self.hint_datagrams += 1
        self.hints_received += len(hints)
        self.last_hint_ms = time.time_ns() // 1_000_000
        if self.on_hints is not None:
            self.on_hints(header, hints)

    def describe(self) -> str:
        """The LB node addresses, as configured."""
        return self._described

    def close(self) -> None:
        for stream in self._streams:
            stream.close()
        for transport in self._transports.values():
            transport.close()
