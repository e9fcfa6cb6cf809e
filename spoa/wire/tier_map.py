"""The tier map: which LB nodes are live in a tier, as an LB node tells its server nodes.

An LB node of a tier (spoa/lbnode/cluster/) sends it to every server node it hears from, on
the hint path, when its view of the live set changes and every few intervals after. The
agent computes each slot's owner from it with the same rendezvous function the LB nodes own
slots by (spoa.wire.slots.owners), so the map is the live set, not a slot table: a few dozen
bytes per LB node whatever the slot count. Of the maps it hears, the agent keeps the one
read from the store last (`view_ms`): an LB node that has not re-read the live set since a
change sends an older view, which loses.

Format v1, big-endian, one datagram (docs/publishing-packet.md §14):

  header (32 B)  magic "CMAP" | version u8 = 1 | flags u8 = 0 | count u16 (members)
                 | lbnode_id u64 (sender) | view_ms u64 (unix ms the sender read the live set)
                 | slots u32 (cluster.slots) | reserved u32 = 0
  member         node_id u64 | port u16 | host_len u8 | host (ASCII, host_len bytes)
  tag (16 B)     HMAC-SHA256 over everything before it, truncated (as packets and hints)

Members are the addresses agents send to (`cluster.advertise`). A datagram holds about 50
members at mtu 1400; a larger tier's map is one IP-fragmented datagram (maps are rare).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ._packet_py import TAG_SIZE, datagram_tag
from .packet import PacketError, check_signed

MAGIC = b"CMAP"
VERSION = 1
_HEADER = struct.Struct(">4sBBHQQII")
_MEMBER = struct.Struct(">QHB")
MAX_MEMBERS = 0xFFFF


@dataclass(frozen=True, slots=True)
class TierMap:
    lbnode_id: int  # the sender
    view_ms: int  # unix ms the sender read the live set from the store
    slots: int  # slots of the tier (cluster.slots, a power of two)
    members: tuple[tuple[int, str, int], ...]  # (node id, host, port) of each live LB node, by id

    @property
    def live(self) -> list[int]:
        return [node_id for node_id, _host, _port in self.members]


def encode_tier_map(tier_map: TierMap, key: bytes) -> bytes:
    if len(tier_map.members) > MAX_MEMBERS:
        raise ValueError(f"{len(tier_map.members)} members: at most {MAX_MEMBERS}")
    body = bytearray(_HEADER.pack(MAGIC, VERSION, 0, len(tier_map.members), tier_map.lbnode_id, tier_map.view_ms,
                                  tier_map.slots, 0))
    for node_id, host, port in tier_map.members:
        name = host.encode("ascii")
        if len(name) > 0xFF:
            raise ValueError(f"member {node_id}: host {host!r} longer than 255 bytes")
        body += _MEMBER.pack(node_id, port, len(name)) + name
    body += datagram_tag(key, body)
    return bytes(body)


def is_tier_map(data: bytes) -> bool:
    return data[:4] == MAGIC


def decode_tier_map(data: bytes, key: bytes) -> TierMap:
    """The map a datagram carries; PacketError (reasons as for packets) on anything wrong."""
    check_signed(data, key, _HEADER.size, MAGIC, VERSION, "tier map")
    _magic, _version, _flags, count, lbnode_id, view_ms, slots, _reserved = _HEADER.unpack_from(data)
    if slots < 1 or slots & (slots - 1):
        raise PacketError("malformed", f"tier map: {slots} slots is not a power of two")
    members, at, end = [], _HEADER.size, len(data) - TAG_SIZE
    for _ in range(count):
        if at + _MEMBER.size > end:
            raise PacketError("malformed", "tier map: member count does not match the length")
        node_id, port, host_len = _MEMBER.unpack_from(data, at)
        at += _MEMBER.size
        if at + host_len > end:
            raise PacketError("malformed", "tier map: member host runs past the end")
        try:
            host = data[at:at + host_len].decode("ascii")
        except UnicodeDecodeError:
            raise PacketError("malformed", "tier map: member host is not ASCII") from None
        at += host_len
        if not host or not 0 < port < 65536:
            raise PacketError("malformed", f"tier map: member {node_id} has no address")
        members.append((node_id, host, port))
    if at != end:
        raise PacketError("malformed", "tier map: bytes after the last member")
    return TierMap(lbnode_id, view_ms, slots, tuple(sorted(members)))
