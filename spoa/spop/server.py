"""Listening sockets for the agent: TCP (v4/v6) and unix, with graceful stop."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat

from ..netutil import parse_address
from .agent import Agent
from .protocol import SpopProtocol

log = logging.getLogger("spoa.spop.server")


class AgentServer:
    def __init__(self, agent: Agent, listen: list[str]) -> None:
        self.agent = agent
        self.listen = [parse_address(a) for a in listen]
        self._servers: list[asyncio.AbstractServer] = []
        self._stopping = False
        self._sweeper: asyncio.TimerHandle | None = None

    def _protocol(self) -> asyncio.Protocol:
        agent = self.agent
        if self._stopping or len(agent.connections) >= agent.settings.max_connections:
            agent.stats.connections_refused += 1
            return _Refuse()
        protocol = SpopProtocol(agent)
        # Counted here, not in connection_made: asyncio accepts a whole
        # backlog before any connection_made runs.
        agent.connections.add(protocol)
        return protocol

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.listen:
            try:
                if host == "unix":
                    _remove_stale_socket(port)
                    server = await loop.create_unix_server(self._protocol, port, backlog=1024)
                else:
                    server = await loop.create_server(self._protocol, host, port, backlog=1024, reuse_address=True)
            except OSError as exc:  # say which address: there may be several
                raise OSError(exc.errno, exc.strerror or str(exc), _text(host, port)) from exc
            self._servers.append(server)
            log.info("listening on %s", ", ".join(_describe(s) for s in server.sockets))
        self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        # One timer for every connection's deadlines, not one per read.
        self._sweeper = asyncio.get_running_loop().call_later(self.agent.tick_seconds, self._sweep)

    def _sweep(self) -> None:
        try:
            self.agent.sweep()
        except Exception:  # a bug of ours must not stop the deadlines for good
            log.exception("deadline sweep failed")
        self._schedule_sweep()

    @property
    def addresses(self) -> list[str]:
        """Bound addresses (useful with port 0)."""
        return [_describe(s) for server in self._servers for s in server.sockets]

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting; each connection answers its NOTIFYs in flight, then
        says AGENT-DISCONNECT; after `grace` seconds the rest are dropped."""
        self._stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            server.close()
        for conn in list(self.agent.connections):
            conn.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.agent.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.agent.connections):
            log.warning("connection still busy after %.1fs of grace: dropped", grace)
            conn.abort()
        for server in self._servers:
            await server.wait_closed()


class _Refuse(asyncio.Protocol):
    """Over the connection limit: close at once rather than queue unbounded."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def _text(host: str, port: str | int) -> str:
    """An address as agent.listen spells it."""
    if host == "unix":
        return f"unix:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a killed agent would make bind() fail."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", f"unix:{path}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
    else:
        raise OSError(errno.EADDRINUSE, "in use by another process", f"unix:{path}")
    finally:
        probe.close()
