"""The demo's application, behind HAProxy: three kinds of traffic.

    GET /stream?bytes=N&rate=R   N bytes at R bytes/s (a download; bounded below)
    GET /chat  + Upgrade: websocket
                                 101, then a real WebSocket: the server trickles small
                                 text frames at random intervals (now and then a pause
                                 of a few seconds) and acknowledges each client frame
    GET /<anything else>         a short response ("ok", or ?size= bytes up to 64 KiB)

HTTP/1.1 keep-alive on asyncio streams, no dependency. The demo runs it in its
own event loop; `python -m spoa.tools.demo.backend --listen 0.0.0.0:8081` runs it
alone (the docker compose stack does).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import logging
import os
import random
import signal
import struct
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("spoa.tools.demo.backend")

MAX_STREAM_BYTES = 256 << 20
MAX_RATE = 32 << 20  # bytes/s: the demo shows leases, not throughput
DEFAULT_RATE = 1 << 20
MAX_SHORT_SIZE = 64 << 10
MAX_HEAD = 64 << 10
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# -- WebSocket framing (RFC 6455), just what the demo needs --------------------------

OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA


def ws_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def ws_frame(payload: bytes, opcode: int = OP_TEXT, masked: bool = False) -> bytes:
    """One final frame; clients must mask, servers must not."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack(">Q", n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(payload))


async def ws_read(reader: asyncio.StreamReader, max_size: int = 1 << 20) -> tuple[int, bytes]:
    """(opcode, payload) of the next frame; IncompleteReadError at EOF."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack(">H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack(">Q", await reader.readexactly(8))
    if n > max_size:
        raise ValueError(f"WebSocket frame of {n} bytes")
    mask = await reader.readexactly(4) if b1 & 0x80 else None
    payload = await reader.readexactly(n)
    if mask:
        payload = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    return b0 & 0x0F, payload


def chat_gap(rng: random.Random) -> float:
    """Seconds before the next chat message: mostly short, sometimes a pause."""
    if rng.random() < 0.1:
        return rng.uniform(3.0, 6.0)
    return rng.uniform(0.1, 1.5)


# -- HTTP ------------------------------------------------------------------------------


@dataclass
class ErrorTally:
    """Errors counted, the first few kept for the summary."""

    errors: int = 0
    last_errors: list = field(default_factory=list)

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.last_errors) < 10:
            self.last_errors.append(text)


@dataclass
class BackendStats(ErrorTally):
    requests: int = 0
    streams: int = 0
    chats: int = 0
    chat_messages: int = 0
    bytes_sent: int = 0


def _response(status: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Backend:
    """The HTTP server; `await start()` then `port` is the bound port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, seed: int | None = None) -> None:
        self.host = host
        self.port = port
        self.rng = random.Random(seed)
        self.stats = BackendStats()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> Backend:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, backlog=1024,
                                                  limit=MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the client (HAProxy) closed an idle connection
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                if int(headers.get("content-length", "0") or 0):
                    await reader.readexactly(int(headers["content-length"]))
                self.stats.requests += 1
                url = urlsplit(target)
                query = parse_qs(url.query)
                if url.path == "/chat" and "websocket" in headers.get("upgrade", "").lower():
                    await self._chat(reader, writer, headers)
                    return
                if url.path == "/stream":
                    await self._stream(writer, query)
                else:
                    size = min(int(query.get("size", ["3"])[0]), MAX_SHORT_SIZE)
                    body = b"ok\n" if size == 3 else b"x" * size
                    writer.write(_response("200 OK", {"Content-Type": "text/plain",
                                                      "Content-Length": str(len(body))}, body))
                    self.stats.bytes_sent += len(body)
                    await writer.drain()
                if "close" in headers.get("connection", "").lower():
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except Exception as exc:  # a bug here must show in the demo's summary
            self.stats.error(f"backend: {type(exc).__name__}: {exc}")
            log.exception("backend request failed")
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _stream(self, writer: asyncio.StreamWriter, query: dict) -> None:
        size = max(0, min(int(query.get("bytes", ["1048576"])[0]), MAX_STREAM_BYTES))
        rate = int(query.get("rate", [str(DEFAULT_RATE)])[0]) or DEFAULT_RATE
        rate = min(rate, MAX_RATE)
        self.stats.streams += 1
        writer.write(_response("200 OK", {"Content-Type": "application/octet-stream",
                                          "Content-Length": str(size)}))
        chunk = b"x" * max(1024, min(64 << 10, rate // 20))  # ~50 ms of data per write
        started = time.monotonic()
        sent = 0
        while sent < size:
            n = min(len(chunk), size - sent)
            writer.write(chunk[:n])
            await writer.drain()
            sent += n
            self.stats.bytes_sent += n
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)

    async def _chat(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict) -> None:
        self.stats.chats += 1
        accept = ws_accept(headers.get("sec-websocket-key", ""))
        writer.write(_response("101 Switching Protocols", {"Upgrade": "websocket", "Connection": "Upgrade",
                                                           "Sec-WebSocket-Accept": accept}))
        await writer.drain()
        talker = asyncio.create_task(self._chat_talk(writer))
        try:
            received = 0
            while True:
                opcode, payload = await ws_read(reader)
                if opcode == OP_CLOSE:
                    writer.write(ws_frame(payload[:2], OP_CLOSE))
                    await writer.drain()
                    return
                if opcode == OP_PING:
                    writer.write(ws_frame(payload, OP_PONG))
                elif opcode == OP_TEXT:
                    received += 1
                    ack = json.dumps({"ack": received, "len": len(payload)}).encode()
                    writer.write(ws_frame(ack))
                    self.stats.bytes_sent += len(ack)
                await writer.drain()
        finally:
            talker.cancel()
            await asyncio.gather(talker, return_exceptions=True)

    async def _chat_talk(self, writer: asyncio.StreamWriter) -> None:
        seq = 0
        try:
            while True:
                await asyncio.sleep(chat_gap(self.rng))
                seq += 1
                message = json.dumps({"seq": seq, "ts": round(time.time(), 3),
                                      "text": "x" * self.rng.randint(16, 240)}).encode()
                writer.write(ws_frame(message))
                await writer.drain()
                self.stats.chat_messages += 1
                self.stats.bytes_sent += len(message)
        except (ConnectionError, asyncio.CancelledError):
            pass


# -- alone -------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m spoa.tools.demo.backend",
                                     description="The demo's backend: /stream, /chat (WebSocket), short HTTP.")
    parser.add_argument("--listen", default="127.0.0.1:8081", metavar="HOST:PORT",
                        help="TCP address to serve on (default 127.0.0.1:8081)")
    parser.add_argument("--seed", type=int, help="seed of the chat timing (default: random)")
    return parser


async def _serve_forever(host: str, port: int, seed: int | None) -> None:
    backend = await Backend(host, port, seed).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("demo backend ready on %s:%d", host, backend.port)
    await stop.wait()
    await backend.stop()
    log.info("stopped: %s", backend.stats)


def main(argv: list[str] | None = None) -> int:
    from ...netutil import parse_address

    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = parse_address(args.listen)
    if host == "unix":
        print("spoa.tools.demo.backend: --listen needs HOST:PORT", file=sys.stderr)
        return 2
    asyncio.run(_serve_forever(host, int(port), args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
