"""Publishing packets and hints over TCP: the same datagrams, length-prefixed.

For networks that drop or rate-limit UDP. Each message is a u32 big-endian
length then one datagram exactly as UDP would carry it (own header, own HMAC),
so both ends reuse the datagram code paths unchanged. The agent keeps one
connection per LB node and reconnects with backoff; hints come back on it.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger("spoa.stream_transport")

_LENGTH = struct.Struct(">I")
MAX_MESSAGE = 65507  # the largest datagram: anything longer is not ours


def frame(datagram: bytes) -> bytes:
    return _LENGTH.pack(len(datagram)) + datagram


class DatagramStream(asyncio.Protocol):
    """Cuts a TCP byte stream back into datagrams for `on_datagram(data, addr)`."""

    def __init__(self, on_datagram: Callable[[bytes, Any], None]) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername")

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        # Cut every whole message out, then drop them from the buffer at once:
        # deleting each from the front would move the rest of a 64 KiB read
        # once per datagram.
        pos = 0
        try:
            while len(buf) - pos >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(buf, pos)
                if length > MAX_MESSAGE:
                    log.warning("%s sent a %d-byte message: not a datagram stream, closing", self.peer, length)
                    self.transport.close()
                    buf.clear()
                    pos = 0
                    return
                start = pos + _LENGTH.size
                if len(buf) < start + length:
                    return
                pos = start + length
                self.on_datagram(bytes(buf[start:pos]), self)
        finally:
            del buf[:pos]

    def send(self, datagram: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(datagram))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class StreamClient:
    """The agent's side: one TCP connection to an LB node, reconnected on loss."""

    def __init__(self, host: str, port: int, on_datagram: Callable[[bytes, Any], None]) -> None:
        self.host, self.port = host, port
        self.on_datagram = on_datagram
        self.stream: DatagramStream | None = None
        self._task: asyncio.Task | None = None
        self.connects = 0
        self.dropped = 0  # datagrams that found no connection (the next interval resends state)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep_connected())

    async def _keep_connected(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.1
        while True:
            try:
                _, stream = await loop.create_connection(lambda: DatagramStream(self.on_datagram),
                                                         self.host, self.port)
            except OSError as exc:
                log.debug("LB node %s:%s unreachable: %s", self.host, self.port, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            self.stream = stream
            self.connects += 1
            backoff = 0.1
            while stream.transport is not None:
                await asyncio.sleep(0.1)
            self.stream = None

    def send(self, datagram: bytes) -> bool:
        if self.stream is None or self.stream.transport is None:
            self.dropped += 1
            return False
        self.stream.send(datagram)
        return True

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.stream is not None and self.stream.transport is not None:
            self.stream.transport.close()
