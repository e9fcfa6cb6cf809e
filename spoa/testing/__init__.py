"""A fake HAProxy: the HAProxy side of SPOP over a blocking socket.

For tests and benchmarks (in the spirit of negasus/haproxy-spoe-go's
`client/`). It builds frames the way HAProxy does (spoa.spop.frames) and reads the
agent's answers with HAProxy's own checks: every frame must carry exactly the
FIN flag and stay within the negotiated max-frame-size, and an ACK must echo
the stream-id/frame-id of its NOTIFY::

    with SpopClient(timeout=2).connect("127.0.0.1:12345") as client:
        client.hello()                                   # AGENT-HELLO as a dict
        actions = client.notify(1, 1, [("lease-session", [("ip", IPv4Address("192.0.2.1"))])])
        # [("set-var", 1, "duration_ms", 30000), ...]
        client.disconnect()

Every wait is bounded by the client's timeout (or the one passed in);
read_frame() returns None when the agent closed the connection (EOF or RST).
Only the standard library and spoa's own codec are used.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Iterable
from typing import Any

from ..netutil import parse_address
from ..spop.codec import Frame, FrameReader, FrameWriter
from ..spop.constants import (
    FLAG_FIN,
    HAPROXY_DEFAULT_MAX_FRAME_SIZE,
    LENGTH_PREFIX_SIZE,
    FrameType,
    Status,
)
from ..spop.frames import write_disconnect, write_haproxy_hello, write_notify

__all__ = [
    "AgentDisconnected",
    "ConnectionClosed",
    "ProtocolViolation",
    "SpopClient",
    "SpopClientError",
    "build_disconnect",
    "build_frame",
    "build_hello",
    "build_notify",
    "open_socket",
]

Messages = Iterable[tuple[str, Iterable[tuple[str, Any]]]]
_FIN_ONLY = FLAG_FIN
_FRAME_NAMES = {int(t): t.name for t in FrameType}


class SpopClientError(Exception):
    """The agent did not answer as HAProxy expects."""


class AgentDisconnected(SpopClientError):
    """The agent answered with an AGENT-DISCONNECT."""

    def __init__(self, status: int, message: str, frame: Frame) -> None:
        try:
            name = Status(status).name
        except ValueError:
            name = "?"
        super().__init__(f"agent disconnected: status {status} ({name}): {message!r}")
        self.status = status
        self.message = message
        self.frame = frame


class ConnectionClosed(SpopClientError):
    """The agent closed the connection where a frame was expected."""


class ProtocolViolation(SpopClientError):
    """A frame HAProxy would refuse (bad flags, ids, size or type)."""


# -- frame builders (HAProxy side) ---------------------------------------------------


def build_frame(ftype: int, payload: bytes = b"", stream_id: int = 0, frame_id: int = 0,
                flags: int = FLAG_FIN) -> bytes:
    """Any frame, prefix included, over a raw payload (e.g. fragments, bad input)."""
    w = FrameWriter()
    w.begin_frame(ftype, stream_id, frame_id, flags)
    w.end_frame()
    head = w.take()
    length = len(head) - LENGTH_PREFIX_SIZE + len(payload)
    return struct.pack(">I", length) + head[LENGTH_PREFIX_SIZE:] + bytes(payload)


def build_hello(max_frame_size: int = HAPROXY_DEFAULT_MAX_FRAME_SIZE, capabilities: str = "pipelining,async",
                healthcheck: bool = False, engine_id: str | None = None, versions: str = "2.0") -> bytes:
    """HAPROXY-HELLO as HAProxy builds it."""
    w = FrameWriter()
    write_haproxy_hello(w, max_frame_size, capabilities, healthcheck, engine_id, versions)
    return w.take()


def build_notify(stream_id: int, frame_id: int, messages: Messages, flags: int = FLAG_FIN) -> bytes:
    """NOTIFY of (name, [(arg, value), ...]) messages; values typed as HAProxy types samples."""
    w = FrameWriter()
    write_notify(w, stream_id, frame_id, messages, flags)
    return w.take()


def build_disconnect(status: int = 0, message: str = "normal") -> bytes:
    """HAPROXY-DISCONNECT."""
    w = FrameWriter()
    write_disconnect(w, FrameType.HAPROXY_DISCONNECT, status, message)
    return w.take()


def open_socket(address: str, timeout: float) -> socket.socket:
    """A connected blocking socket to 'HOST:PORT', '[V6]:PORT' or 'unix:PATH'."""
    host, port = parse_address(address)
    if host == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(port))
        except BaseException:
            sock.close()
            raise
        return sock
    sock = socket.create_connection((str(host), int(port)), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# -- the client ------------------------------------------------------------------------


class SpopClient:
    """One HAProxy-side SPOP connection (blocking socket, every wait bounded).

    Attributes after hello(): `agent_hello` (the AGENT-HELLO key/values) and
    `max_frame_size` (the negotiated value; larger frames from the agent raise
    ProtocolViolation). `last_frame_bytes` holds the exact bytes, prefix
    included, of the last frame read_frame() returned.
    """

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.max_frame_size = HAPROXY_DEFAULT_MAX_FRAME_SIZE
        self.agent_hello: dict[str, Any] | None = None
        self.last_frame_bytes = b""
        self._buf = bytearray()
        self._eof = False

    # -- connection --------------------------------------------------------------
    def connect(self, address: str) -> SpopClient:
        """Connect to 'HOST:PORT', '[V6]:PORT' or 'unix:PATH'; returns self."""
        if self.sock is not None:
            raise RuntimeError("already connected")
        self.sock = open_socket(address, self.timeout)
        return self

    def close(self) -> None:
        """Close without a DISCONNECT (what HAProxy 3.1+ usually does)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0), as HAProxy 3.1+ often does."""
        if self.sock is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close()

    def __enter__(self) -> SpopClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw I/O -----------------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are, in one sendall()."""
        self._socket().sendall(data)

    def recv_raw(self, timeout: float | None = None, size: int = 1 << 16) -> bytes:
        """One recv() (after any bytes already buffered); b"" on EOF or RST.

        Raises TimeoutError when nothing arrives in time. For checks on how
        the agent's bytes arrive, e.g. that no frame is split across writes.
        """
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            return data
        if self._eof:
            return b""
        sock = self._socket()
        sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            data = sock.recv(size)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self._eof = True
        return data

    def read_frame(self, timeout: float | None = None) -> Frame | None:
        """The next frame from the agent; None on EOF or RST.

        Raises TimeoutError when no whole frame arrives within `timeout`
        (default: the client's), and ProtocolViolation for a frame HAProxy
        would refuse: a length prefix above max_frame_size or flags other
        than FIN.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            raw = self._cut_frame()
            if raw is not None:
                return self._parse(raw)
            if self._eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no whole frame within the timeout ({len(self._buf)} bytes buffered)")
            sock = self._socket()
            sock.settimeout(remaining)
            try:
                data = sock.recv(1 << 16)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            except socket.timeout:
                continue
            if not data:
                self._eof = True
                if self._buf:
                    raise ConnectionClosed(f"agent closed in the middle of a frame ({len(self._buf)} bytes)")
                return None
            self._buf += data

    def expect_close(self, timeout: float | None = None) -> None:
        """Wait for the agent to close; raises if it sends anything else first."""
        frame = self.read_frame(timeout)
        if frame is not None:
            raise ProtocolViolation(f"expected the connection to close, got {_describe(frame)}")

    def _cut_frame(self) -> bytes | None:
        buf = self._buf
        if len(buf) < LENGTH_PREFIX_SIZE:
            return None
        length = int.from_bytes(buf[:LENGTH_PREFIX_SIZE], "big")
        if length > self.max_frame_size:
            raise ProtocolViolation(f"frame of {length} bytes exceeds max-frame-size {self.max_frame_size}")
        end = LENGTH_PREFIX_SIZE + length
        if len(buf) < end:
            return None
        raw = bytes(buf[:end])
        del buf[:end]
        return raw

    def _parse(self, raw: bytes) -> Frame:
        reader = FrameReader(len(raw))
        reader.feed(raw)
        frame = reader.next_frame()
        if frame.flags != _FIN_ONLY:
            raise ProtocolViolation(f"frame flags {frame.flags:#x}, HAProxy 3.1+ needs exactly FIN: {_describe(frame)}")
        self.last_frame_bytes = raw
        return frame

    def _socket(self) -> socket.socket:
        if self.sock is None:
            raise RuntimeError("not connected")
        return self.sock

    # -- protocol ----------------------------------------------------------------------
    def hello(self, max_frame_size: int = HAPROXY_DEFAULT_MAX_FRAME_SIZE, capabilities: str = "pipelining,async",
              healthcheck: bool = False, engine_id: str | None = None) -> dict[str, Any]:
        """Send HAPROXY-HELLO and return the AGENT-HELLO key/values.

        Raises AgentDisconnected when the agent refuses, ProtocolViolation when
        its answer would fail HAProxy's checks (ids, version, size range).
        """
        self.max_frame_size = max_frame_size
        self.send_raw(build_hello(max_frame_size, capabilities, healthcheck, engine_id))
        frame = self._expect_frame("AGENT-HELLO")
        if frame.type != FrameType.AGENT_HELLO:
            raise ProtocolViolation(f"expected AGENT-HELLO, got {_describe(frame)}")
        if frame.stream_id != 0 or frame.frame_id != 0:
            raise ProtocolViolation(f"AGENT-HELLO with ids {frame.stream_id}/{frame.frame_id}, not 0/0")
        kv = frame.kv()
        if str(kv.get("version", "")).strip() != "2.0":
            raise ProtocolViolation(f"AGENT-HELLO version {kv.get('version')!r}, HAProxy accepts only 2.0")
        size = kv.get("max-frame-size")
        if isinstance(size, int) and not isinstance(size, bool):
            if not 256 <= size <= max_frame_size:
                raise ProtocolViolation(f"AGENT-HELLO max-frame-size {size} outside [256, {max_frame_size}]")
            self.max_frame_size = size
        self.agent_hello = kv
        return kv

    def send_notify(self, stream_id: int, frame_id: int, messages: Messages, flags: int = FLAG_FIN) -> None:
        """Send a NOTIFY without waiting (for pipelining)."""
        self.send_raw(build_notify(stream_id, frame_id, messages, flags))

    def read_ack(self, stream_id: int | None = None, frame_id: int | None = None,
                 timeout: float | None = None) -> Frame:
        """The next frame, which must be an ACK (for these ids when given)."""
        frame = self._expect_frame("ACK", timeout)
        if frame.type != FrameType.ACK:
            raise ProtocolViolation(f"expected ACK, got {_describe(frame)}")
        if frame.stream_id == 0 or frame.frame_id == 0:
            raise ProtocolViolation(f"ACK with a zero id: {_describe(frame)}")
        if stream_id is not None and (frame.stream_id, frame.frame_id) != (stream_id, frame_id):
            raise ProtocolViolation(f"expected the ACK of {stream_id}/{frame_id}, got {_describe(frame)}")
        return frame

    def notify(self, stream_id: int, frame_id: int, messages: Messages,
               timeout: float | None = None) -> list[tuple]:
        """Send a NOTIFY, wait for its ACK and return the decoded actions."""
        self.send_notify(stream_id, frame_id, messages)
        return self.read_ack(stream_id, frame_id, timeout).actions()

    def disconnect(self, status: int = 0, message: str = "normal",
                   timeout: float | None = None) -> dict[str, Any] | None:
        """Send HAPROXY-DISCONNECT; return the AGENT-DISCONNECT key/values.

        None when the agent closed without answering. The socket stays open
        (call close()); use expect_close() to check the agent closes.
        """
        self.send_raw(build_disconnect(status, message))
        while True:
            frame = self.read_frame(timeout)
            if frame is None:
                return None
            if frame.type == FrameType.AGENT_DISCONNECT:
                return frame.kv()
            if frame.type != FrameType.ACK:  # ACKs of earlier NOTIFYs may come first
                raise ProtocolViolation(f"expected AGENT-DISCONNECT, got {_describe(frame)}")

    def _expect_frame(self, what: str, timeout: float | None = None) -> Frame:
        frame = self.read_frame(timeout)
        if frame is None:
            raise ConnectionClosed(f"agent closed the connection instead of sending {what}")
        if frame.type == FrameType.AGENT_DISCONNECT:
            kv = frame.kv()
            raise AgentDisconnected(kv.get("status-code", -1), kv.get("message", ""), frame)
        return frame


def _describe(frame: Frame) -> str:
    name = _FRAME_NAMES.get(frame.type, f"type {frame.type}")
    return f"{name} (flags {frame.flags:#x}, ids {frame.stream_id}/{frame.frame_id}, {frame.payload_length}B payload)"


# -- processes on loopback (tests, benchmarks) ------------------------------------------


# Ports handed out by free_port in this process: the kernel may hand the same
# free port out twice before anything listens on it, and HAProxy binds with
# SO_REUSEPORT, so two frontends given one port silently share its connections.
_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now, never one this
    process was given before."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port
    raise RuntimeError("no free port left that this process was not given before")


def wait_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Until something accepts on 127.0.0.1:port (failing early if `proc` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition",
               ignore: tuple[type[BaseException], ...] = ()):
    """The predicate's first truthy result; exceptions in `ignore` count as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = predicate()
        except ignore:
            result = None
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached after {timeout}s")


def http_get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, dict[str, str]]:
    """One GET to 127.0.0.1:port on its own connection: (status, lower-cased headers)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def scrape_metrics(port: int, timeout: float = 5.0) -> dict[str, float]:
    """GET 127.0.0.1:port/metrics; Prometheus text -> {"name{labels}": value}."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    out = {}
    for line in data.split(b"\r\n\r\n", 1)[1].decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
