"""UDP receiver for connection publishing packets (the LB node side).

PacketReceiver is an asyncio DatagramProtocol: every datagram is decoded and
HMAC-verified (spoa.wire.packet.decode_datagram, which checks the HMAC before it
parses any record), then replay-checked (ReplayGuard), and only then handed
to `callback(header, records, addr)`. Each datagram is self-contained, so the
callback sees each one on its own; header.sequence groups the datagrams of
one logical packet.

Nothing escapes datagram_received: PacketErrors are counted by reason in
`rejected`; any other exception while decoding is a bug in the codec, counted
as "malformed" and logged with its traceback; an exception raised by the
callback is counted in `callback_errors` and logged (the datagram was valid).

BatchReceiver (the LB node's) runs the same checks, counting and logging,
but decodes every accepted datagram into one ColumnBatch (spoa.wire.packet) and
hands the whole batch to `on_batch(batch)` once per event-loop turn, or as
soon as it holds `flush_records` records, or when `flush()` is called (the
LB node does before each interval's end). A replayed datagram is taken back
out of the batch. Per-datagram Python work is the decode call and the replay
check; everything per record happens in the compiled codec, then in numpy.

A turn: open_batch_receiver's UDP socket is drained (recvfrom until it would
block, at most DRAIN_DATAGRAMS) each time the loop finds it readable, then
flushed: asyncio's datagram transport reads one datagram per loop iteration,
which would make every batch a single datagram (8 records at mtu 1400) and
cost a select() per datagram. Datagrams that come through datagram_received
(the TCP option's streams) schedule a loop.call_soon flush instead.

Pure Python on purpose: this is I/O glue around the compiled codec.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from ..wire.forward import decode_forward, is_forward
from ..wire.packet import MAX_DATAGRAM, REASONS, ColumnBatch, PacketError, ReplayGuard, decode_datagram
from ..wire.records import ConnectionRecord, HeaderFlags, PacketHeader

log = logging.getLogger("spoa.lbnode.packet_receiver")

# callback(header, records, addr): addr is the sender, where hints go back.
Callback = Callable[[PacketHeader, list[ConnectionRecord], Any], Any]

# BatchReceiver's flush threshold: records per batch handed over at most
# (bounds the latency a long burst within one event-loop turn adds).
FLUSH_RECORDS = 8192
# Datagrams read per readiness of the UDP socket at most, so that a flood
# cannot starve the rest of the event loop (the interval timer, TCP streams).
DRAIN_DATAGRAMS = 512

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


class BatchReceiver(PacketReceiver):
    """Decode, verify and replay-check publishing datagrams into one ColumnBatch;
    `on_datagram(header, addr)` per accepted datagram, `on_batch(batch)` per
    flush (the batch is cleared after it returns).

    In a tier, a datagram may come wrapped in a forward envelope (spoa.wire.forward) from
    another LB node: it is unwrapped (its tag checked) and taken as if it came from the
    address inside, the server node's. Until each flush, `routed` lists the datagrams whose
    sender routed them here by its tier map and that were not forwarded already, as
    (datagram, sender, first record, end record) in the batch: what the tier forwards
    when records of them belong to another node.
    """

    def __init__(
        self,
        key: bytes,
        on_batch: Callable[[Any], Any],
        on_datagram: Callable[[PacketHeader, Any], Any] | None = None,
        *,
        batch: Any = None,
        flush_records: int = FLUSH_RECORDS,
        replay_guard: ReplayGuard | None = None,
        window: int = 64,
        max_nodes: int = 4096,
    ) -> None:
        super().__init__(key, on_datagram, replay_guard=replay_guard, window=window, max_nodes=max_nodes)
        self.on_batch = on_batch
        self.batch = batch if batch is not None else ColumnBatch()
        self.flush_records = flush_records
        self.flushes = 0  # batches handed to on_batch
        self.forwarded_in = 0  # datagrams accepted from another LB node's forward envelope
        self.routed: list[tuple[bytes, Any, int, int]] = []
        self._scheduled = False  # a flush is queued on the event loop

    def datagram_received(self, data: bytes, addr: Any) -> None:
        forwarded = is_forward(data)
        if forwarded:
            try:
                data, addr = decode_forward(data, self.key)
            except PacketError as exc:
                self._reject(exc.reason, addr, str(exc))
                return
        batch = self.batch
        held = batch.n
        try:
            header, index, _count = batch.append_datagram(data, self.key)
        except PacketError as exc:
            self._reject(exc.reason, addr, str(exc))
            return
        except Exception:  # a codec bug: never let it kill the endpoint
            self._reject("malformed", addr, "unexpected error while decoding", exc_info=True)
            return
        try:
            self.guard.check(header, index)
        except PacketError as exc:
            batch.drop_last()
            self._reject(exc.reason, addr, str(exc))
            return
        self.accepted += 1
        self.records += batch.n - held
        if forwarded:
            self.forwarded_in += 1
        elif header.flags & HeaderFlags.ROUTED:
            self.routed.append((data, addr, held, batch.n))
        # a forwarded datagram of a TCP sender has no address: the sender's stream is where it is
        if self.callback is not None and not (forwarded and addr is None):
            try:
                self.callback(header, addr)
            except Exception:
                self.callback_errors += 1
                log.exception("datagram callback failed on node %s sequence %s", header.node_id, header.sequence)
        if batch.n >= self.flush_records:
            self._hand_over()  # the flush already due (end of turn or drain) takes what follows
        elif not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # called outside an event loop (tests, tools): now
                self.flush()

    def drain(self, sock: socket.socket) -> None:
        """Read what the socket holds (DRAIN_DATAGRAMS at most), then flush."""
        self._scheduled = True  # this flush below covers them: no call_soon per turn
        try:
            for _ in range(DRAIN_DATAGRAMS):
                try:
                    data, addr = sock.recvfrom(MAX_DATAGRAM + 1)  # + 1: an oversized one shows as such
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # ICMP errors surface here on Linux: noise, as in error_received
                    self.error_received(exc)
                    break
                self.datagram_received(data, addr)
        finally:
            self.flush()

    def flush(self) -> None:
        """Hand what the batch holds to on_batch, then clear it."""
        self._scheduled = False
        self._hand_over()

    def _hand_over(self) -> None:
        batch = self.batch
        if not batch.datagrams:
            return
        self.flushes += 1
        try:
            self.on_batch(batch)
        except Exception:
            self.callback_errors += 1
            log.exception("batch callback failed on %d records", batch.n)
        finally:
            batch.clear()
            self.routed.clear()


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


class UdpEndpoint:
    """A bound non-blocking UDP socket drained into a BatchReceiver by the loop.

    sendto() sends at once (hints are small and rare; a full socket buffer
    raises OSError, which the LB node counts). close() unregisters and closes.
    """

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self._loop = loop

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sock.sendto(data, addr)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock.getsockname() if name == "sockname" else default

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()


async def open_batch_receiver(host: str, port: int, receiver: BatchReceiver) -> UdpEndpoint:
    """Bind a UDP socket on (host, port) and drain it into `receiver`.

    Port 0 picks a free port: endpoint.get_extra_info("sockname").
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, exc.strerror, f"{host}:{port}") from exc
    loop.add_reader(sock.fileno(), receiver.drain, sock)
    return UdpEndpoint(sock, loop)
