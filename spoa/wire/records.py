"""What a connection publishing packet carries, as plain Python records.

The tracker produces them, the packet codec encodes and decodes them, the
LB node consumes them. Field meanings are documented byte by byte in
docs/publishing-packet.md.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

DIR_IN = 0  # client -> HAProxy (the kernel's bytes_received on HAProxy's socket)
DIR_OUT = 1  # HAProxy -> client (bytes_acked by the client)

# A connection's key in the agent (tracker, kernel sample): HAProxy's socket as
# 36 packed bytes, local address (16) + local port (u16 BE) + remote address
# (16) + remote port (u16 BE). IPv4 is stored IPv4-mapped (::ffff:a.b.c.d), so
# a dual-stack listener's v4-mapped socket and SPOE's IPv4 src give one key.
KEY_LEN = 36
V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96, the prefix IPv4 addresses are stored under
_PORTS = struct.Struct(">H")


def pack_address(text: str) -> bytes:
    """16 bytes of IPv4/IPv6 text, IPv4 as IPv4-mapped (OSError/ValueError for what is neither)."""
    try:
        return V4_MAPPED + socket.inet_pton(socket.AF_INET, text)
    except OSError:
        return socket.inet_pton(socket.AF_INET6, text)  # OSError for what is neither


def unpack_address(raw: bytes) -> str:
    """inet_ntop text of 16 packed bytes; IPv4-mapped as dotted IPv4."""
    if raw[:12] == V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


def pack_key(local: str, local_port: int, remote: str, remote_port: int) -> bytes:
    """The 36-byte key of HAProxy's socket local:port <-> remote:port.

    OSError for an address that is not IPv4/IPv6 text, struct.error for a
    port outside 0..65535.
    """
    return pack_address(local) + _PORTS.pack(local_port) + pack_address(remote) + _PORTS.pack(remote_port)


def unpack_key(key: bytes) -> tuple[str, int, str, int]:
    """(local, local_port, remote, remote_port) of a pack_key() key; IPv4 as dotted text."""
    if len(key) != KEY_LEN:
        raise ValueError(f"a connection key is {KEY_LEN} bytes, got {len(key)}")
    return (unpack_address(key[:16]), _PORTS.unpack_from(key, 16)[0],
            unpack_address(key[18:34]), _PORTS.unpack_from(key, 34)[0])


class CounterSource(IntEnum):
    """Where a connection's byte and packet counts came from."""

    KERNEL = 0  # sock_diag tcp_info of HAProxy's client-side socket
    SPOE = 1  # counters HAProxy sent in SPOE messages (bytes_in/bytes_out, 3.0+)
    NONE = 2  # registered, no counters seen yet


class ConnFlags(IntFlag):
    CLOSED = 0x01  # final report: the socket left the kernel dump (or closed)
    CLOSING = 0x02  # the socket is in a FIN/CLOSE state
    EXPIRED = 0x04  # dropped by idle expiry without ever being seen closed
    ANOMALY = 0x08  # flagged by the LB node's anomaly detector (hint echo)


class LeaseSource(IntEnum):
    STANDARD = 0  # the configured standard lease
    PREDICTED = 1  # a prediction the LB node made, inside our bounds
    FALLBACK = 2  # a prediction was asked for but failed or was out of bounds


@dataclass(frozen=True, slots=True)
class SegmentRecord:
    direction: int  # DIR_IN or DIR_OUT
    start_byte_offset: int  # first byte of the segment in that direction's stream
    byte_count: int  # bytes of the stream the segment covers so far
    bytes_transferred: int  # bytes that fell in this segment during the interval
    packets_transferred: int  # data segments attributed to it during the interval
    timestamp_last_activity_ms: int  # unix ms of the last byte in it (0: never)
    level: int  # granularity level of the segment (0 = base size, +1 = half, -1 = double)


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    conn_id: bytes  # 16 bytes (HAProxy's sess.cid uuid, or a hash of it)
    src: str  # client address as text (IPv4 or IPv6)
    src_port: int
    dst: str  # HAProxy frontend address the client connected to
    dst_port: int
    frontend: str  # frontend name (at most 255 bytes of UTF-8)
    flags: int  # ConnFlags
    counter_source: int  # CounterSource
    granularity_level: int  # the connection's current level (finest of its directions)
    requested_lease_ms: int  # lease the server node asks for (0: standard)
    predicted_lease_ms: int  # last hint received from the LB node (0: none)
    lease_source: int  # LeaseSource of the lease in force
    bytes_in_total: int  # cumulative bytes client -> HAProxy
    bytes_out_total: int  # cumulative bytes HAProxy -> client
    segments: tuple[SegmentRecord, ...] = field(default_factory=tuple)


class HeaderFlags(IntFlag):
    """PacketHeader.flags bits (docs/publishing-packet.md §2); the others are reserved (0)."""

    # Sent to its records' owner by the sender's tier map (spoa.wire.tier_map): an LB node
    # that does not own a record of it forwards it (spoa.wire.forward). Without the bit the
    # sender sends to every LB node (no map yet), and each takes only its own.
    ROUTED = 0x01


@dataclass(frozen=True, slots=True)
class PacketHeader:
    node_id: int  # server node id (u64)
    sequence: int  # per-node packet sequence, strictly increasing (u64)
    timestamp_ms: int  # unix ms the interval ended
    interval_ms: int  # length of the reporting interval
    flags: int = 0  # HeaderFlags
