"""The demo's traffic generator: a few kinds of clients, bounded, loopback only.

    stream#N  keep-alive downloads: GET /stream at a bounded rate, a few per
              connection, short pauses between them (hot segments, splits)
    chat#N    one long-lived WebSocket each (GET /chat, 101): small frames
              both ways at random intervals, now and then a pause
    poll#N    keep-alive API client: a small request every 0.3-2.5 s
              (its X-Lease shows the lease following the connection)
    short     one request per connection, Connection: close, ~N per second

Every response's X-Lease header ("duration=...;source=...;seq=...", set by
haproxy/example.cfg from the SPOE variables) is parsed and counted: that is
the lease HAProxy applied, seen from the client. The demo runs it in its own
event loop; `python -m spoa.tools.demo.loadgen --target 127.0.0.1:8080` runs it
alone (the docker compose stack does, inside HAProxy's network namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import logging
import os
import random
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from .backend import OP_CLOSE, OP_PING, OP_TEXT, ErrorTally, ws_frame, ws_read

log = logging.getLogger("spoa.tools.demo.loadgen")

LEASE_RE = re.compile(r"duration=(\d*);source=(\w*);seq=(\d*)")
MAX_CLIENTS = 32  # of each kind
MAX_SHORT_RATE = 50.0  # requests/s
MAX_SHORT_INFLIGHT = 8
IO_TIMEOUT = 15.0


def parse_lease(value: str | None) -> tuple[int, str] | None:
    """X-Lease "duration=30000;source=standard;seq=7" -> (30000, "standard"); None when absent/empty."""
    m = LEASE_RE.fullmatch(value or "")
    if not m or not m[1] or not m[2]:
        return None
    return int(m[1]), m[2]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ClientState:
    label: str
    kind: str  # stream | chat | poll | short
    local_port: int | None = None
    connected: bool = False
    connections: int = 0
    requests: int = 0
    messages: int = 0  # WebSocket frames received (chat)
    bytes_received: int = 0
    bytes_sent: int = 0
    lease_ms: int | None = None  # last X-Lease seen
    lease_source: str | None = None
    leases: Counter = field(default_factory=Counter)
    since: float = field(default_factory=time.monotonic)


@dataclass
class LoadStats(ErrorTally):
    connections: int = 0
    requests: int = 0
    responses: int = 0
    bytes_received: int = 0
    leases: Counter = field(default_factory=Counter)  # by source, from X-Lease
    leases_missing: int = 0  # responses without a usable X-Lease


class HttpConn:
    """One client connection: requests with Content-Length bodies, or an upgrade."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.local_port = writer.get_extra_info("sockname")[1]

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConn:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 20), IO_TIMEOUT)
        return cls(reader, writer)

    async def request(self, path: str, headers: dict[str, str] | None = None,
                      read_body: bool = True) -> tuple[int, dict[str, str], int]:
        lines = [f"GET {path} HTTP/1.1", "Host: demo", "User-Agent: spoa-demo-loadgen"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self.writer.drain()
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
        first, *rest = head.decode("latin-1").split("\r\n")
        status = int(first.split(" ", 2)[1])
        resp = {}
        for line in rest:
            if ":" in line:
                k, v = line.split(":", 1)
                resp[k.strip().lower()] = v.strip()
        received = 0
        if read_body and status != 101:
            left = int(resp.get("content-length", "0") or 0)
            while left > 0:
                chunk = await asyncio.wait_for(self.reader.read(min(left, 1 << 20)), IO_TIMEOUT)
                if not chunk:
                    raise ConnectionError("connection closed in the middle of a body")
                left -= len(chunk)
                received += len(chunk)
        return status, resp, received + len(head)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


class LoadGen:
    """The clients; `ports` maps each open connection's local port to its client label."""

    def __init__(self, host: str, port: int, *, streams: int = 2, chats: int = 3, polls: int = 1,
                 short_rate: float = 4.0, stream_rate: int = 1 << 20, stream_bytes: int = 2 << 20,
                 seed: int | None = None) -> None:
        if not is_loopback(host):
            raise ValueError(f"{host}: the demo traffic generator only targets loopback addresses")
        for name, n in (("streams", streams), ("chats", chats), ("polls", polls)):
            if not 0 <= n <= MAX_CLIENTS:
                raise ValueError(f"{name}: {n} is out of range [0, {MAX_CLIENTS}]")
        if not 0 <= short_rate <= MAX_SHORT_RATE:
            raise ValueError(f"short rate: {short_rate} is out of range [0, {MAX_SHORT_RATE}]")
        self.host, self.port = host, port
        self.counts = {"stream": streams, "chat": chats, "poll": polls}
        self.short_rate = short_rate
        self.stream_rate = stream_rate
        self.stream_bytes = stream_bytes
        self.rng = random.Random(seed)
        self.stats = LoadStats()
        self.clients: dict[str, ClientState] = {}
        self.ports: dict[int, str] = {}
        self.short = ClientState("short", "short")
        self._stopping = False
        self._tasks: list[asyncio.Task] = []
        self._short_tasks: set[asyncio.Task] = set()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> LoadGen:
        runners = {"stream": self._stream_client, "chat": self._chat_client, "poll": self._poll_client}
        for kind, n in self.counts.items():
            for i in range(1, n + 1):
                state = ClientState(f"{kind}#{i}", kind)
                self.clients[state.label] = state
                self._tasks.append(asyncio.create_task(self._guard(runners[kind], state)))
        if self.short_rate > 0:
            self._tasks.append(asyncio.create_task(self._short_clients()))
        return self

    async def stop(self) -> None:
        """Close every client connection (no error counted from here on)."""
        self._stopping = True
        tasks = self._tasks + list(self._short_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)

    # -- bookkeeping -------------------------------------------------------------------------
    async def _connect(self, state: ClientState) -> HttpConn:
        conn = await HttpConn.open(self.host, self.port)
        state.connected = True
        state.connections += 1
        state.local_port = conn.local_port
        state.since = time.monotonic()
        self.stats.connections += 1
        self.ports[conn.local_port] = state.label
        return conn

    async def _disconnect(self, state: ClientState, conn: HttpConn | None) -> None:
        if conn is None:
            return
        state.connected = False
        await conn.close()

    def _answered(self, state: ClientState, status: int, headers: dict[str, str], body_bytes: int) -> None:
        """Count one answered request (its body bytes) and read the lease it carries."""
        state.requests += 1
        self.stats.requests += 1
        state.bytes_received += body_bytes
        self.stats.bytes_received += body_bytes
        self.stats.responses += 1
        if status not in (200, 101):
            self.stats.error(f"{state.label}: HTTP {status}")
        lease = parse_lease(headers.get("x-lease"))
        if lease is None:
            self.stats.leases_missing += 1
            if "x-lease-error" in headers:
                self.stats.error(f"{state.label}: SPOE error {headers['x-lease-error']}")
            return
        state.lease_ms, state.lease_source = lease
        state.leases[lease[1]] += 1
        self.stats.leases[lease[1]] += 1

    async def _guard(self, runner, state: ClientState) -> None:
        """Run a client forever; an error is counted, then it reconnects after a pause."""
        while not self._stopping:
            try:
                await runner(state)
            except asyncio.CancelledError:
                return
            except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                if self._stopping:
                    return
                self.stats.error(f"{state.label}: {type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)

    # -- the clients -----------------------------------------------------------------------------
    async def _stream_client(self, state: ClientState) -> None:
        conn = await self._connect(state)
        try:
            for _ in range(self.rng.randint(3, 6)):
                size = int(self.stream_bytes * self.rng.uniform(0.5, 1.5))
                status, headers, n = await conn.request(f"/stream?bytes={size}&rate={self.stream_rate}")
                self._answered(state, status, headers, n)
                await asyncio.sleep(self.rng.uniform(0.3, 2.0))
        finally:
            await self._disconnect(state, conn)

    async def _poll_client(self, state: ClientState) -> None:
        conn = await self._connect(state)
        try:
            for _ in range(self.rng.randint(20, 40)):
                status, headers, n = await conn.request(f"/api?size={self.rng.randint(64, 2048)}")
                self._answered(state, status, headers, n)
                await asyncio.sleep(self.rng.uniform(0.3, 2.5))
        finally:
            await self._disconnect(state, conn)

    async def _chat_client(self, state: ClientState) -> None:
        conn = await self._connect(state)
        talker = None
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            status, headers, n = await conn.request("/chat", {"Connection": "Upgrade", "Upgrade": "websocket",
                                                              "Sec-WebSocket-Key": key,
                                                              "Sec-WebSocket-Version": "13"})
            self._answered(state, status, headers, 0)  # the upgrade: chat bytes are counted as frames
            if status != 101:
                raise ConnectionError(f"chat upgrade answered {status}")
            talker = asyncio.create_task(self._chat_talk(state, conn))
            until = time.monotonic() + self.rng.uniform(40, 90)  # then reconnect
            while time.monotonic() < until:
                opcode, payload = await asyncio.wait_for(ws_read(conn.reader), 60)
                if opcode == OP_CLOSE:
                    raise ConnectionError("chat closed by the server")
                if opcode == OP_PING:
                    conn.writer.write(ws_frame(payload, 0xA, masked=True))
                state.messages += 1
                state.bytes_received += len(payload) + 2
                self.stats.bytes_received += len(payload) + 2
            conn.writer.write(ws_frame(b"\x03\xe8", OP_CLOSE, masked=True))
            await conn.writer.drain()
        finally:
            if talker is not None:
                talker.cancel()
                await asyncio.gather(talker, return_exceptions=True)
            await self._disconnect(state, conn)

    async def _chat_talk(self, state: ClientState, conn: HttpConn) -> None:
        n = 0
        while True:
            await asyncio.sleep(self.rng.uniform(0.5, 4.0))
            n += 1
            frame = ws_frame(json.dumps({"n": n, "text": "y" * self.rng.randint(8, 120)}).encode(), OP_TEXT,
                             masked=True)
            conn.writer.write(frame)
            await conn.writer.drain()
            state.bytes_sent += len(frame)

    async def _short_clients(self) -> None:
        slots = asyncio.Semaphore(MAX_SHORT_INFLIGHT)
        while not self._stopping:
            await asyncio.sleep(self.rng.expovariate(self.short_rate))
            if slots.locked():
                continue  # bounded: skip rather than queue
            await slots.acquire()
            task = asyncio.create_task(self._one_short(slots))
            self._short_tasks.add(task)
            task.add_done_callback(self._short_tasks.discard)

    async def _one_short(self, slots: asyncio.Semaphore) -> None:
        state = self.short
        conn = None
        try:
            conn = await HttpConn.open(self.host, self.port)
            state.connections += 1
            self.stats.connections += 1
            self.ports[conn.local_port] = "short"
            status, headers, n = await conn.request(f"/?size={self.rng.randint(16, 4096)}", {"Connection": "close"})
            self._answered(state, status, headers, n)
        except asyncio.CancelledError:
            pass
        except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
            if not self._stopping:
                self.stats.error(f"short: {type(exc).__name__}: {exc}")
        finally:
            slots.release()
            if conn is not None:
                await conn.close()

    # -- report --------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        s = self.stats
        return {"connections": s.connections, "requests": s.requests, "responses": s.responses,
                "bytes_received": s.bytes_received, "leases": dict(s.leases), "leases_missing": s.leases_missing,
                "errors": s.errors, "last_errors": list(s.last_errors)}


# -- alone -------------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m spoa.tools.demo.loadgen",
                                     description="The demo's traffic generator (loopback targets only).")
    parser.add_argument("--target", default="127.0.0.1:8080", metavar="HOST:PORT",
                        help="HAProxy's HTTP frontend (loopback; default 127.0.0.1:8080)")
    parser.add_argument("--duration", type=float, default=0, metavar="SECONDS", help="0: until SIGTERM/Ctrl-C")
    parser.add_argument("--streams", type=int, default=2, help="keep-alive download clients (default 2)")
    parser.add_argument("--chats", type=int, default=3, help="WebSocket chat clients (default 3)")
    parser.add_argument("--polls", type=int, default=1, help="keep-alive API clients (default 1)")
    parser.add_argument("--short-rate", type=float, default=4.0, metavar="PER_S",
                        help="one-request connections per second (default 4)")
    parser.add_argument("--stream-rate", type=int, default=1 << 20, metavar="BYTES_PER_S",
                        help="download rate per stream (default 1 MiB/s)")
    parser.add_argument("--seed", type=int, help="random seed (default: random)")
    parser.add_argument("--report-every", type=float, default=5.0, metavar="SECONDS")
    return parser


async def _run_alone(args, host: str, port: int) -> dict:
    gen = LoadGen(host, port, streams=args.streams, chats=args.chats, polls=args.polls,
                  short_rate=args.short_rate, stream_rate=args.stream_rate, seed=args.seed).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    deadline = loop.time() + args.duration if args.duration > 0 else None
    while not stop.is_set():
        timeout = args.report_every if deadline is None else min(args.report_every, deadline - loop.time())
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, timeout))
        except asyncio.TimeoutError:
            pass
        if deadline is not None and loop.time() >= deadline:
            break
        s = gen.stats
        print(f"loadgen: {s.connections} connections, {s.requests} requests, leases {dict(s.leases)}, "
              f"errors {s.errors}", flush=True)
    await gen.stop()
    return gen.snapshot()


def main(argv: list[str] | None = None) -> int:
    from ...netutil import parse_address

    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        host, port = parse_address(args.target)
        if host == "unix":
            raise ValueError("--target needs HOST:PORT")
        LoadGen(host, int(port), streams=args.streams, chats=args.chats, polls=args.polls,
                short_rate=args.short_rate)  # validate before starting
    except ValueError as exc:
        print(f"spoa.tools.demo.loadgen: {exc}", file=sys.stderr)
        return 2
    summary = asyncio.run(_run_alone(args, host, int(port)))
    print(json.dumps(summary), flush=True)
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
