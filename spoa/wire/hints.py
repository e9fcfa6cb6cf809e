"""Lease hints: what an LB node answers a server node, per connection.

Format v1, big-endian, one self-contained UDP datagram (documented in
docs/publishing-packet.md §13, "Lease hints"; one sequence per datagram):

  header (32 B)  magic "CHNT" | version u8 = 1 | flags u8 = 0 | count u16
                 | lbnode_id u64 | sequence u64 | timestamp_ms u64
  entry (24 B)   conn_id 16 B | lease_ms u32 | source u8 (LeaseSource)
                 | granularity_level i8 | flags u8 (bit 0: anomaly) | reserved u8
  tag (16 B)     HMAC-SHA256 over everything before it, truncated (as packets)

Pure Python (struct, numpy): one datagram carries 56 hints at mtu 1400, so
an interval's hints are a few dozen datagrams per server node, far off any
hot path.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._packet_py import TAG_SIZE, datagram_tag
from .packet import PacketError, check_signed
from .records import PacketHeader

MAGIC = b"CHNT"
VERSION = 1
_HEADER = struct.Struct(">4sBBHQQQ")
_ENTRY = struct.Struct(">16sIBbBx")
# The same entry as a numpy record: the LB node builds a whole interval's
# hints as one array and sends slices of its bytes.
HINT_DTYPE = np.dtype([("conn_id", "S16"), ("lease_ms", ">u4"), ("source", "u1"), ("level", "i1"),
                       ("flags", "u1"), ("reserved", "u1")])
assert HINT_DTYPE.itemsize == _ENTRY.size
ANOMALY = 0x01


@dataclass(frozen=True, slots=True)
class Hint:
    conn_id: bytes  # 16 bytes, as in the publishing packet
    lease_ms: int  # the lease the LB node granted
    source: int  # LeaseSource: PREDICTED, or FALLBACK when prediction failed
    granularity_level: int  # level the LB node suggests tracking at
    anomaly: bool = False  # the connection is far outside its traffic class


def max_hints(mtu: int) -> int:
    return (mtu - _HEADER.size - TAG_SIZE) // _ENTRY.size


def hint_array(hints: Sequence[Hint]) -> np.ndarray:
    entries = np.zeros(len(hints), HINT_DTYPE)
    for i, h in enumerate(hints):
        entries[i] = (h.conn_id, h.lease_ms, h.source, h.granularity_level, ANOMALY if h.anomaly else 0, 0)
    return entries


def encode_hints(lbnode_id: int, sequence: int, timestamp_ms: int, hints: Sequence[Hint] | np.ndarray,
                 key: bytes, mtu: int = 1400) -> list[bytes]:
    """Datagrams of at most `mtu` bytes; each carries its own header and tag.

    The i-th datagram carries `sequence + i`: the receiver's replay guard
    accepts each sequence once, so every datagram needs its own (the caller
    advances its counter by len(result)). `hints`: Hint objects, or a
    HINT_DTYPE array (what the LB node builds).
    """
    entries = hints if isinstance(hints, np.ndarray) else hint_array(hints)
    per = max_hints(mtu)
    if per < 1:
        raise ValueError(f"mtu {mtu} cannot hold one hint")
    out = []
    for i, start in enumerate(range(0, max(len(entries), 1), per)):
        chunk = entries[start:start + per]
        body = bytearray(_HEADER.pack(MAGIC, VERSION, 0, len(chunk), lbnode_id, sequence + i, timestamp_ms))
        body += chunk.tobytes()
        body += datagram_tag(key, body)
        out.append(bytes(body))
    return out


def hint_count(data: bytes) -> int:
    """Entries a hint datagram carries by its header, 0 where its length disagrees
    (for counting what a refused datagram held; nothing in it is trusted)."""
    if len(data) < _HEADER.size + TAG_SIZE:
        return 0
    count = _HEADER.unpack_from(data)[3]
    return count if len(data) == _HEADER.size + count * _ENTRY.size + TAG_SIZE else 0


def decode_hints(data: bytes, key: bytes) -> tuple[PacketHeader, list[Hint]]:
    """(header with node_id = the LB node's id, hints); PacketError on anything wrong."""
    check_signed(data, key, _HEADER.size, MAGIC, VERSION, "hint datagram")
    _magic, _version, _flags, count, lbnode_id, sequence, timestamp_ms = _HEADER.unpack_from(data)
    if len(data) != _HEADER.size + count * _ENTRY.size + TAG_SIZE:
        raise PacketError("malformed", "hint count does not match the length")
    hints = []
    for i in range(count):
        conn_id, lease_ms, source, level, flags = _ENTRY.unpack_from(data, _HEADER.size + i * _ENTRY.size)
        hints.append(Hint(conn_id, lease_ms, source, level, bool(flags & ANOMALY)))
    return PacketHeader(node_id=lbnode_id, sequence=sequence, timestamp_ms=timestamp_ms, interval_ms=0), hints

