"""The SPOP codec: the compiled core, or its pure-Python twin.

SPOA_NO_EXTENSIONS=1 forces the twin (aio-libs convention). When the
extension is missing the twin is used with a warning: it is about 10x slower,
and tests/test_codec_twins.py::test_compiled_codec_loaded fails in CI.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

NO_EXTENSIONS = os.environ.get("SPOA_NO_EXTENSIONS", "") not in ("", "0")

if TYPE_CHECKING or NO_EXTENSIONS:
    from ._codec_py import Frame, FrameReader, FrameWriter, Message, decode_varint, encode_varint

    IMPLEMENTATION = "python"
else:
    try:
        from ._codec import Frame, FrameReader, FrameWriter, Message, decode_varint, encode_varint

        IMPLEMENTATION = "cython"
    except ImportError:  # pragma: no cover - exercised by the loaded-module test
        logging.getLogger(__name__).warning(
            "spoa._codec is not built; using the pure-Python codec (run `pip install .`)"
        )
        from ._codec_py import Frame, FrameReader, FrameWriter, Message, decode_varint, encode_varint

        IMPLEMENTATION = "python"

__all__ = [
    "IMPLEMENTATION",
    "Frame",
    "FrameReader",
    "FrameWriter",
    "Message",
    "decode_varint",
    "encode_varint",
]
