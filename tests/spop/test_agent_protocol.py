"""The agent over real sockets: the server runs in-process, on its own event-loop thread.

Each test gets a fresh Agent + AgentServer listening on 127.0.0.1 (port 0) and
on a unix socket, and talks to it with spoa.testing.SpopClient, the fake
HAProxy. Counters are read straight from agent.stats. The memory test runs
the agent as a subprocess (`python -m spoa agent`) so that its RSS is the
agent's alone.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest

from spoa.spop.agent import Agent, AgentSettings
from spoa.spop.codec import FrameWriter
from spoa.spop.constants import FLAG_ABORT, FLAG_FIN, DataType, FrameType, Scope
from spoa.spop.handlers import HandlerRegistry
from spoa.spop.server import AgentServer
from spoa.testing import (
    SpopClient,
    build_frame,
    build_hello,
    build_notify,
)

REPO = Path(__file__).resolve().parents[2]
TXN = int(Scope.TXN)
NOOP = [("unset-var", TXN, "noop")]
TIMEOUT = 3.0  # bound of every single wait on a socket

# HAProxy 3.1+'s `option spop-check` HELLO, byte for byte (spop.md §2.4,
# src/tcpcheck.c proxy_parse_spop_check_opt()).
HEALTHCHECK_HELLO = bytes.fromhex(
    "0000004e" "01" "00000001" "00" "00"
    "12" + b"supported-versions".hex() + "08" "03" + b"2.0".hex()
    + "0e" + b"max-frame-size".hex() + "03" "fcf006"
    + "0c" + b"capabilities".hex() + "08" "00"
    + "0b" + b"healthcheck".hex() + "11"
)
# The AGENT-HELLO HAProxy's 3.1+ checker accepts, for `capabilities "pipelining"`
# and max-frame-size 16380 (spop.md §2.4).
AGENT_HELLO_PIPELINING = bytes.fromhex(
    "00000040" "65" "00000001" "00" "00"
    "07" + b"version".hex() + "08" "03" + b"2.0".hex()
    + "0e" + b"max-frame-size".hex() + "03" "fcf006"
    + "0c" + b"capabilities".hex() + "08" "0a" + b"pipelining".hex()
)


# -- handlers the tests drive ---------------------------------------------------------


def make_registry() -> HandlerRegistry:
    reg = HandlerRegistry()

    @reg.handler("echo")
    def echo(message, actions):
        for name, value in message.items():
            actions.set_var(TXN, name or "arg", value)

    @reg.handler("boom")
    def boom(message, actions):
        actions.set_var(TXN, "partial", 1)  # must be dropped with the failure
        raise RuntimeError("handler failure on purpose")

    @reg.handler("async-echo")
    async def async_echo(message, actions):
        await asyncio.sleep(message.get("delay_ms", 0) / 1000)
        actions.set_var(TXN, "async", message.get("v"))

    @reg.handler("async-big")
    async def async_big(message, actions):
        await asyncio.sleep(0)
        actions.set_var(TXN, "big", b"x" * message.get("size"))

    @reg.handler("slow")
    async def slow(message, actions):
        actions.set_var(TXN, "slow_partial", 1)
        await asyncio.sleep(30)
        actions.set_var(TXN, "slow", 1)

    @reg.handler("big")
    def big(message, actions):
        actions.set_var(TXN, "big", b"x" * message.get("size"))

    return reg


# -- the in-process agent --------------------------------------------------------------


def _short_dir(tmp_path: Path) -> Path:
    """A directory whose socket paths fit sun_path (108 bytes)."""
    if len(str(tmp_path / "agent.sock")) < 100:
        return tmp_path
    return Path(tempfile.mkdtemp(prefix="spoa-", dir="/tmp"))


class RunningAgent:
    """An AgentServer on its own event-loop thread; tests talk to it over sockets."""

    def __init__(self, settings: AgentSettings, sock_dir: Path, loop_factory: Callable = asyncio.new_event_loop):
        self.agent = Agent(settings, make_registry())
        self.unix_path = str(sock_dir / "agent.sock")
        self.server = AgentServer(self.agent, ["127.0.0.1:0", f"unix:{self.unix_path}"])
        self.loop_errors: list[dict] = []
        self._loop_factory = loop_factory
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._clients: list[SpopClient] = []
        self._stopped = False
        self.thread = threading.Thread(target=self._run, name="agent-loop", daemon=True)

    def _run(self) -> None:
        loop = self.loop = self._loop_factory()
        loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))
        try:
            loop.run_until_complete(self.server.start())
        except BaseException as exc:  # surface it in the test thread
            self._startup_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def start(self) -> RunningAgent:
        self.thread.start()
        assert self._ready.wait(10), "agent loop did not start"
        if self._startup_error is not None:
            raise self._startup_error
        self.tcp = next(a for a in self.server.addresses if not a.startswith("unix:"))
        self.unix = f"unix:{self.unix_path}"
        return self

    def call(self, coro, timeout: float = 10.0):
        """Run a coroutine on the agent's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.call(self.server.stop(grace), timeout=grace + 5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    @property
    def stats(self):
        return self.agent.stats

    def client(self, address: str | None = None, hello: bool = True, **hello_args) -> SpopClient:
        """A connected fake HAProxy (closed at teardown)."""
        client = SpopClient(timeout=TIMEOUT).connect(address or self.tcp)
        self._clients.append(client)
        if hello:
            client.hello(**hello_args)
        return client

    def wait_for(self, predicate: Callable[[], bool], timeout: float = TIMEOUT, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or predicate}; stats={self.stats.snapshot()}")
            time.sleep(0.005)

    def block_loop(self, seconds: float) -> None:
        """Keep the agent's loop busy for `seconds` (returns once it is blocked)."""
        blocked = threading.Event()

        def block() -> None:
            blocked.set()
            time.sleep(seconds)

        self.loop.call_soon_threadsafe(block)
        assert blocked.wait(TIMEOUT)


@pytest.fixture
def make_agent(tmp_path):
    """Factory: make_agent(**AgentSettings fields) -> a started RunningAgent."""
    started: list[RunningAgent] = []
    sock_dir = _short_dir(tmp_path)

    def make(loop_factory: Callable = asyncio.new_event_loop, **settings) -> RunningAgent:
        d = sock_dir / str(len(started))
        d.mkdir()
        running = RunningAgent(AgentSettings(**settings), d, loop_factory).start()
        started.append(running)
        return running

    yield make
    for running in started:
        if not running._stopped:
            for client in running._clients:
                client.close()
            # stop() polls every 50 ms while connections remain: let them go first
            running.wait_for(lambda: not running.agent.connections, what="connections to close")
        running.stop()
        for client in running._clients:
            client.close()
        # Nothing may escape to the loop's exception handler, and no input
        # may reach the "internal agent error" path (status 99).
        assert running.loop_errors == [], running.loop_errors
        assert running.stats.errors["UNKNOWN"] == 0
        assert running.stats.connections_active == 0, running.stats.snapshot()
        assert not running.agent.connections


