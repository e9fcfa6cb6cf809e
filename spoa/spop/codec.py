"""The SPOP codec: the compiled core, or its pure-Python twin (see spoa._accel)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._accel import NO_EXTENSIONS, load

if TYPE_CHECKING:
    from ._codec_py import (Frame, FrameReader, FrameWriter, Message, answer_notifies, decode_varint, encode_varint,
                            end_ack, write_ack)

    IMPLEMENTATION = "python"
else:
    _impl, IMPLEMENTATION = load("spop._codec", "spop._codec_py")
    Frame, FrameReader, FrameWriter = _impl.Frame, _impl.FrameReader, _impl.FrameWriter
    Message, decode_varint, encode_varint = _impl.Message, _impl.decode_varint, _impl.encode_varint
    # The per-message loop: NOTIFYs decoded, handlers run, ACKs written (spoa/spop/protocol.py).
    answer_notifies, write_ack, end_ack = _impl.answer_notifies, _impl.write_ack, _impl.end_ack

__all__ = [
    "IMPLEMENTATION",
    "NO_EXTENSIONS",
    "Frame",
    "FrameReader",
    "FrameWriter",
    "Message",
    "answer_notifies",
    "decode_varint",
    "encode_varint",
    "end_ack",
    "write_ack",
]
