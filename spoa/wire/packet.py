"""The connection publishing packet codec: the compiled core, or its pure-Python twin.

Format: docs/publishing-packet.md. SPOA_NO_EXTENSIONS=1 forces the twin
(spoa._accel). When the extension is missing the twin is used with a
warning; it encodes 2-3.5x and decodes 3-4x slower (benchmarks/RESULTS.md).
PacketError is one class whichever twin is loaded (the compiled one imports
it from the twin). ColumnBatch decodes datagrams into numpy columns (the
LB node's receive path, docs/publishing-packet.md §12).
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from .._accel import load
from ._packet_py import datagram_tag
from .records import PacketHeader

_EXPORTED = ("CONN_COLUMNS", "CONN_SIZE", "DEFAULT_MTU", "HEADER_SIZE", "MAGIC", "MAX_DATAGRAM", "MIN_MTU",
             "OVERHEAD", "REASONS", "SEG_COLUMNS", "SEG_SIZE", "TAG_SIZE", "VERSION", "ColumnBatch", "PacketError",
             "RecordBatch", "ReplayGuard", "decode_datagram", "encode_batch", "encode_packet", "max_segments")

if TYPE_CHECKING:
    from ._packet_py import (
        CONN_COLUMNS,
        CONN_SIZE,
        DEFAULT_MTU,
        HEADER_SIZE,
        MAGIC,
        MAX_DATAGRAM,
        MIN_MTU,
        OVERHEAD,
        REASONS,
        SEG_COLUMNS,
        SEG_SIZE,
        TAG_SIZE,
        VERSION,
        ColumnBatch,
        PacketError,
        RecordBatch,
        ReplayGuard,
        decode_datagram,
        encode_batch,
        encode_packet,
        max_segments,
    )

    IMPLEMENTATION = "python"
else:
    _impl, IMPLEMENTATION = load("wire._packet", "wire._packet_py")
    globals().update({name: getattr(_impl, name) for name in _EXPORTED})



def check_signed(data: bytes, key: bytes, header_size: int, magic: bytes, version: int, what: str) -> None:
    """The checks every signed control datagram (hints, tier map, forward envelope) starts with:
    long enough for its header and tag, its 4-byte magic, its version byte (offset 4), then its
    tag (as `datagram_tag` makes it). PacketError naming `what` and the reason otherwise."""
    if len(data) < header_size + TAG_SIZE:
        raise PacketError("truncated", f"{what} shorter than header and tag")
    if data[:4] != magic:
        raise PacketError("bad_magic", f"not a {what}")
    if data[4] != version:
        raise PacketError("bad_version", f"{what} version {data[4]}")
    if not hmac.compare_digest(datagram_tag(key, memoryview(data)[:-TAG_SIZE]), data[-TAG_SIZE:]):
        raise PacketError("bad_hmac", f"{what} tag does not verify")


def decode_datagram_columns(data: bytes, key: bytes) -> tuple[PacketHeader, int, int, ColumnBatch]:
    """decode_datagram's columnar twin: (header, datagram index, datagram count,
    a ColumnBatch of its records). Same checks and PacketErrors. A receiver
    decodes many datagrams into one batch instead (ColumnBatch.append_datagram)."""
    batch = ColumnBatch()
    header, index, count = batch.append_datagram(data, key)
    return header, index, count, batch


__all__ = ["IMPLEMENTATION", "check_signed", "decode_datagram_columns", *_EXPORTED]
