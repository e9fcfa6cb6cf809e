"""One SPOP connection from HAProxy: hello gate, dispatch, ACKs, disconnects.

Every read is decoded to the last complete frame, all ACKs of that read go out
in one write (each frame whole, never split: HAProxy 3.2 resets connections
whose frames arrive in pieces, haproxy#3478), and a protocol error is answered
with an AGENT-DISCONNECT carrying the matching status before closing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .codec import Frame, FrameReader, FrameWriter, answer_notifies, end_ack, write_ack
from .constants import (
    FLAG_ABORT,
    FLAG_FIN,
    MIN_MAX_FRAME_SIZE,
    SPOP_VERSION,
    FrameType,
    Status,
)
from .errors import SpopError
from .frames import write_agent_hello, write_disconnect

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("spoa.spop.protocol")

_NOTIFY = int(FrameType.NOTIFY)
_UNSET = int(FrameType.UNSET)
_HELLO = int(FrameType.HAPROXY_HELLO)
_DISCONNECT = int(FrameType.HAPROXY_DISCONNECT)
_ACK = int(FrameType.ACK)

# DRAINING: the agent is stopping; pending async NOTIFYs get their ACK, then
# the AGENT-DISCONNECT goes out.
_AWAIT_HELLO, _READY, _DRAINING, _CLOSING = range(4)
# Peers that vanish this way are closing normally (3.1+ tears SPOP
# connections down with RST instead of DISCONNECT).
_NORMAL_CLOSE_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class SpopProtocol(asyncio.Protocol):
    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self._stats = agent.stats
        self._settings = agent.settings
        self._reader = FrameReader(agent.settings.max_frame_size)
        self._out = FrameWriter()
        self._max_frame_size = agent.settings.max_frame_size
        self._state = _AWAIT_HELLO
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._hello_timer: asyncio.TimerHandle | None = None
        # A 2.x fragmented NOTIFY being reassembled: [stream_id, frame_id, bytearray].
        self._fragment: list | None = None
        self._tasks: set[asyncio.Task] = set()
        self._paused = False
        # Deadlines, checked by the agent's sweep (Agent.sweep) in its ticks
        # rather than a timer per read: the tick of the last read, and of the
        # start of the frame (or fragmented NOTIFY) still incomplete.
        self._last_read = agent.ticks
        self._partial_since: int | None = None
        # Bytes of partial frames and reassembly held, in agent.buffered_bytes.
        self._held = 0

    # -- asyncio callbacks -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        self._stats.connections_total += 1
        self._stats.connections_active += 1
        self._agent.connections.add(self)  # the server's factory added it already
        self._hello_timer = asyncio.get_running_loop().call_later(
            self._settings.hello_timeout, self._on_hello_timeout
        )

    def data_received(self, data: bytes) -> None:
        if self._state >= _DRAINING:
            return
        self._stats.bytes_in += len(data)
        self._last_read = self._agent.ticks
        self._reader.feed(data)  # cannot fail: only next_frame() judges the bytes
        self._process()

    def _process(self) -> None:
        """Answer every complete frame buffered, until paused by the in-flight bound."""
        stats = self._stats
        reader = self._reader
        registry = self._agent.registry
        depth = 0
        frames_before = stats.frames_in
        try:
            while self._state < _DRAINING and not self._paused:
                if self._state == _READY and self._fragment is None and not registry.has_async:
                    # The per-message loop (in C when compiled): whole NOTIFYs answered until
                    # another frame comes, which the general path below takes.
                    frame, answered = answer_notifies(reader, self._out, registry.handlers, registry.fallback,
                                                      stats, self._max_frame_size, self._peer)
                    depth += answered
                    if frame is None:
                        break
                else:
                    frame = reader.next_frame()
                    if frame is None:
                        break
                    stats.frames_in += 1
                    # A whole NOTIFY while a fragmented one is pending goes the
                    # slow way, to be refused as interlaced.
                    if (frame.type == _NOTIFY and self._state == _READY and frame.flags & FLAG_FIN
                            and self._fragment is None):
                        depth += 1
                        self._on_notify(frame)
                        continue
                self._on_other_frame(frame)
        except SpopError as exc:
            self._fail(exc.status, exc.detail)
        except Exception:  # a bug of ours: say so to HAProxy rather than hang it
            log.exception("internal error on connection from %s", self._peer)
            self._out = FrameWriter()  # a frame may be half-built
            self._fail(Status.UNKNOWN, "internal agent error")
        if depth:
            stats.observe_depth(depth + len(self._tasks))
        self._account(stats.frames_in != frames_before)
        self._flush()

    def _account(self, progressed: bool) -> None:
        """Book what this connection holds unanswered (a partial frame, a
        reassembly) against the agent's budget, and date it for the deadline."""
        held = self._reader.buffered
        if self._fragment is not None:
            held += len(self._fragment[1])
        if held == self._held:
            if not held:
                return
        else:
            agent = self._agent
            agent.buffered_bytes += held - self._held
            self._held = held
            if held and agent.buffered_bytes > self._settings.max_buffered_bytes and self._state < _CLOSING:
                self._stats.buffer_budget_closes += 1
                self._fail(Status.RESOURCE, f"partial frames of all connections exceed max_buffered_bytes "
                                            f"({self._settings.max_buffered_bytes})")
                return
        if not held:
            self._partial_since = None
        elif self._fragment is not None:
            # A reassembly's deadline runs from its first fragment.
            if self._partial_since is None:
                self._partial_since = self._agent.ticks
        elif progressed or self._partial_since is None:
            self._partial_since = self._agent.ticks

    def check_deadlines(self, ticks: int) -> None:
        """Called by the agent's sweep each tick: close a connection idle past
        idle_timeout, or holding a frame unfinished past frame_timeout."""
        if self._state >= _DRAINING:
            return
        settings, stats = self._settings, self._stats
        tick = self._agent.tick_seconds
        if self._partial_since is not None and (ticks - self._partial_since) * tick >= settings.frame_timeout:
            stats.frame_timeouts += 1
            self._fail(Status.TIMEOUT, f"frame unfinished after frame_timeout ({settings.frame_timeout:g} s)")
        elif (self._state == _READY and not self._tasks
              and (ticks - self._last_read) * tick >= settings.idle_timeout):
            # Normal for a pooled connection HAProxy stopped using (its own
            # idle timeouts are shorter): a clean DISCONNECT, not an error.
            stats.idle_timeouts += 1
            log.info("connection from %s idle for %g s: closing", self._peer, settings.idle_timeout)
            write_disconnect(self._out, FrameType.AGENT_DISCONNECT, Status.NORMAL, "idle timeout")
            stats.frames_out += 1
            self._close_after_flush()

    def eof_received(self) -> bool | None:
        if self._reader.buffered and self._state < _DRAINING:
            self._stats.eof_mid_frame += 1
            log.info("peer %s closed in the middle of a frame (%d bytes)", self._peer, self._reader.buffered)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        stats = self._stats
        stats.connections_active -= 1
        self._agent.connections.discard(self)
        self._agent.buffered_bytes -= self._held
        self._held = 0
        if isinstance(exc, _NORMAL_CLOSE_ERRORS):
            stats.resets += 1
        elif exc is not None:
            log.warning("connection from %s lost: %r", self._peer, exc)
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        for task in self._tasks:
            task.cancel()
        self._state = _CLOSING

    def pause_writing(self) -> None:
        # HAProxy is not reading our ACKs: stop reading its NOTIFYs too.
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        if not self._paused:
            self._transport.resume_reading()

    # -- frames ---------------------------------------------------------------------
    def _on_other_frame(self, frame: Frame) -> None:
        ftype = frame.type
        if self._state == _AWAIT_HELLO:
            if ftype != _HELLO:
                raise SpopError(Status.INVALID, f"expected HAPROXY-HELLO, got frame type {ftype}")
            self._on_hello(frame)
        elif ftype == _DISCONNECT:
            self._on_disconnect(frame)
        elif ftype == _NOTIFY or ftype == _UNSET:
            self._on_fragment(frame)
        else:
            raise SpopError(Status.INVALID, f"unexpected frame type {ftype}")

    def _on_hello(self, frame: Frame) -> None:
        if not frame.flags & FLAG_FIN:
            raise SpopError(Status.INVALID, "HAPROXY-HELLO without FIN")
        kv = frame.kv()
        versions = kv.get("supported-versions")
        if not isinstance(versions, str):
            raise SpopError(Status.NO_VERSION, "supported-versions not found")
        if SPOP_VERSION not in {v.strip() for v in versions.split(",")}:
            raise SpopError(Status.BAD_VERSION, f"no supported version in {versions!r}")
        their_size = kv.get("max-frame-size")
        if not isinstance(their_size, int) or isinstance(their_size, bool):
            raise SpopError(Status.NO_MAX_FRAME_SIZE, "max-frame-size not found")
        if their_size < MIN_MAX_FRAME_SIZE:
            raise SpopError(Status.BAD_FRAME_SIZE, f"max-frame-size {their_size} below {MIN_MAX_FRAME_SIZE}")
        offered = kv.get("capabilities")
        if not isinstance(offered, str):
            raise SpopError(Status.NO_CAPABILITIES, "capabilities not found")
        size = min(their_size, self._settings.max_frame_size)
        self._max_frame_size = size
        self._reader.max_frame_size = size
        self._state = _READY
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        write_agent_hello(self._out, size, self._agent.capabilities_for(offered))
        self._stats.frames_out += 1
        if kv.get("healthcheck") is True:
            # `option spop-check`: the hello is the whole check.
            self._stats.healthchecks += 1
            self._close_after_flush()
        else:
            self._stats.hellos += 1

    def _on_disconnect(self, frame: Frame) -> None:
        kv = frame.kv()
        status = kv.get("status-code")
        self._stats.disconnects_received[status if isinstance(status, int) else -1] += 1
        if status:
            log.info("HAProxy %s disconnected: status %s, %r", self._peer, status, kv.get("message"))
        write_disconnect(self._out, FrameType.AGENT_DISCONNECT, Status.NORMAL, "normal")
        self._stats.frames_out += 1
        self._close_after_flush()

    def _on_fragment(self, frame: Frame) -> None:
        """Reassemble a 2.x fragmented NOTIFY (we announce `fragmentation`)."""
        if not self._settings.accept_fragments:
            raise SpopError(Status.FRAG_NOT_SUPPORTED, "fragmented NOTIFY, but fragmentation was not announced")
        key = (frame.stream_id, frame.frame_id)
        if frame.type == _NOTIFY:
            if self._fragment is not None:
                raise SpopError(Status.INTERLACED_FRAMES, "new NOTIFY while a fragmented one is pending")
            self._fragment = [key, bytearray(frame.payload)]
            self._stats.fragments += 1
            return
        if self._fragment is None or self._fragment[0] != key:
            raise SpopError(Status.INTERLACED_FRAMES, "fragment for a frame that is not being reassembled")
        self._stats.fragments += 1
        if frame.flags & FLAG_ABORT:
            # HAProxy gave up on this NOTIFY and waits for no ACK.
            self._fragment = None
            return
        buf = self._fragment[1]
        buf += frame.payload
        if len(buf) > self._settings.max_reassembled_size:
            raise SpopError(Status.TOO_BIG, "reassembled NOTIFY exceeds max_reassembled_size")
        if frame.flags & FLAG_FIN:
            self._fragment = None
            self._on_notify(Frame.from_payload(_NOTIFY, FLAG_FIN, key[0], key[1], buf))

    def _on_notify(self, frame: Frame) -> None:
        """A whole NOTIFY the per-message loop did not take (async handlers registered, or
        reassembled from fragments)."""
        stats = self._stats
        stats.notify_frames += 1
        messages = frame.messages()
        stats.messages += len(messages)
        registry = self._agent.registry
        if registry.needs_task(messages):
            self._start_task(frame, messages)
            return
        write_ack(frame, messages, self._out, registry.handlers, registry.fallback, stats, self._max_frame_size,
                  self._peer)

    # -- async handlers ------------------------------------------------------------
    def _start_task(self, frame: Frame, messages: list) -> None:
        task = asyncio.get_running_loop().create_task(self._answer_async(frame, messages))
        self._tasks.add(task)
        stats = self._stats
        stats.inflight += 1
        if stats.inflight > stats.max_inflight:
            stats.max_inflight = stats.inflight
        if len(self._tasks) >= self._settings.max_inflight_per_connection and not self._paused:
            # A hard cap: _process() stops at this frame, the rest stay buffered.
            self._paused = True
            self._transport.pause_reading()
        task.add_done_callback(self._task_done)

    async def _answer_async(self, frame: Frame, messages: list) -> None:
        out = FrameWriter()
        out.begin_frame(_ACK, frame.stream_id, frame.frame_id)
        start = out.mark()
        for message in messages:
            await self._agent.dispatch_async(message, out)
        end_ack(out, start, self._stats, self._max_frame_size, self._peer)
        if self._state != _CLOSING and not self._transport.is_closing():
            data = out.take()
            self._stats.bytes_out += len(data)
            self._transport.write(data)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._stats.inflight -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("answering a NOTIFY failed", exc_info=task.exception())
        if self._state == _DRAINING:
            if not self._tasks:
                self._say_goodbye()
        elif self._paused and len(self._tasks) < self._settings.max_inflight_per_connection:
            self._paused = False
            if self._state != _CLOSING:
                self._transport.resume_reading()
                self._process()  # frames that arrived while paused

    # -- closing ----------------------------------------------------------------------
    def _fail(self, status: int, detail: str) -> None:
        status = Status(status)
        self._stats.errors[status.name] += 1
        log.warning("protocol error from %s: %s (%s); disconnecting", self._peer, detail, status.name)
        # ACKs already in the batch are whole frames: they go out before it.
        write_disconnect(self._out, FrameType.AGENT_DISCONNECT, status, detail)
        self._stats.frames_out += 1
        self._close_after_flush()

    def _on_hello_timeout(self) -> None:
        self._hello_timer = None
        if self._state == _AWAIT_HELLO:
            self._fail(Status.TIMEOUT, "no HAPROXY-HELLO in time")
            self._flush()

    def _close_after_flush(self) -> None:
        self._state = _CLOSING
        self._flush()
        self._transport.close()  # asyncio sends what is buffered before closing

    def _flush(self) -> None:
        if len(self._out):
            data = self._out.take()
            self._stats.bytes_out += len(data)
            self._transport.write(data)

    def close(self) -> None:
        """Server shutdown: finish the NOTIFYs in flight, tell HAProxy, close."""
        if self._state >= _DRAINING:
            return
        self._state = _DRAINING
        if self._transport is not None:
            self._transport.pause_reading()  # no new work
        if not self._tasks:
            self._say_goodbye()

    def _say_goodbye(self) -> None:
        write_disconnect(self._out, FrameType.AGENT_DISCONNECT, Status.NORMAL, "agent shutting down")
        self._stats.frames_out += 1
        self._close_after_flush()

    def abort(self) -> None:
        """Grace time is over: drop the connection."""
        if self._transport is not None:
            self._transport.abort()