@pytest.fixture
def rt(make_agent) -> RunningAgent:
    return make_agent()


def _kv_frame(ftype: int, items: list[tuple[str, int, object]], flags: int = FLAG_FIN) -> bytes:
    """A KV-LIST frame from (key, DataType, value) triples."""
    w = FrameWriter()
    w.begin_frame(ftype, 0, 0, flags)
    for key, dtype, value in items:
        w.put_name(key)
        w.put_typed_as(dtype, value)
    w.end_frame()
    return w.take()


def _hello_items(**drop_or_replace) -> list[tuple[str, int, object]]:
    items = {
        "supported-versions": (DataType.STRING, "2.0"),
        "max-frame-size": (DataType.UINT32, 16380),
        "capabilities": (DataType.STRING, "pipelining,async"),
    }
    for key, value in drop_or_replace.items():
        key = key.replace("_", "-")
        if value is None:
            del items[key]
        else:
            items[key] = value
    return [(k, t, v) for k, (t, v) in items.items()]


def _notify_of_length(stream_id: int, frame_id: int, length: int) -> bytes:
    """A NOTIFY whose LENGTH prefix is exactly `length` (one BINARY argument as padding)."""
    pad = length
    while True:
        notify = build_notify(stream_id, frame_id, [("p", [("b", b"z" * pad)])])
        excess = len(notify) - 4 - length
        if excess == 0:
            return notify
        pad -= excess if excess > 0 else -1


def _expect_disconnect(client: SpopClient, status: int, timeout: float | None = None) -> dict:
    frame = client.read_frame(timeout)
    assert frame is not None, "agent closed without an AGENT-DISCONNECT"
    assert frame.type == FrameType.AGENT_DISCONNECT, frame
    assert (frame.stream_id, frame.frame_id) == (0, 0)
    kv = frame.kv()
    assert kv["status-code"] == status, kv
    assert len(kv["message"].encode()) <= 255
    client.expect_close()
    return kv


# =====================================================================================
# Handshake
# =====================================================================================


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_hello_answers_version_size_and_capabilities(rt, transport):
    client = rt.client(rt.tcp if transport == "tcp" else rt.unix, hello=False)
    kv = client.hello(max_frame_size=16380, capabilities="pipelining,async")
    assert kv == {"version": "2.0", "max-frame-size": 16380, "capabilities": "pipelining,async,fragmentation"}
    assert rt.stats.hellos == 1
    assert client.notify(1, 1, [("echo", [("v", 7)])]) == [("set-var", TXN, "v", 7)]


@pytest.mark.parametrize(
    "ours, theirs, expected",
    [(65532, 16380, 16380), (65532, 100000, 65532), (65532, 1000, 1000), (16380, 65532, 16380), (4096, 256, 256)],
)
def test_hello_max_frame_size_is_the_minimum(make_agent, ours, theirs, expected):
    rt = make_agent(max_frame_size=ours)
    client = rt.client(hello=False)
    assert client.hello(max_frame_size=theirs)["max-frame-size"] == expected
    # The negotiated size is enforced on incoming frames: exactly the limit
    # passes, one byte more is "frame is too big".
    client.send_raw(_notify_of_length(1, 1, expected))
    assert client.read_ack(1, 1).actions() == NOOP
    client.send_raw(_notify_of_length(3, 1, expected + 1))
    _expect_disconnect(client, 3)
    assert rt.stats.errors["TOO_BIG"] == 1


@pytest.mark.parametrize(
    "offered, settings, expected",
    [
        ("pipelining", {}, "pipelining,fragmentation"),
        ("pipelining,async", {}, "pipelining,async,fragmentation"),
        (" async , pipelining ", {}, "pipelining,async,fragmentation"),
        ("", {}, "fragmentation"),
        ("async", {"allow_async": False}, "fragmentation"),
        ("pipelining,async", {"allow_async": False, "accept_fragments": False}, "pipelining"),
    ],
)
def test_hello_capabilities(make_agent, offered, settings, expected):
    rt = make_agent(**settings)
    assert rt.client(hello=False).hello(capabilities=offered)["capabilities"] == expected


def test_hello_bytes_are_exactly_what_the_31_health_check_accepts(make_agent):
    rt = make_agent(allow_async=False, accept_fragments=False)
    client = rt.client(hello=False)
    client.hello(capabilities="pipelining")
    assert client.last_frame_bytes == AGENT_HELLO_PIPELINING


def test_hello_frame_layout_with_default_settings(rt):
    client = rt.client(hello=False)
    client.send_raw(build_hello())
    raw = client.recv_raw()
    length = int.from_bytes(raw[:4], "big")
    assert len(raw) == 4 + length  # one whole frame, in one piece
    assert raw[4] == 0x65 and raw[5:9] == b"\x00\x00\x00\x01" and raw[9:11] == b"\x00\x00"
    assert list(rt.client(hello=False).hello()) == ["version", "max-frame-size", "capabilities"]


@pytest.mark.parametrize("settings, caps", [({}, "fragmentation"), ({"accept_fragments": False}, "")])
def test_healthcheck_hello_gets_agent_hello_then_close(make_agent, settings, caps):
    assert len(HEALTHCHECK_HELLO) == 82
    rt = make_agent(**settings)
    client = rt.client(hello=False)
    client.send_raw(HEALTHCHECK_HELLO)
    frame = client.read_frame()
    raw = client.last_frame_bytes
    # tcpcheck_spop_expect_hello(): type 101, flags exactly 1, ids 00 00, exact keys.
    assert frame.type == FrameType.AGENT_HELLO
    assert raw[5:9] == b"\x00\x00\x00\x01" and raw[9:11] == b"\x00\x00"
    kv = frame.kv()
    assert kv == {"version": "2.0", "max-frame-size": 16380, "capabilities": caps}
    assert 256 <= kv["max-frame-size"] <= 16380
    client.expect_close()
    assert rt.stats.healthchecks == 1 and rt.stats.hellos == 0


