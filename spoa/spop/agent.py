"""The agent: settings, handlers and counters shared by all its connections."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from .handlers import HandlerRegistry
from .stats import AgentStats

log = logging.getLogger("spoa.spop.agent")


@dataclass(frozen=True)
class AgentSettings:
    """Protocol limits; spoa.config validates them from YAML and the CLI."""

    # Our max-frame-size; the HELLO answer is min(this, HAProxy's). 65532
    # follows a raised tune.bufsize of 64 KiB; HAProxy's default is 16380.
    max_frame_size: int = 65532
    # Async handlers pending on one connection before we stop reading it.
    max_inflight_per_connection: int = 256
    # Seconds a new connection may take to send HAPROXY-HELLO.
    hello_timeout: float = 10.0
    # Seconds an async handler may run; HAProxy stops waiting at its own
    # `timeout processing`, so longer is wasted work.
    handler_timeout: float = 5.0
    # Bound on a reassembled 2.x fragmented NOTIFY.
    max_reassembled_size: int = 1 << 20
    # Announce `async` when HAProxy (2.x) offers it; ACKs still go back on the
    # connection the NOTIFY came from, which async permits.
    allow_async: bool = True
    # Announce `fragmentation`, so 2.x sends oversize NOTIFYs in pieces
    # instead of failing them; 3.1+ ignores it.
    accept_fragments: bool = True
    # Connections beyond this are closed at once (counted).
    max_connections: int = 10000
    # Seconds a connection may stay silent after HELLO with nothing pending
    # before the agent closes it (HAProxy's `timeout idle`, 2.x, and the
    # agents backend's `timeout server`, 3.1+, are shorter and close first):
    # idle peers must not hold max_connections.
    idle_timeout: float = 120.0
    # Seconds a frame may take from its first byte to its last, and a 2.x
    # fragmented NOTIFY from its first fragment to its last (slow peers).
    frame_timeout: float = 10.0
    # Bytes of partial frames and reassemblies held across all connections;
    # the connection that would exceed it is refused (RESOURCE status).
    max_buffered_bytes: int = 256 << 20


class Agent:
    def __init__(self, settings: AgentSettings | None = None, registry: HandlerRegistry | None = None) -> None:
        self.settings = settings or AgentSettings()
        self.registry = registry or HandlerRegistry()
        self.stats = AgentStats()
        self.connections: set = set()
        # What the connections hold in partial frames (bounded by
        # settings.max_buffered_bytes), and the sweep's clock.
        self.buffered_bytes = 0
        self.ticks = 0
        self.tick_seconds = min(1.0, self.settings.idle_timeout / 4, self.settings.frame_timeout / 4)

    def sweep(self) -> None:
        """One tick of the deadline clock (the server calls it every
        tick_seconds): connections idle or stuck mid-frame are closed."""
        self.ticks += 1
        self.stats.buffered_bytes = self.buffered_bytes
        for conn in list(self.connections):
            conn.check_deadlines(self.ticks)

    def capabilities_for(self, offered: str) -> list[str]:
        """What to announce in AGENT-HELLO given HAProxy's capability list."""
        offered_set = {c.strip() for c in offered.split(",")}
        caps = []
        if "pipelining" in offered_set:
            caps.append("pipelining")
        if self.settings.allow_async and "async" in offered_set:
            caps.append("async")
        if self.settings.accept_fragments:
            caps.append("fragmentation")
        return caps

    def _handler_for(self, name: str) -> Any:
        handler = self.registry.get(name)
        if handler is None:
            # Still answered (with a no-op ACK unless a fallback sets vars).
            self.stats.unknown_messages += 1
            return self.registry.fallback
        return handler

    async def dispatch_async(self, message: Any, actions: Any) -> None:
        handler = self._handler_for(message.name)
        if handler is None:
            return
        mark = actions.mark()
        try:
            result = handler(message, actions)
            if asyncio.iscoroutine(result):
                await asyncio.wait_for(result, self.settings.handler_timeout)
        except asyncio.TimeoutError:
            self.stats.handler_timeouts += 1
            log.warning("handler for message %r timed out", message.name)
            actions.truncate(mark)
        except Exception:
            self.stats.handler_errors += 1
            log.exception("handler for message %r failed", message.name)
            actions.truncate(mark)
