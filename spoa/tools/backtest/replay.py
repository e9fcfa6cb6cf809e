"""Live replay: a trace's per-connection time/byte pattern as real TCP connections through HAProxy.

For every trace connection, one keep-alive TCP connection to HAProxy's HTTP
frontend (loopback): it opens in its first interval, sends one small request
in each *active* interval asking the backend for that interval's bytes
(``/stream?bytes=N`` of the test application, ``tests/e2e/harness.py``), stays
silent in idle intervals and closes in its last interval. What the kernel sees
on HAProxy's client socket is then active exactly in the trace's active
intervals, which is what the server node's cadence (``SegmentTracker.set_hint``: quiet
or not) and the LB node's activity policy (traffic or not per interval) react
to. Byte *counts* are not reproduced exactly: the request line and the
response headers add a few hundred bytes, and a body is capped at
``max_bytes`` (a bulk interval of several MB would not fit in one short
interval on a busy CI machine). Policies that only look at whether an interval
carried traffic (``activity``) are unaffected; volume-driven ones are not.

Timing: interval ``k`` is ``[origin + k*I, origin + (k+1)*I)`` (wall clock,
``I = interval_ms / speed``). The request of an active interval goes out at
``request_at`` of the interval and must be answered before ``late_at``; the
connection closes at ``close_at`` of its last interval. With ``origin`` on the
server node's tick (its interval boundary), each trace interval lands inside
one server-node interval, so the server node reports interval ``k`` at
``origin + (k+1)*I`` exactly as :func:`spoa.tools.backtest.simulate.simulate` models
it.

:func:`seeded_trace` builds the small bounded synthetic trace the end-to-end
test replays (every connection closes; each starts with an active interval,
since HAProxy registers a connection with the agent at its first request).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from .synthetic import from_series, generate
from .traces import Connections

__all__ = ["ConnPlan", "ReplayStats", "plan", "replay", "seeded_trace"]

REPLAY_MIX = {"onoff": 0.35, "bulk": 0.15, "keepalive": 0.2, "http_keepalive": 0.3}


@dataclass(frozen=True)
class ConnPlan:
    index: int
    start: int  # first interval
    end: int  # last interval
    requests: tuple[tuple[int, int], ...]  # (interval, body bytes asked for)


@dataclass
class ReplayStats:
    connections: int = 0
    requests: int = 0
    bytes_asked: int = 0
    bytes_received: int = 0
    errors: list = field(default_factory=list)
    late: int = 0  # answers that came after late_at of their interval (could spill into the next)
    max_lag_ms: float = 0.0  # worst answer time after its interval's start
    peak_concurrency: int = 0
    seconds: float = 0.0


def seeded_trace(n: int = 30, seed: int = 3, interval_ms: int = 200, arrivals_s: float = 4.0,
                 horizon: int = 50, mix: dict | None = None) -> Connections:
    """A small seeded synthetic trace fit for a bounded live replay.

    ``synthetic.generate`` with ``mix`` (default: on/off, bulk, keep-alive
    pings, HTTP keep-alive; no ``chatty``, whose first interval may be idle),
    connections arriving over ``arrivals_s``, each clipped at ``horizon``
    intervals after the trace start and closing there at the latest (so
    nothing outlives the replay). One traffic class, as HAProxy's single HTTP
    frontend is one class on the LB node.
    """
    src = generate(n=n, seed=seed, duration_s=arrivals_s, interval_ms=interval_ms,
                   mix=mix or REPLAY_MIX, name=f"replay-n{n}-s{seed}")
    series, starts = [], []
    for i in range(len(src)):
        s = src.series(i)
        start = int(src.start[i])
        if start >= horizon:
            continue
        y = (s["bytes_in"] + s["bytes_out"])[: horizon - start]
        if y.size == 0 or y[0] <= 0:
            raise ValueError(f"connection {i} does not start active: cannot be registered at its first interval")
        series.append(y)
        starts.append(start)
    return from_series(series, interval_ms=interval_ms, starts=starts, name=f"replay-n{n}-s{seed}-h{horizon}")


def plan(connections: Connections, max_bytes: int = 65536) -> list[ConnPlan]:
    """Per connection: when it opens/closes and what each active interval asks for."""
    out = []
    for i in range(len(connections)):
        s = connections.series(i)
        y_out = s["bytes_out"]
        y = s["bytes_in"] + y_out
        reqs = tuple((int(k), int(min(max(int(b), 1), max_bytes)))
                     for k, b, tot in zip(s["k"], y_out, y) if tot > 0)
        out.append(ConnPlan(i, int(connections.start[i]), int(connections.end[i]), reqs))
    return out


def _peak(plans: list[ConnPlan]) -> int:
    ev = sorted([(p.start, 1) for p in plans] + [(p.end + 1, -1) for p in plans])
    cur = peak = 0
    for _, d in ev:
        cur += d
        peak = max(peak, cur)
    return peak


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return len(head) + length


async def _replay(plans, host, port, origin_mono, interval_s, request_at, late_at, close_at, path,
                  stats: ReplayStats) -> None:
    loop = asyncio.get_running_loop()

    async def until(t: float) -> None:
        delay = t - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def one(p: ConnPlan) -> None:
        await until(origin_mono + (p.start + request_at) * interval_s)
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            stats.errors.append(f"conn {p.index}: connect: {exc}")
            return
        try:
            for k, n in p.requests:
                t0 = origin_mono + k * interval_s
                await until(t0 + request_at * interval_s)
                writer.write(f"GET {path.format(n=n)} HTTP/1.1\r\nHost: replay\r\n\r\n".encode())
                await writer.drain()
                got = await _read_response(reader)  # (not `+= await`: that would lose concurrent updates)
                stats.bytes_received += got
                stats.requests += 1
                stats.bytes_asked += n
                lag = loop.time() - t0
                stats.max_lag_ms = max(stats.max_lag_ms, lag * 1000.0)
                if lag > late_at * interval_s:
                    stats.late += 1
            await until(origin_mono + (p.end + close_at) * interval_s)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            stats.errors.append(f"conn {p.index}: {type(exc).__name__}: {exc}")
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    await asyncio.gather(*(one(p) for p in plans))


def replay(connections: Connections, http_port: int, *, origin: float | None = None, speed: float = 1.0,
           host: str = "127.0.0.1", request_at: float = 0.15, late_at: float = 0.8, close_at: float = 0.55,
           max_bytes: int = 65536, max_concurrency: int = 256,
           path: str = "/stream?bytes={n}&rate=0") -> ReplayStats:
    """Replay ``connections`` through HAProxy's HTTP frontend at ``host:http_port``.

    ``origin``: wall-clock time (``time.time()``) at which trace interval 0
    starts; align it with the server node's tick. Default: half a second from
    now. ``speed`` > 1 compresses time (the agent's and LB node's interval
    must then be ``interval_ms / speed``). Blocks until the last connection
    closed. Loopback and at most ``max_concurrency`` simultaneous connections
    (a trace needing more is refused rather than distorted).
    """
    if speed <= 0:
        raise ValueError("speed must be > 0")
    if not 0.0 <= request_at < late_at < 1.0 or not request_at <= close_at < 1.0:
        raise ValueError("need 0 <= request_at < late_at < 1 and request_at <= close_at < 1")
    plans = plan(connections, max_bytes)
    stats = ReplayStats(connections=len(plans), peak_concurrency=_peak(plans))
    if stats.peak_concurrency > max_concurrency:
        raise ValueError(f"trace needs {stats.peak_concurrency} simultaneous connections (> {max_concurrency})")
    interval_s = connections.interval_ms / 1000.0 / speed
    if origin is None:
        origin = time.time() + 0.5
    started = time.perf_counter()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        origin_mono = loop.time() + (origin - time.time())
        await _replay(plans, host, http_port, origin_mono, interval_s, request_at, late_at, close_at, path, stats)

    asyncio.run(main())
    stats.seconds = time.perf_counter() - started
    return stats


def aligned_origin(tick_wall_s: float, interval_ms: int, lead_s: float = 0.5, speed: float = 1.0) -> float:
    """The first server-node tick at least ``lead_s`` from now, given one observed tick time."""
    interval_s = interval_ms / 1000.0 / speed
    now = time.time()
    n = int(np.ceil((now + lead_s - tick_wall_s) / interval_s))
    return tick_wall_s + n * interval_s
