"""The LB node's anomaly flag reaches HAProxy: logged, and (2.7+) throttled, never cut.

The agent publishes to a stand-in LB node: a UDP socket in this test that reads
the real publishing packets (to learn our connection's id from its 4-tuple)
and answers with real, authenticated hint datagrams flagging that connection,
as an LB node does. From there everything is the product: the agent's
publisher and lease module, SPOE, haproxy/example.cfg. On every line the
flagged connection's log line says anomaly=1 and an unflagged one's does not;
on 2.8 and 3.2 (bwlim exists from 2.7) the flagged connection's download is
paced by the bandwidth limit while the unflagged one is not, and the flagged
connection stays open and usable after it. On 2.6 the config loads (the bwlim
lines sit in `.if version_atleast(2.7)`).
"""

from __future__ import annotations

import socket
import threading
import time

from spoa.wire.hints import Hint, encode_hints
from spoa.wire.packet import PacketError, decode_datagram
from spoa.wire.records import LeaseSource

from .conftest import Stack
from .harness import parse_lease_header, wait_until

KEY = b"anomaly-e2e-shared-key-0123456789"
INTERVAL_MS = 200
BODY = 192 * 1024  # 3 s at example.cfg's 64 KiB/s limit
LBNODE_ID = 0xA0A1


class FakeLbNode:
    """Reads the agent's publishing packets; flags chosen connections in hints back."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.conn_ids: dict[int, bytes] = {}  # client port -> conn_id
        self.flagged: set[bytes] = set()
        self.agent_address = None
        self.sequence = time.time_ns() // 1000
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, address = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                _, _, _, records = decode_datagram(data, KEY)
            except PacketError:
                continue
            self.agent_address = address
            for rec in records:
                self.conn_ids[rec.src_port] = rec.conn_id
            # Answer each interval's packet, as an LB node does: the hint stays fresh.
            hints = [Hint(rec.conn_id, 8000, int(LeaseSource.PREDICTED), 0, rec.conn_id in self.flagged)
                     for rec in records]
            if hints:
                for datagram in encode_hints(LBNODE_ID, self.sequence, time.time_ns() // 1_000_000, hints, KEY):
                    self.sequence += 1
                    self.sock.sendto(datagram, address)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


class Client:
    """One keep-alive HTTP/1.1 connection, blocking, bounded."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.port = self.sock.getsockname()[1]
        self.buf = b""

    def get(self, path: str) -> tuple[int, dict[str, str], int]:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: anomaly\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        first, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._recv()
        self.buf = self.buf[length:]
        return int(first.split(" ")[1]), headers, length

    def _recv(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by HAProxy")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def _download(client: Client) -> float:
    started = time.monotonic()
    status, _, length = client.get(f"/stream?bytes={BODY}")
    assert (status, length) == (200, BODY)  # complete: slowed, not cut
    return time.monotonic() - started


def test_flagged_connection_is_logged_and_throttled_not_closed(haproxy_binary, app_server, tmp_path):
    key_file = tmp_path / "lease.key"
    key_file.write_bytes(KEY)
    lbnode = FakeLbNode()
    stack = None
    try:
        stack = Stack(haproxy_binary, tmp_path, app_server, agent_config={
            "publish": {"lb_nodes": [f"127.0.0.1:{lbnode.port}"], "key_file": str(key_file),
                        "interval_ms": INTERVAL_MS},
            "lease": {"min_ms": 1000},
        })
        port = stack.haproxy.http_port
        flagged, plain = Client(port), Client(port)
        for c in (flagged, plain):
            assert c.get("/")[0] == 200  # registers the connection; the agent publishes it
        conn_id = wait_until(lambda: lbnode.conn_ids.get(flagged.port), timeout=10, what="our connection published")
        wait_until(lambda: plain.port in lbnode.conn_ids, timeout=10, what="the other connection published")
        lbnode.flagged.add(conn_id)

        def predicted(client: Client) -> bool:
            lease = parse_lease_header(client.get("/")[1].get("x-lease"))
            return lease is not None and lease[1] == "predicted"

        # predicted: the hints arrive; then one more interval so the flag is in a hint too
        wait_until(lambda: predicted(flagged) and predicted(plain), timeout=10, what="predicted leases")
        time.sleep(3 * INTERVAL_MS / 1000)
        assert flagged.get("/")[0] == 200 and plain.get("/")[0] == 200

        def line_of(client: Client) -> str | None:
            lines = [line for line in stack.haproxy.log().splitlines() if line.startswith(f"127.0.0.1:{client.port} ")]
            return lines[-1] if lines else None

        assert wait_until(lambda: (line := line_of(flagged)) and line.endswith(" anomaly=1") and line,
                          timeout=5, what="anomaly=1 in the flagged connection's log line")
        assert line_of(plain).endswith(" anomaly=0"), line_of(plain)

        throttled, free = _download(flagged), _download(plain)
        print(f"\n{haproxy_binary.line}: {BODY // 1024} KiB flagged {throttled:.2f} s, unflagged {free:.2f} s")
        if tuple(map(int, haproxy_binary.line.split("."))) >= (2, 7):
            # 192 KiB at 64 KiB/s: ~3 s (the first period's burst is allowed); unflagged: no limit
            assert throttled >= 1.5 and free < throttled / 2, (throttled, free)
        assert flagged.get("/")[0] == 200  # the flagged connection is still open and served
        flagged.close()
        plain.close()
    finally:
        if stack is not None:
            stack.stop()
        lbnode.stop()
