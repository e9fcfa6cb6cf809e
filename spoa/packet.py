"""The connection publishing packet codec: the compiled core, or its pure-Python twin.

Format: docs/publishing-packet.md. SPOA_NO_EXTENSIONS=1 forces the twin
(spoa._accel). When the extension is missing the twin is used with a
warning; it encodes 2-3.5x and decodes 3-4x slower (benchmarks/RESULTS.md).
PacketError is one class whichever twin is loaded (the compiled one imports
it from the twin).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._accel import load

_EXPORTED = ("CONN_SIZE", "DEFAULT_MTU", "HEADER_SIZE", "MAGIC", "MAX_DATAGRAM", "MIN_MTU", "OVERHEAD",
             "REASONS", "SEG_SIZE", "TAG_SIZE", "VERSION", "PacketError", "ReplayGuard", "decode_datagram",
             "encode_packet", "max_segments")

if TYPE_CHECKING:
    from ._packet_py import (
        CONN_SIZE,
        DEFAULT_MTU,
        HEADER_SIZE,
        MAGIC,
        MAX_DATAGRAM,
        MIN_MTU,
        OVERHEAD,
        REASONS,
        SEG_SIZE,
        TAG_SIZE,
        VERSION,
        PacketError,
        ReplayGuard,
        decode_datagram,
        encode_packet,
        max_segments,
    )

    IMPLEMENTATION = "python"
else:
    _impl, IMPLEMENTATION = load("_packet", "_packet_py")
    globals().update({name: getattr(_impl, name) for name in _EXPORTED})

__all__ = ["IMPLEMENTATION", *_EXPORTED]