@pytest.mark.parametrize(
    "hello, status, counter",
    [
        (_hello_items(supported_versions=None), 5, "NO_VERSION"),
        (_hello_items(supported_versions=(DataType.STRING, "1.0")), 8, "BAD_VERSION"),
        (_hello_items(supported_versions=(DataType.STRING, "1.0, 3.0")), 8, "BAD_VERSION"),
        (_hello_items(max_frame_size=None), 6, "NO_MAX_FRAME_SIZE"),
        (_hello_items(max_frame_size=(DataType.UINT32, 100)), 9, "BAD_FRAME_SIZE"),
        (_hello_items(max_frame_size=(DataType.UINT32, 255)), 9, "BAD_FRAME_SIZE"),
        (_hello_items(capabilities=None), 7, "NO_CAPABILITIES"),
    ],
    ids=["no-version", "v1.0", "v1.0-3.0", "no-max-frame-size", "size-100", "size-255", "no-capabilities"],
)
def test_hello_errors(rt, hello, status, counter):
    client = rt.client(hello=False)
    client.send_raw(_kv_frame(FrameType.HAPROXY_HELLO, hello))
    _expect_disconnect(client, status)
    rt.wait_for(lambda: rt.stats.errors[counter] == 1, what=counter)
    assert rt.stats.hellos == 0


def test_hello_accepts_any_integer_type_and_spaces_in_versions(rt):
    client = rt.client(hello=False)
    client.send_raw(_kv_frame(FrameType.HAPROXY_HELLO, _hello_items(
        supported_versions=(DataType.STRING, " 1.0 , 2.0 "), max_frame_size=(DataType.INT64, 4096))))
    frame = client.read_frame()
    assert frame.type == FrameType.AGENT_HELLO and frame.kv()["max-frame-size"] == 4096


def test_notify_before_hello_is_invalid(rt):
    client = rt.client(hello=False)
    client.send_raw(build_notify(1, 1, [("echo", [])]))
    _expect_disconnect(client, 4)
    assert rt.stats.errors["INVALID"] == 1


def test_hello_without_fin_is_invalid(rt):
    client = rt.client(hello=False)
    client.send_raw(_kv_frame(FrameType.HAPROXY_HELLO, _hello_items(), flags=0))
    _expect_disconnect(client, 4)


def test_no_hello_in_time_gets_disconnect_2(make_agent):
    rt = make_agent(hello_timeout=0.2)
    early = rt.client()  # says HELLO in time: not affected later
    silent = rt.client(hello=False)
    started = time.monotonic()
    _expect_disconnect(silent, 2)
    assert time.monotonic() - started < 2
    assert rt.stats.errors["TIMEOUT"] == 1
    time.sleep(0.3)
    assert early.notify(1, 1, [("echo", [("v", 1)])]) == [("set-var", TXN, "v", 1)]


# =====================================================================================
# NOTIFY / ACK
# =====================================================================================


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_every_notify_is_acked_with_its_ids(rt, transport):
    client = rt.client(rt.tcp if transport == "tcp" else rt.unix)
    # HAProxy 3.1+: odd per-connection stream ids, frame id always 1.
    for sid in (1, 3, 5, 239, 241):
        assert client.notify(sid, 1, [("echo", [("sid", sid)])]) == [("set-var", TXN, "sid", sid)]
    # HAProxy 2.x: stream uniq_id (large, repeated), frame ids 1, 2, 3 ...
    for sid, fid in [(123456789, 1), (123456789, 2), (123456789, 3), (2**31 - 1, 2288), (2**63, 264432)]:
        client.send_notify(sid, fid, [("echo", [("fid", fid)])])
        ack = client.read_ack(sid, fid)
        assert ack.actions() == [("set-var", TXN, "fid", fid)]
    assert rt.stats.acks == 10 and rt.stats.notify_frames == 10


def test_echo_of_every_typed_value(rt):
    from ipaddress import IPv4Address, IPv6Address

    client = rt.client()
    args = [("n", None), ("t", True), ("f", False), ("i", -1), ("u", 2**64 - 1), ("s", "héllo"),
            ("b", b"\x00\xff"), ("v4", IPv4Address("192.0.2.10")), ("v6", IPv6Address("2001:db8::1"))]
    actions = client.notify(1, 1, [("echo", args)])
    assert actions == [("set-var", TXN, k, v) for k, v in args]


def test_unknown_message_gets_noop_ack(rt):
    client = rt.client()
    assert client.notify(1, 1, [("no-such-message", [("x", 1)])]) == NOOP
    assert rt.stats.unknown_messages == 1


def test_handler_error_keeps_the_ack_and_other_messages_actions(rt):
    client = rt.client()
    actions = client.notify(1, 1, [("echo", [("a", 1)]), ("boom", []), ("echo", [("b", 2)])])
    assert actions == [("set-var", TXN, "a", 1), ("set-var", TXN, "b", 2)]
    assert client.notify(3, 1, [("boom", [])]) == NOOP
    assert rt.stats.handler_errors == 2
    assert client.notify(5, 1, [("echo", [("c", 3)])]) == [("set-var", TXN, "c", 3)]


def test_async_handler_acks_after_completion(rt):
    client = rt.client()
    started = time.monotonic()
    actions = client.notify(1, 1, [("echo", [("a", 1)]), ("async-echo", [("delay_ms", 150), ("v", "done")])])
    assert time.monotonic() - started >= 0.14
    assert actions == [("set-var", TXN, "a", 1), ("set-var", TXN, "async", "done")]
    rt.wait_for(lambda: rt.stats.inflight == 0)  # the done-callback runs just after the write
    assert rt.stats.max_inflight == 1


def test_async_acks_may_overtake_but_all_arrive(rt):
    client = rt.client()
    client.send_notify(1, 1, [("async-echo", [("delay_ms", 200), ("v", 1)])])
    client.send_notify(3, 1, [("async-echo", [("delay_ms", 0), ("v", 3)])])
    client.send_notify(5, 1, [("echo", [("v", 5)])])
    got = {}
    for _ in range(3):
        ack = client.read_ack()
        got[ack.stream_id] = ack.actions()
    assert got == {1: [("set-var", TXN, "async", 1)], 3: [("set-var", TXN, "async", 3)], 5: [("set-var", TXN, "v", 5)]}


def test_slow_async_handler_is_cut_off_and_acked_without_its_actions(make_agent):
    rt = make_agent(handler_timeout=0.1)
    client = rt.client()
    started = time.monotonic()
    actions = client.notify(1, 1, [("echo", [("a", 1)]), ("slow", [])])
    assert time.monotonic() - started < 2
    assert actions == [("set-var", TXN, "a", 1)]
    assert client.notify(3, 1, [("slow", [])]) == NOOP
    assert rt.stats.handler_timeouts == 2


def test_fifty_pipelined_notifies_in_one_write(rt):
    client = rt.client()
    batch = b"".join(build_notify(2 * i + 1, 1, [("echo", [("i", i)])]) for i in range(50))
    client.send_raw(batch)
    acks = {}
    for _ in range(50):
        ack = client.read_ack()
        acks[ack.stream_id] = ack.actions()
    assert acks == {2 * i + 1: [("set-var", TXN, "i", i)] for i in range(50)}
    assert rt.stats.max_pipeline_depth >= 50
    assert rt.stats.pipeline_depth[64] >= 1  # the histogram bucket of 33..64


