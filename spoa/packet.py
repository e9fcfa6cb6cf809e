"""The connection publishing packet codec: the compiled core, or its pure-Python twin.

Format: docs/publishing-packet.md. SPOA_NO_EXTENSIONS=1 forces the twin
(aio-libs convention). When the extension is missing the twin is used with a
warning; it encodes 2-3.5x and decodes 3-4x slower (benchmarks/RESULTS.md).
PacketError is one class whichever twin is loaded (the compiled one imports
it from the twin).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

NO_EXTENSIONS = os.environ.get("SPOA_NO_EXTENSIONS", "") not in ("", "0")

if TYPE_CHECKING or NO_EXTENSIONS:
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
    try:
        from ._packet import (
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

        IMPLEMENTATION = "cython"
    except ImportError:  # pragma: no cover - exercised by the loaded-module test
        logging.getLogger(__name__).warning(
            "spoa._packet is not built; using the pure-Python packet codec (run `pip install .`)"
        )
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

__all__ = [
    "CONN_SIZE",
    "DEFAULT_MTU",
    "HEADER_SIZE",
    "IMPLEMENTATION",
    "MAGIC",
    "MAX_DATAGRAM",
    "MIN_MTU",
    "OVERHEAD",
    "REASONS",
    "SEG_SIZE",
    "TAG_SIZE",
    "VERSION",
    "PacketError",
    "ReplayGuard",
    "decode_datagram",
    "encode_packet",
    "max_segments",
]
