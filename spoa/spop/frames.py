"""Whole frames composed from a FrameWriter's primitives.

Cold paths (handshakes, disconnects, the test client's NOTIFY) live here once,
for both codec twins; the hot ACK path is the writer's own set_var/unset_var.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .constants import FLAG_FIN, SPOP_VERSION, DataType, FrameType


def write_agent_hello(w: Any, max_frame_size: int, capabilities: Iterable[str]) -> int:
    """AGENT-HELLO with the exact keys HAProxy 3.1+'s health check demands."""
    w.begin_frame(FrameType.AGENT_HELLO, 0, 0)
    w.put_name("version")
    w.put_typed_as(DataType.STRING, SPOP_VERSION)
    w.put_name("max-frame-size")
    w.put_typed_as(DataType.UINT32, max_frame_size)
    w.put_name("capabilities")
    w.put_typed_as(DataType.STRING, ",".join(capabilities))
    return w.end_frame()


def write_disconnect(w: Any, ftype: int, status: int, message: str) -> int:
    """AGENT-DISCONNECT (or HAPROXY-DISCONNECT for the test client)."""
    # HAProxy 2.x rejects a DISCONNECT message longer than 255 bytes.
    w.begin_frame(ftype, 0, 0)
    w.put_name("status-code")
    w.put_typed_as(DataType.UINT32, status)
    w.put_name("message")
    w.put_typed_as(DataType.STRING, message.encode("utf-8", "surrogateescape")[:255].decode("utf-8", "ignore"))
    return w.end_frame()


def write_haproxy_hello(
    w: Any,
    max_frame_size: int,
    capabilities: str,
    healthcheck: bool = False,
    engine_id: str | None = None,
    versions: str = SPOP_VERSION,
) -> int:
    """HAPROXY-HELLO as HAProxy builds it (for the test client and benchmarks)."""
    w.begin_frame(FrameType.HAPROXY_HELLO, 0, 0)
    w.put_name("supported-versions")
    w.put_typed_as(DataType.STRING, versions)
    w.put_name("max-frame-size")
    w.put_typed_as(DataType.UINT32, max_frame_size)
    w.put_name("capabilities")
    w.put_typed_as(DataType.STRING, capabilities)
    if healthcheck:
        w.put_name("healthcheck")
        w.put_typed_as(DataType.BOOL, True)
    if engine_id is not None:
        w.put_name("engine-id")
        w.put_typed_as(DataType.STRING, engine_id)
    return w.end_frame()


def write_notify(
    w: Any,
    stream_id: int,
    frame_id: int,
    messages: Iterable[tuple[str, Iterable[tuple[str, Any]]]],
    flags: int = FLAG_FIN,
) -> int:
    """NOTIFY carrying (name, [(arg, value), ...]) messages."""
    w.begin_frame(FrameType.NOTIFY, stream_id, frame_id, flags)
    for name, args in messages:
        args = list(args)
        w.put_name(name)
        w.put_uint8(len(args))
        for arg, value in args:
            w.put_name(arg)
            w.put_typed(value)
    return w.end_frame()