def test_empty_notify_is_acked(rt):
    # HAProxy 3.1.0-3.2.x bug: a NOTIFY whose payload is empty.
    client = rt.client()
    client.send_raw(build_frame(FrameType.NOTIFY, b"", 1, 1))
    assert client.read_ack(1, 1).actions() == NOOP


def test_acks_arrive_as_whole_frames(rt):
    client = rt.client()
    for round_ in range(20):
        n = 1 + round_ % 7
        client.send_raw(b"".join(build_notify(100 * round_ + i, 1, [("echo", [("i", i)])]) for i in range(n)))
        data = b""
        frames = 0
        while frames < n:
            chunk = client.recv_raw()
            assert chunk, "agent closed"
            data += chunk
            # every recv ends on a frame boundary: no frame is split across writes
            pos = 0
            frames = 0
            while pos < len(data):
                length = int.from_bytes(data[pos:pos + 4], "big")
                assert pos + 4 + length <= len(data), f"frame split: {data.hex()}"
                assert data[pos + 4] == FrameType.ACK
                pos += 4 + length
                frames += 1
        assert frames == n


def test_oversized_ack_drops_actions_but_is_sent(rt):
    client = rt.client()
    assert client.max_frame_size == 16380
    assert client.notify(1, 1, [("echo", [("a", 1)]), ("big", [("size", 20000)])]) == NOOP
    assert rt.stats.acks_truncated == 1
    # just under the limit still goes out whole
    actions = client.notify(3, 1, [("big", [("size", 16000)])])
    assert actions == [("set-var", TXN, "big", b"x" * 16000)]
    assert len(client.last_frame_bytes) - 4 <= 16380
    assert rt.stats.acks_truncated == 1


def test_oversized_async_ack_drops_actions(rt):
    client = rt.client()
    client.send_notify(1, 1, [("echo", [("a", 1)]), ("async-big", [("size", 20000)])])
    assert client.read_ack(1, 1).actions() == NOOP
    assert rt.stats.acks_truncated == 1
    client.send_notify(3, 1, [("async-big", [("size", 16000)])])
    assert client.read_ack(3, 1).actions() == [("set-var", TXN, "big", b"x" * 16000)]


def test_peer_not_reading_acks_pauses_then_resumes(rt):
    """Big ACKs HAProxy does not read: the agent stops reading, then catches up."""
    client = rt.client()
    n = 120  # ~2 MB of ACKs, far above the transport's high-water mark
    client.send_raw(b"".join(build_notify(2 * i + 1, 1, [("big", [("size", 16000)])]) for i in range(n)))
    time.sleep(0.2)
    for i in range(n):
        ack = client.read_ack(2 * i + 1, 1)  # in order: all are answered inline
        assert ack.payload_length > 16000
    assert client.notify(1001, 1, [("echo", [("v", 1)])]) == [("set-var", TXN, "v", 1)]


def test_inflight_limit_pauses_reading_and_every_notify_is_answered(make_agent):
    rt = make_agent(max_inflight_per_connection=2)
    client = rt.client()
    for i in range(10):  # separate writes, so that reads can pause between them
        client.send_notify(2 * i + 1, 1, [("async-echo", [("delay_ms", 20), ("v", i)])])
    got = {}
    for _ in range(10):
        ack = client.read_ack()
        got[ack.stream_id] = ack.actions()
    assert got == {2 * i + 1: [("set-var", TXN, "async", i)] for i in range(10)}
    rt.wait_for(lambda: rt.stats.inflight == 0)
    assert client.notify(99, 1, [("echo", [("v", 1)])]) == [("set-var", TXN, "v", 1)]


def test_inflight_limit_is_a_hard_cap_within_one_read(make_agent):
    # 30 NOTIFYs in ONE write: the cap must hold inside the read, not after it.
    rt = make_agent(max_inflight_per_connection=2)
    client = rt.client()
    client.send_raw(b"".join(build_notify(2 * i + 1, 1, [("async-echo", [("delay_ms", 10), ("v", i)])])
                             for i in range(30)))
    got = {client.read_ack().stream_id for _ in range(30)}
    assert got == {2 * i + 1 for i in range(30)}
    assert rt.stats.max_inflight <= 2


def test_object_with_async_call_is_an_async_handler(make_agent):
    class Handler:
        async def __call__(self, message, actions):
            await asyncio.sleep(0.01)
            actions.set_var(TXN, "from_call", 1)

    rt = make_agent()
    rt.agent.registry.register("callable", Handler())
    client = rt.client()
    assert client.notify(1, 1, [("callable", [])]) == [("set-var", TXN, "from_call", 1)]


# =====================================================================================
# Fragmentation (HAProxy 2.x)
# =====================================================================================


def _message_payload(messages) -> bytes:
    notify = build_notify(9, 9, messages)
    head = build_frame(FrameType.NOTIFY, b"", 9, 9)
    return notify[len(head):]


def test_fragmented_notify_is_reassembled(rt):
    client = rt.client()
    payload = _message_payload([("echo", [("s", "a" * 300)]), ("echo", [("n", 42)])])
    a, b, c = payload[:100], payload[100:250], payload[250:]
    client.send_raw(build_frame(FrameType.NOTIFY, a, 7, 3, flags=0))
    client.send_raw(build_frame(FrameType.UNSET, b, 7, 3, flags=0))
    with pytest.raises(TimeoutError):
        client.read_frame(timeout=0.1)  # nothing until the last fragment
    client.send_raw(build_frame(FrameType.UNSET, c, 7, 3, flags=FLAG_FIN))
    assert client.read_ack(7, 3).actions() == [("set-var", TXN, "s", "a" * 300), ("set-var", TXN, "n", 42)]
    assert rt.stats.fragments == 3 and rt.stats.acks == 1


def test_aborted_fragments_get_no_ack_and_the_connection_goes_on(rt):
    client = rt.client()
    payload = _message_payload([("echo", [("s", "a" * 100)])])
    client.send_raw(build_frame(FrameType.NOTIFY, payload[:50], 7, 1, flags=0))
    client.send_raw(build_frame(FrameType.UNSET, b"", 7, 1, flags=FLAG_ABORT | FLAG_FIN))
    client.send_raw(build_notify(9, 1, [("echo", [("after", 1)])]))
    ack = client.read_ack()
    assert (ack.stream_id, ack.frame_id) == (9, 1)  # none for 7/1
    assert ack.actions() == [("set-var", TXN, "after", 1)]
    with pytest.raises(TimeoutError):
        client.read_frame(timeout=0.1)


