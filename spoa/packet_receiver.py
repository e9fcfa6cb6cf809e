"""UDP receiver for connection publishing packets (the LB node side).

PacketReceiver is an asyncio DatagramProtocol: every datagram is decoded and
HMAC-verified (spoa.packet.decode_datagram, which checks the HMAC before it
parses any record), then replay-checked (ReplayGuard), and only then handed
to `callback(header, records, addr)`. Each datagram is self-contained, so the
callback sees each one on its own; header.sequence groups the datagrams of
one logical packet.

Nothing escapes datagram_received: PacketErrors are counted by reason in
`rejected`; any other exception while decoding is a bug in the codec, counted
as "malformed" and logged with its traceback; an exception raised by the
callback is counted in `callback_errors` and logged (the datagram was valid).

Pure Python on purpose: this is I/O glue around the compiled codec.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .packet import REASONS, PacketError, ReplayGuard, decode_datagram
from .records import ConnectionRecord, PacketHeader

log = logging.getLogger("spoa.packet_receiver")

# callback(header, records, addr): addr is the sender, where hints go back.
Callback = Callable[[PacketHeader, list[ConnectionRecord], Any], Any]

# Rejected datagrams are logged at debug level, at most this often per reason,
# so a flood of garbage cannot flood the log.
LOG_EVERY_S = 10.0


class PacketReceiver(asyncio.DatagramProtocol):
    """Decode, verify, replay-check and dispatch publishing datagrams."""

    def __init__(
        self,
        key: bytes,
        callback: Callback,
        *,
        replay_guard: ReplayGuard | None = None,
        window: int = 64,
        max_nodes: int = 4096,
    ) -> None:
        try:  # refuse a bad key now (TypeError/ValueError), not on every datagram
            decode_datagram(b"", key)
        except PacketError:
            pass  # the key passed; only the empty datagram was refused
        self.key = key
        self.callback = callback
        self.guard = replay_guard if replay_guard is not None else ReplayGuard(window, max_nodes)
        self.accepted = 0  # datagrams that passed every check (callback called)
        self.records = 0  # connection records in accepted datagrams
        self.rejected: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.callback_errors = 0
        self.transport: asyncio.DatagramTransport | None = None
        self._last_log: dict[str, float] = {}

    # -- asyncio.DatagramProtocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def error_received(self, exc: Exception) -> None:
        # ICMP errors on a receive-only socket are noise; note them and go on.
        log.debug("socket error: %s", exc)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            header, index, _count, records = decode_datagram(data, self.key)
            self.guard.check(header, index)
        except PacketError as exc:
            self._reject(exc.reason, addr, str(exc))
            return
        except Exception:  # a codec bug: never let it kill the endpoint
            self._reject("malformed", addr, "unexpected error while decoding", exc_info=True)
            return
        self.accepted += 1
        self.records += len(records)
        try:
            self.callback(header, records, addr)
        except Exception:
            self.callback_errors += 1
            log.exception("packet callback failed on node %s sequence %s", header.node_id, header.sequence)

    # -- counters ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (for metrics and tests)."""
        return {
            "accepted": self.accepted,
            "records": self.records,
            "rejected": dict(self.rejected),
            "callback_errors": self.callback_errors,
            "nodes": len(self.guard),
        }

    def _reject(self, reason: str, addr: Any, detail: str, exc_info: bool = False) -> None:
        self.rejected[reason] += 1
        if exc_info:
            log.error("datagram from %s rejected (%s)", addr, detail, exc_info=True)
            return
        now = time.monotonic()
        if now - self._last_log.get(reason, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last_log[reason] = now
            log.debug("datagram from %s rejected: %s (%d so far)", addr, detail, self.rejected[reason])


async def open_receiver(
    host: str,
    port: int,
    key: bytes,
    callback: Callback,
    **kwargs: Any,
) -> tuple[asyncio.DatagramTransport, PacketReceiver]:
    """Bind a UDP socket on (host, port) and serve a PacketReceiver on it.

    Port 0 picks a free port: transport.get_extra_info("sockname"). Extra
    keyword arguments go to PacketReceiver (replay_guard, window, max_nodes).
    """
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: PacketReceiver(key, callback, **kwargs), local_addr=(host, port)
    )
    return transport, protocol  # type: ignore[return-value]
