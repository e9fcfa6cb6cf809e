"""No lease ever closes a live connection: an upgraded tunnel outlives its lease.

haproxy/example.cfg once set `timeout tunnel` from sess.lease.duration_ms, and
closed every WebSocket upgraded after polling (predicted lease 3 s) during a
6 s idle gap, though the agent kept publishing it. Here the agent's standard
lease is 2 s, the upgrade request gets it (X-Lease), and the tunnel must carry
bytes both ways again after an idle gap more than twice as long, on every line.
The LB node's predicted lease reached HAProxy the same way (the same
variable), so the standard one shows the same cut without an LB node.
"""

from __future__ import annotations

import socket
import time

from .conftest import Stack
from .harness import parse_lease_header

LEASE_MS = 2000
IDLE_S = 2.5 * LEASE_MS / 1000

UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: tunnel\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def _read_head(sock: socket.socket) -> tuple[int, dict[str, str]]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed before the response head: {data!r}"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    assert rest == b"", rest  # nothing follows a 101 until we send
    first, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}
    return int(first.split(" ")[1]), headers


def _echo(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_upgraded_tunnel_survives_an_idle_gap_longer_than_its_lease(haproxy_binary, app_server, tmp_path):
    stack = Stack(haproxy_binary, tmp_path, app_server,
                  agent_config={"lease": {"standard_ms": LEASE_MS, "min_ms": 1000}})
    try:
        with socket.create_connection(("127.0.0.1", stack.haproxy.http_port), timeout=IDLE_S + 5) as sock:
            sock.sendall(UPGRADE)
            status, headers = _read_head(sock)
            assert status == 101, (status, headers)
            lease = parse_lease_header(headers.get("x-lease"))
            assert lease is not None and lease[:2] == (LEASE_MS, "standard"), headers  # the lease it got
            assert _echo(sock, b"hello before the gap") == b"hello before the gap"
            time.sleep(IDLE_S)  # quiet for longer than the lease
            try:
                after = _echo(sock, b"still there after the gap")
            except (ConnectionResetError, BrokenPipeError) as exc:
                after = repr(exc).encode()
            assert after == b"still there after the gap", f"tunnel cut after {IDLE_S} s idle: {after!r}"
    finally:
        stack.stop()