@pytest.mark.parametrize("second", ["notify", "unset-other-ids", "unset-without-start"])
def test_interlaced_fragments_are_refused(rt, second):
    client = rt.client()
    payload = _message_payload([("echo", [("s", "a" * 100)])])
    if second != "unset-without-start":
        client.send_raw(build_frame(FrameType.NOTIFY, payload[:50], 7, 1, flags=0))
    if second == "notify":
        client.send_raw(build_frame(FrameType.NOTIFY, payload[:50], 9, 1, flags=0))
    else:
        client.send_raw(build_frame(FrameType.UNSET, payload[50:], 9, 1, flags=FLAG_FIN))
    _expect_disconnect(client, 11)
    assert rt.stats.errors["INTERLACED_FRAMES"] == 1


def test_reassembly_is_bounded(make_agent):
    rt = make_agent(max_reassembled_size=1024)
    client = rt.client()
    client.send_raw(build_frame(FrameType.NOTIFY, b"\x01m" + b"\x00" * 500, 1, 1, flags=0))
    client.send_raw(build_frame(FrameType.UNSET, b"\x00" * 500, 1, 1, flags=0))
    client.send_raw(build_frame(FrameType.UNSET, b"\x00" * 500, 1, 1, flags=0))
    _expect_disconnect(client, 3)
    assert rt.stats.errors["TOO_BIG"] == 1


def test_whole_notify_while_a_fragmented_one_is_pending_is_interlaced(rt):
    client = rt.client()
    payload = _message_payload([("echo", [("s", "a" * 100)])])
    client.send_raw(build_frame(FrameType.NOTIFY, payload[:50], 7, 1, flags=0))
    client.send_raw(build_notify(9, 1, [("echo", [("after", 1)])]))
    _expect_disconnect(client, 11)
    assert rt.stats.errors["INTERLACED_FRAMES"] == 1 and rt.stats.acks == 0


def test_fragments_refused_when_not_announced(make_agent):
    rt = make_agent(accept_fragments=False)
    client = rt.client()
    assert "fragmentation" not in client.agent_hello["capabilities"]
    payload = _message_payload([("echo", [("s", "a" * 100)])])
    client.send_raw(build_frame(FrameType.NOTIFY, payload[:50], 7, 1, flags=0))
    _expect_disconnect(client, 10, timeout=0.5)


# =====================================================================================
# Deadlines and the buffer budget: idle peers, slow peers, memory
# =====================================================================================


def test_idle_connection_is_closed_after_idle_timeout(make_agent):
    rt = make_agent(idle_timeout=1.0)
    idle, busy = rt.client(), rt.client()
    started = time.monotonic()
    # The busy one keeps talking more slowly than the tick but faster than the timeout.
    for i in range(8):
        assert busy.notify(1, i + 1, [("echo", [])]) == NOOP
        time.sleep(0.2)
    kv = _expect_disconnect(idle, 0, timeout=2.0)
    assert kv["message"] == "idle timeout"
    assert 1.0 <= time.monotonic() - started < 2.5
    assert busy.notify(1, 99, [("echo", [])]) == NOOP  # still open
    assert rt.stats.idle_timeouts == 1 and sum(rt.stats.errors.values()) == 0


def test_idle_peers_no_longer_lock_out_haproxy(make_agent):
    """max_connections idle peers used to hold every slot forever."""
    rt = make_agent(idle_timeout=1.0, max_connections=5)
    for _ in range(5):
        rt.client()
    rt.wait_for(lambda: rt.stats.idle_timeouts == 5 and rt.stats.connections_active == 0, timeout=4)
    assert rt.client().notify(1, 1, [("echo", [])]) == NOOP


def test_a_connection_waiting_for_its_handler_is_not_idle(make_agent):
    rt = make_agent(idle_timeout=1.0, handler_timeout=3.0)
    client = rt.client()
    client.send_notify(1, 1, [("async-echo", [("delay_ms", 1800), ("v", 1)])])
    assert client.read_ack(1, 1, timeout=3.0).actions() == [("set-var", TXN, "async", 1)]
    assert rt.stats.idle_timeouts == 0


@pytest.mark.parametrize("how", ["partial-frame", "slowloris", "fragments"])
def test_unfinished_frame_is_closed_after_frame_timeout(make_agent, how):
    rt = make_agent(frame_timeout=0.5, idle_timeout=60)
    client = rt.client()
    frame = build_notify(1, 1, [("echo", [("s", "x" * 200)])])
    started = time.monotonic()
    if how == "partial-frame":
        client.send_raw(frame[:-10])
    elif how == "slowloris":
        # A byte at a time, each within the idle timeout: only the deadline catches it.
        for byte in frame[:5]:
            client.send_raw(bytes([byte]))
            time.sleep(0.08)
    else:
        payload = _message_payload([("echo", [("s", "a" * 300)])])
        client.send_raw(build_frame(FrameType.NOTIFY, payload[:100], 7, 3, flags=0))
        for i in range(3):  # fragments keep coming, the NOTIFY never ends
            client.send_raw(build_frame(FrameType.UNSET, payload[100 + i:101 + i], 7, 3, flags=0))
            time.sleep(0.12)
    _expect_disconnect(client, 2, timeout=2.0)
    assert time.monotonic() - started < 2.5
    assert rt.stats.frame_timeouts == 1
    rt.wait_for(lambda: rt.agent.buffered_bytes == 0)


def test_frames_split_across_reads_are_not_a_timeout(make_agent):
    """Steady traffic whose reads end mid-frame makes progress: no deadline."""
    rt = make_agent(frame_timeout=0.3)
    client = rt.client()
    frames = b"".join(build_notify(1, i, [("echo", [("s", "x" * 50)])]) for i in range(1, 41))
    step = 37  # never a frame boundary
    for i in range(0, len(frames), step):
        client.send_raw(frames[i:i + step])
        time.sleep(0.03)
    for i in range(1, 41):
        client.read_ack(1, i)
    assert rt.stats.frame_timeouts == 0


def test_partial_frames_are_held_to_the_budget(make_agent):
    rt = make_agent(max_buffered_bytes=32 << 10, frame_timeout=30)
    big = build_notify(1, 1, [("echo", [("s", "x" * 15000)])])
    first, second = rt.client(), rt.client()
    first.send_raw(big[:-1])  # 15 KB held
    rt.wait_for(lambda: rt.agent.buffered_bytes == len(big) - 1)
    second.send_raw(big[:-1])
    rt.wait_for(lambda: rt.agent.buffered_bytes == 2 * (len(big) - 1))
    third = rt.client()
    third.send_raw(big[:-1])  # the one over the budget
    _expect_disconnect(third, 13)
    assert rt.stats.buffer_budget_closes == 1
    first.send_raw(big[-1:])  # those within the budget are answered
    assert first.read_ack(1, 1).actions() == [("set-var", TXN, "s", "x" * 15000)]
    rt.wait_for(lambda: rt.agent.buffered_bytes == len(big) - 1, what="the answered frame released")
    second.close()
    rt.wait_for(lambda: rt.agent.buffered_bytes == 0, what="budget released on close")


