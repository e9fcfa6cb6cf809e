"""The forward envelope: a publishing datagram an LB node passes on to the slot's owner.

A server node routes each record to the owner its tier map names; while maps change (an LB
node died, joined, or has not re-read the live set yet) a record may reach a node that does
not own its slot. That node passes the whole datagram on to each owner of a record in it
(spoa/lbnode/cluster/tier.py), wrapped in this envelope with the address the datagram came
from: the owner ingests its records from it, and sends its hints to that address, straight
to the server node. A forwarded datagram is never forwarded again.

The envelope is signed with the tier's key like everything else: the address inside decides
where hints go, so it must not be forgeable. The inner datagram keeps its own tag and goes
through the same checks (HMAC, replay guard) as if it had come straight from the agent.

Format v1, big-endian (docs/publishing-packet.md §15):

  magic "CFWD" | version u8 = 1 | family u8 (4, 6, or 0: no return address, a TCP sender)
  | port u16 | address 16 B (IPv4 in the first 4) | inner datagram | tag 16 B
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from ._packet_py import TAG_SIZE, datagram_tag
from .packet import PacketError, check_signed

MAGIC = b"CFWD"
VERSION = 1
_HEADER = struct.Struct(">4sBBH16s")
OVERHEAD = _HEADER.size + TAG_SIZE


def encode_forward(datagram: bytes, sender: Any, key: bytes) -> bytes:
    """`datagram` wrapped, with `sender` (a UDP (host, port[, ...]) address, or None) as the
    address its hints go to."""
    family, port, packed = 0, 0, bytes(16)
    if isinstance(sender, tuple):
        host, port = sender[0], sender[1]
        if ":" in host:
            family, packed = 6, socket.inet_pton(socket.AF_INET6, host)
        else:
            family, packed = 4, socket.inet_pton(socket.AF_INET, host).ljust(16, b"\0")
    body = _HEADER.pack(MAGIC, VERSION, family, port, packed) + datagram
    return body + datagram_tag(key, body)


def is_forward(data: bytes) -> bool:
    return data[:4] == MAGIC


def decode_forward(data: bytes, key: bytes) -> tuple[bytes, Any]:
    """(inner datagram, the sender's address or None); PacketError on anything wrong."""
    check_signed(data, key, _HEADER.size, MAGIC, VERSION, "forward envelope")
    _magic, _version, family, port, packed = _HEADER.unpack_from(data)
    inner = data[_HEADER.size:-TAG_SIZE]
    if family == 0:
        return inner, None
    if family == 4:
        return inner, (socket.inet_ntop(socket.AF_INET, packed[:4]), port)
    if family == 6:
        return inner, (socket.inet_ntop(socket.AF_INET6, packed), port)
    raise PacketError("malformed", f"forward envelope: address family {family}")
