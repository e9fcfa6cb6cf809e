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

log = logging.getLogger("spoa.wire.stream_transport")

_LENGTH = struct.Struct(">I")
MAX_MESSAGE = 65507  # the largest datagram: anything longer is not ours


def frame(datagram: bytes) -> bytes:
    return _LENGTH.pack(len(datagram)) + datagram


class DatagramStream(asyncio.Protocol):
    """Cuts a TCP byte stream back into datagrams for `on_datagram(data, addr)`."""

    def __init__(self, on_datagram: Callable[[bytes, Any], None],
                 listener: DatagramListener | None = None) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None
        self._buf = bytearray()
        # Accepted by an LB node's listener: it times and budgets this stream.
        self._listener = listener
        self.last_read = 0.0
        self.partial_since: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername")
        if self._listener is not None:
            self.last_read = asyncio.get_running_loop().time()
            self._listener.streams.add(self)

    def data_received(self, data: bytes) -> None:
        held = len(self._buf)
        messages = self._cut(data)
        if self._listener is not None:
            self._listener.account(self, held, messages)

    @property
    def held(self) -> int:
        """Bytes of an unfinished message buffered."""
        return len(self._buf)

    def _cut(self, data: bytes) -> int:
        """Buffer `data` and deliver each whole message; returns how many."""
        buf = self._buf
        buf += data
        # Cut every whole message out, then drop them from the buffer at once:
        # deleting each from the front would move the rest of a 64 KiB read
        # once per datagram.
        pos = count = 0
        try:
            while len(buf) - pos >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(buf, pos)
                if length > MAX_MESSAGE:
                    log.warning("%s sent a %d-byte message: not a datagram stream, closing", self.peer, length)
                    self.transport.close()
                    buf.clear()
                    pos = 0
                    return count
                start = pos + _LENGTH.size
                if len(buf) < start + length:
                    return count
                pos = start + length
                count += 1
                self.on_datagram(bytes(buf[start:pos]), self)
            return count
        finally:
            del buf[:pos]

    def send(self, datagram: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(datagram))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._listener is not None:
            self._listener.forget(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._buf.clear()


class DatagramListener:
    """The LB node's TCP side: the streams it accepted, each closed when idle
    past `idle_timeout` (agents send every interval: silence means a dead
    peer) or holding an unfinished message past `message_timeout` (slow
    peers), and all their partial messages held to `max_buffered_bytes`."""

    def __init__(self, on_datagram: Callable[[bytes, Any], None], idle_timeout: float,
                 message_timeout: float, max_buffered_bytes: int) -> None:
        self.on_datagram = on_datagram
        self.idle_timeout = idle_timeout
        self.message_timeout = message_timeout
        self.max_buffered_bytes = max_buffered_bytes
        self.streams: set[DatagramStream] = set()
        self.buffered_bytes = 0
        self.idle_timeouts = 0
        self.message_timeouts = 0
        self.budget_closes = 0
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: DatagramStream(self.on_datagram, self), host, port,
                                                reuse_address=True)
        self._schedule()

    def _schedule(self) -> None:
        tick = min(1.0, self.idle_timeout / 4, self.message_timeout / 4)
        self._sweeper = asyncio.get_running_loop().call_later(tick, self.sweep)

    def account(self, stream: DatagramStream, held_before: int, messages: int) -> None:
        now = asyncio.get_running_loop().time()
        stream.last_read = now
        held = stream.held
        self.buffered_bytes += held - held_before
        if not held:
            stream.partial_since = None
        elif messages or stream.partial_since is None:
            stream.partial_since = now  # a new message began
        if held and self.buffered_bytes > self.max_buffered_bytes:
            self.budget_closes += 1
            log.warning("%s: partial messages of all TCP peers exceed lbnode.tcp_max_buffered_bytes (%d): "
                        "closing", stream.peer, self.max_buffered_bytes)
            self._drop(stream)

    def sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        for stream in list(self.streams):
            if stream.partial_since is not None and now - stream.partial_since >= self.message_timeout:
                self.message_timeouts += 1
                log.warning("%s: message unfinished after lbnode.tcp_message_timeout (%g s): closing",
                            stream.peer, self.message_timeout)
                self._drop(stream)
            elif now - stream.last_read >= self.idle_timeout:
                self.idle_timeouts += 1
                log.info("%s: nothing for lbnode.tcp_idle_timeout (%g s): closing", stream.peer,
                         self.idle_timeout)
                self._drop(stream)
        self._schedule()

    def _drop(self, stream: DatagramStream) -> None:
        self.forget(stream)
        stream.close()

    def forget(self, stream: DatagramStream) -> None:
        if stream in self.streams:
            self.streams.discard(stream)
            self.buffered_bytes -= stream.held

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for stream in list(self.streams):
            self._drop(stream)


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