# =====================================================================================
# Closing: DISCONNECT, EOF, RST
# =====================================================================================


def test_haproxy_disconnect_gets_agent_disconnect_then_close(rt):
    client = rt.client()
    assert client.notify(1, 1, [("echo", [])]) == NOOP
    assert client.disconnect(status=0) == {"status-code": 0, "message": "normal"}
    client.expect_close()
    rt.wait_for(lambda: rt.stats.connections_active == 0)
    assert rt.stats.disconnects_received[0] == 1
    assert sum(rt.stats.errors.values()) == 0


def test_haproxy_disconnect_with_error_status_is_counted(rt):
    client = rt.client()
    assert client.disconnect(status=2, message="timeout")["status-code"] == 0
    client.expect_close()
    assert rt.stats.disconnects_received[2] == 1


def _healthy(rt: RunningAgent, client: SpopClient, sid: int) -> None:
    assert client.notify(sid, 1, [("echo", [("ok", sid)])]) == [("set-var", TXN, "ok", sid)]


def _half_notify() -> bytes:
    notify = build_notify(1, 1, [("echo", [("x", "y" * 50)])])
    return notify[:30]


@pytest.mark.parametrize("how", ["eof", "eof-mid-frame", "eof-before-hello", "rst", "rst-mid-frame",
                                 "rst-with-async-pending", "rst-unread-acks"])
def test_peer_vanishing_is_a_normal_close(rt, how):
    other = rt.client()
    client = rt.client(hello=not how.endswith("before-hello"))
    if how.endswith("mid-frame"):
        conn = _conn_of(rt, client)
        client.send_raw(_half_notify())
        rt.wait_for(lambda: conn._reader.buffered == 30)
    if how == "rst-with-async-pending":
        client.send_notify(1, 1, [("async-echo", [("delay_ms", 100), ("v", 1)])])
        rt.wait_for(lambda: rt.stats.inflight == 1)
    if how == "rst-unread-acks":
        client.send_raw(b"".join(build_notify(i, 1, [("big", [("size", 16000)])]) for i in range(1, 40)))
        rt.wait_for(lambda: rt.stats.acks == 39)
    if how.startswith("eof"):
        client.sock.shutdown(socket.SHUT_WR)
        client.expect_close()
        client.close()
    else:
        client.reset()
    rt.wait_for(lambda: rt.stats.connections_active == 1, what="connection gone")
    if how == "eof-mid-frame":
        assert rt.stats.eof_mid_frame == 1
    elif how.startswith("eof"):
        assert rt.stats.eof_mid_frame == 0
    if how == "rst-mid-frame" or how == "rst":
        assert rt.stats.resets == 1
    if how == "rst-with-async-pending":
        rt.wait_for(lambda: rt.stats.inflight == 0)
        time.sleep(0.15)  # the handler would have finished: no write on a dead transport
    assert sum(rt.stats.errors.values()) == 0
    _healthy(rt, other, 1)
    _healthy(rt, rt.client(), 3)


@pytest.mark.parametrize("how", ["close", "disconnect", "rst-async-pending", "http-probe", "hello-timeout",
                                 "healthcheck"])
def test_closed_connections_are_freed(make_agent, how):
    """Nothing (timer, task, agent set) keeps a closed connection's protocol alive."""
    rt = make_agent(hello_timeout=0.1 if how == "hello-timeout" else 10.0)
    client = rt.client(hello=how in ("close", "disconnect", "rst-async-pending"))
    ref = weakref.ref(_conn_of(rt, client))
    if how == "close":
        client.notify(1, 1, [("echo", [("v", 1)])])
        client.close()
    elif how == "disconnect":
        client.disconnect()
        client.expect_close()
    elif how == "rst-async-pending":
        client.send_notify(1, 1, [("async-echo", [("delay_ms", 50), ("v", 1)])])
        rt.wait_for(lambda: rt.stats.inflight == 1)
        client.reset()
    elif how == "http-probe":
        client.send_raw(HTTP_PROBE)
        _expect_disconnect(client, 3)
    elif how == "hello-timeout":
        _expect_disconnect(client, 2)
    else:
        client.send_raw(HEALTHCHECK_HELLO)
        assert client.read_frame().type == FrameType.AGENT_HELLO
        client.expect_close()
    rt.wait_for(lambda: rt.stats.connections_active == 0 and rt.stats.inflight == 0)

    def collected() -> bool:
        rt.call(_collect())
        return ref() is None

    rt.wait_for(collected, what="the protocol object to be freed")


async def _collect() -> None:
    gc.collect()


# =====================================================================================
# Bad input
# =====================================================================================


def _raw_frame(ftype: int, rest: bytes, flags: int = FLAG_FIN) -> bytes:
    body = bytes([ftype]) + struct.pack(">I", flags) + rest
    return struct.pack(">I", len(body)) + body


def _typed12_notify() -> bytes:
    payload = b"\x01m" + b"\x01" + b"\x01a" + b"\x0c"
    return build_frame(FrameType.NOTIFY, payload, 1, 1)


HTTP_PROBE = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:12345\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\n\r\n"

# (id, needs HELLO first, bytes, expected DISCONNECT status or None for "agent waits", errors key)
ATTACKS = [
    ("http-probe", False, HTTP_PROBE, 3, "TOO_BIG"),
    ("length-4GB", False, b"\xff\xff\xff\xff", 3, "TOO_BIG"),
    ("length-4GB-after-hello", True, b"\xff\xff\xff\xff", 3, "TOO_BIG"),
    ("length-negotiated-plus-1", True, struct.pack(">I", 16381), 3, "TOO_BIG"),
    ("length-3", False, b"\x00\x00\x00\x03\x01\x00\x00", 4, "INVALID"),
    ("length-0-after-hello", True, b"\x00\x00\x00\x00", 4, "INVALID"),
    ("unknown-type-42", True, _raw_frame(42, b"\x00\x00"), 4, "INVALID"),
    ("agent-hello-from-haproxy", True, _raw_frame(FrameType.AGENT_HELLO, b"\x00\x00"), 4, "INVALID"),
    ("second-hello", True, build_hello(), 4, "INVALID"),
    ("ack-from-haproxy", True, _raw_frame(FrameType.ACK, b"\x01\x01"), 4, "INVALID"),
    ("truncated-varint-stream-id", True, _raw_frame(FrameType.NOTIFY, b"\xf0\xff\xff"), 4, "INVALID"),
    ("overlong-varint-stream-id", True, _raw_frame(FrameType.NOTIFY, b"\xff" * 11 + b"\x00\x01"), 4, "INVALID"),
    ("varint-2^64-stream-id", True, _raw_frame(FrameType.NOTIFY, bytes.fromhex("fff0fefefefefefefe0f") + b"\x01"),
     4, "INVALID"),
    ("bad-varint-before-hello", False, _raw_frame(FrameType.HAPROXY_HELLO, b"\xf0\x80"), 4, "INVALID"),
    ("typed-data-12", True, _typed12_notify(), 4, "INVALID"),
    ("truncated-message", True, build_frame(FrameType.NOTIFY, b"\x05echo", 1, 1), 4, "INVALID"),
    ("string-past-end", True, build_frame(FrameType.NOTIFY, b"\x04echo\x01\x01a\x08\x7fabc", 1, 1), 4, "INVALID"),
    ("hello-bad-kv", False, build_frame(FrameType.HAPROXY_HELLO, b"\x12supported-versions\x08\x10", 0, 0), 4,
     "INVALID"),
    ("disconnect-bad-kv", True, build_frame(FrameType.HAPROXY_DISCONNECT, b"\x0bstatus-code\x0d", 0, 0), 4,
     "INVALID"),
]


@pytest.fixture
def healthy(rt):
    """A HELLO'd connection opened before the attack; checked after it."""
    client = rt.client()
    _healthy(rt, client, 1)
    return client


@pytest.mark.parametrize("attack_id, after_hello, data, status, counter", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_bad_input_gets_disconnect_and_is_counted(rt, healthy, attack_id, after_hello, data, status, counter):
    attacker = rt.client(hello=after_hello)
    started = time.monotonic()
    attacker.send_raw(data)
    _expect_disconnect(attacker, status)
    assert time.monotonic() - started < 1.5  # decided on the bytes at hand, not after a timeout
    assert rt.stats.errors[counter] == 1, rt.stats.errors
    assert sum(rt.stats.errors.values()) == 1
    _healthy(rt, healthy, 3)


@pytest.mark.parametrize("after_hello", [False, True])
def test_huge_length_prefix_buffers_nothing(rt, healthy, after_hello):
    attacker = rt.client(hello=after_hello)
    conn = _conn_of(rt, attacker)
    assert conn._reader.buffered == 0
    attacker.send_raw(b"\xff\xff\xff")
    rt.wait_for(lambda: conn._reader.buffered == 3, what="3 bytes buffered")
    attacker.send_raw(b"\xff" + b"A" * 1000)
    _expect_disconnect(attacker, 3)
    assert conn._reader.buffered <= 1004
    _healthy(rt, healthy, 3)


def _conn_of(rt: RunningAgent, client: SpopClient):
    """The agent-side protocol of a TCP client (matched by the peer's port)."""
    port = client.sock.getsockname()[1]
    found = []

    def lookup() -> bool:
        found[:] = [c for c in list(rt.agent.connections) if c._peer.endswith(f":{port}")]
        return bool(found)

    rt.wait_for(lookup, what="the agent-side connection")
    return found[0]


def test_truncated_frame_then_close(rt, healthy):
    attacker = rt.client()
    conn = _conn_of(rt, attacker)
    attacker.send_raw(_half_notify())
    rt.wait_for(lambda: conn._reader.buffered == 30)
    attacker.sock.shutdown(socket.SHUT_WR)
    attacker.expect_close()
    rt.wait_for(lambda: rt.stats.eof_mid_frame == 1)
    _healthy(rt, healthy, 3)


def _expected_for_garbage(data: bytes, limit: int) -> int | None:
    """What a correct agent answers to `data` sent before HELLO (None: waits for more)."""
    if len(data) < 4:
        return None
    length = int.from_bytes(data[:4], "big")
    if length > limit:
        return 3
    if length < 7:
        return 4
    if len(data) < 4 + length:
        return None
    return -1  # a whole frame: 4 unless it happens to be a HELLO


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("framed", [False, True], ids=["raw", "framed"])
def test_random_bytes(rt, healthy, seed, framed):
    rng = random.Random(seed)
    for size in (1, 3, 4, 5, 11, 64, 1000, 70000):
        body = rng.randbytes(size)
        if framed:  # a plausible length prefix, so the garbage reaches the frame decoder
            body = struct.pack(">I", max(7, min(size, 65532))) + body
        expected = _expected_for_garbage(body, 65532)
        before = sum(rt.stats.errors.values())
        attacker = rt.client(hello=False)
        attacker.send_raw(body)
        if expected is None:
            with pytest.raises(TimeoutError):
                attacker.read_frame(timeout=0.05)
            attacker.close()
            assert sum(rt.stats.errors.values()) == before
            continue
        frame = attacker.read_frame()
        assert frame is not None, (seed, size)
        if frame.type == FrameType.AGENT_HELLO:  # random bytes forming a valid HELLO: not with these seeds
            pytest.fail(f"garbage accepted as HELLO: {body[:32].hex()}")
        assert frame.type == FrameType.AGENT_DISCONNECT
        status = frame.kv()["status-code"]
        if expected == -1:
            assert status in (4, 5, 6, 7, 8, 9) and (status == 4 or body[4] == FrameType.HAPROXY_HELLO)
        else:
            assert status == expected, (seed, size, body[:8].hex())
        attacker.expect_close()
        assert sum(rt.stats.errors.values()) == before + 1
    _healthy(rt, healthy, 3)


@pytest.mark.parametrize("seed", range(3))
def test_random_frames_after_hello(rt, healthy, seed):
    """Random type/flags/body with a valid length: whatever the agent answers, it is consistent."""
    rng = random.Random(1000 + seed)
    sid = 5
    for i in range(40):
        attacker = rt.client()
        before = sum(rt.stats.errors.values())
        n = rng.choice((0, 1, 2, 5, 30, 300, 3000))
        ftype = rng.choice((0, 1, 2, 3, 3, 3, 4, 101, 102, 103, 255))
        flags = rng.choice((0, 1, 1, 1, 2, 3, 0xFFFFFFFF))
        attacker.send_raw(_raw_frame(ftype, rng.randbytes(2 + n), flags))
        try:
            frame = attacker.read_frame(timeout=0.1)
        except TimeoutError:
            frame = "silent"  # e.g. the start of a fragmented NOTIFY
        if frame == "silent":
            assert sum(rt.stats.errors.values()) == before
        elif frame is None:
            pytest.fail(f"closed without a frame: type {ftype} flags {flags:#x}")
        elif frame.type == FrameType.AGENT_DISCONNECT:
            status = frame.kv()["status-code"]
            assert sum(rt.stats.errors.values()) == before + (1 if status else 0)
            assert status != 99
        else:
            assert frame.type == FrameType.ACK and ftype == FrameType.NOTIFY
        attacker.reset()
        if i % 10 == 9:
            sid += 2
            _healthy(rt, healthy, sid)
    rt.wait_for(lambda: rt.stats.connections_active == 1)
    _healthy(rt, healthy, 999)


# =====================================================================================
# Connection limits and shutdown
# =====================================================================================


def test_max_connections(make_agent):
    rt = make_agent(max_connections=3)
    clients = [rt.client() for _ in range(3)]
    over = rt.client(hello=False)
    over.expect_close()
    rt.wait_for(lambda: rt.stats.connections_refused == 1)
    assert rt.stats.connections_active == 3
    clients[0].close()
    rt.wait_for(lambda: rt.stats.connections_active == 2)
    again = rt.client()
    _healthy(rt, again, 1)
    _healthy(rt, clients[1], 1)


def _uvloop_factory():
    uvloop = pytest.importorskip("uvloop")
    return uvloop.new_event_loop()


@pytest.mark.parametrize("loop_factory", [
    pytest.param(asyncio.new_event_loop, id="asyncio"),
    pytest.param(_uvloop_factory, id="uvloop"),
])
def test_max_connections_holds_in_a_burst(make_agent, loop_factory):
    rt = make_agent(loop_factory=loop_factory, max_connections=3)
    rt.block_loop(0.3)  # connections queue in the backlog, then are accepted together
    socks = [SpopClient(timeout=TIMEOUT).connect(rt.tcp) for _ in range(10)]
    rt._clients.extend(socks)
    served = 0
    for client in socks:
        try:
            client.hello()
            served += 1
        except Exception:
            pass
    assert served == 3 and rt.stats.connections_refused == 7, (served, rt.stats.snapshot())


def test_graceful_stop_sends_disconnect(rt):
    a = rt.client()
    b = rt.client(rt.unix)
    fresh = rt.client(hello=False)
    rt.wait_for(lambda: rt.stats.connections_active == 3)  # `fresh` accepted, not still in the backlog
    rt.stop(grace=2)
    for client in (a, b, fresh):
        kv = _expect_disconnect(client, 0)
        assert kv["message"] == "agent shutting down"
    assert rt.stats.connections_active == 0
    with pytest.raises(OSError):
        SpopClient(timeout=0.5).connect(rt.tcp)


def test_graceful_stop_acks_inflight_notifies_first(rt):
    client = rt.client()
    client.send_notify(1, 1, [("async-echo", [("delay_ms", 200), ("v", 1)])])
    rt.wait_for(lambda: rt.stats.inflight == 1)
    threading.Thread(target=rt.stop, kwargs={"grace": 2}, daemon=True).start()
    assert client.read_ack(1, 1).actions() == [("set-var", TXN, "async", 1)]
    _expect_disconnect(client, 0)


def test_uvloop_smoke(make_agent):
    uvloop = pytest.importorskip("uvloop")
    rt = make_agent(loop_factory=uvloop.new_event_loop)
    client = rt.client()
    _healthy(rt, client, 1)
    client.send_raw(b"".join(build_notify(2 * i + 1, 1, [("echo", [("i", i)])]) for i in range(50)))
    assert {client.read_ack().stream_id for _ in range(50)} == {2 * i + 1 for i in range(50)}
    bad = rt.client(hello=False)
    bad.send_raw(HTTP_PROBE)
    _expect_disconnect(bad, 3)
    rst = rt.client()
    rst.send_raw(_half_notify())
    rst.reset()
    rt.wait_for(lambda: rt.stats.connections_active == 1)
    assert rt.stats.resets == 1
    eof = rt.client()
    eof.send_raw(_half_notify())
    eof.sock.shutdown(socket.SHUT_WR)
    eof.expect_close()
    rt.wait_for(lambda: rt.stats.eof_mid_frame == 1)
    _healthy(rt, client, 3)


# =====================================================================================
# Memory: garbage connections must not leak (agent as a subprocess)
# =====================================================================================


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as resp:
        text = resp.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, name
    return float(match.group(1))


def _garbage_round(address: str, n: int) -> None:
    """n connections, each an attack of another kind, 50 at a time."""
    hello = build_hello()
    kinds = [  # (bytes, the agent answers then closes)
        (HTTP_PROBE, True),
        (b"\xff\xff\xff\xff", True),
        (hello + b"\xff\xff\xff\xff", True),
        (hello + _typed12_notify(), True),
        (hello + build_notify(1, 1, [("x", [("a", "b" * 100)])]) + _half_notify(), False),  # EOF mid-frame
        (b"\x00\x00\x00\x03abc", True),
        (hello[:20], False),  # truncated HELLO then close
        (hello + build_notify(1, 1, [("lease-session", [])]), False),  # a real client going away
    ]
    for start in range(0, n, 50):
        batch = []
        for i in range(start, min(n, start + 50)):
            client = SpopClient(timeout=TIMEOUT).connect(address)
            data, answers = kinds[i % len(kinds)]
            client.send_raw(data)
            batch.append((i, answers, client))
        for i, answers, client in batch:
            if answers and i % 3:
                while client.recv_raw():  # until the agent closes
                    pass
                client.close()
            elif i % 2:
                client.reset()
            else:
                client.close()


def test_garbage_connections_do_not_leak(tmp_path):
    port, mport = _free_port(), _free_port()
    log = open(tmp_path / "agent.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "spoa", "agent", "--listen", f"127.0.0.1:{port}",
         "--metrics", f"127.0.0.1:{mport}", "--log-level", "error"],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                SpopClient(timeout=0.5).connect(f"127.0.0.1:{port}").close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "agent.log").read_text()
                time.sleep(0.05)
        address = f"127.0.0.1:{port}"
        _garbage_round(address, 700)  # warm-up: allocator pools, caches, buffers
        time.sleep(0.2)
        before = _rss_kib(proc.pid)
        _garbage_round(address, 2000)
        deadline = time.monotonic() + 5
        while _metric(mport, "spoa_agent_connections_active") != 0:
            assert time.monotonic() < deadline, "connections_active did not return to 0"
            time.sleep(0.05)
        after = _rss_kib(proc.pid)
        print(f"agent RSS {before} KiB -> {after} KiB over 2000 garbage connections")
        assert after - before < 3 * 1024, f"RSS grew by {after - before} KiB over 2000 garbage connections"
        assert _metric(mport, "spoa_agent_connections_total") >= 2700
        assert _metric(mport, 'spoa_agent_protocol_errors_total{status="TOO_BIG"}') > 0
        # still serving
        with SpopClient(timeout=TIMEOUT).connect(address) as client:
            client.hello()
            assert client.notify(1, 1, [("lease-session", [])])[0][:3] == ("set-var", 1, "duration_ms")
    finally:
        proc.terminate()
        try:
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
