"""Connection tracking end to end: real HAProxy, the agent's kernel sampler,
publishing packets captured and verified on the LB side.

A backend streams 50 MB over one keep-alive connection at a bounded rate
while short HTTP connections run beside it; the test plays the LB node.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from spoa.wire.packet import decode_datagram
from spoa.wire.records import DIR_IN, DIR_OUT, ConnFlags, CounterSource

from .conftest import Stack
from .harness import http_get, wait_until

KEY = b"e2e-shared-key-0123456789abcdef"
INTERVAL_MS = 250
STREAM_BYTES = 50_000_000
STREAM_RATE = 25_000_000  # bytes/s: the transfer spans several intervals


class LbCapture:
    """A UDP socket standing in for the LB node: keeps every datagram."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.datagrams: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.datagrams.append(self.sock.recv(65535))
            except TimeoutError:
                continue

    def records(self):
        """Every record of every datagram, in arrival order, with its header."""
        out = []
        for data in list(self.datagrams):
            header, _index, _count, records = decode_datagram(data, KEY)
            out.extend((header, r) for r in records)
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def capture():
    c = LbCapture()
    yield c
    c.close()


@pytest.fixture
def tracking_stack(haproxy_binary, app_server, tmp_path, capture):
    key_file = tmp_path / "lease.key"
    key_file.write_bytes(KEY)
    config = {
        "publish": {"lb_nodes": [f"127.0.0.1:{capture.port}"], "key_file": str(key_file),
                    "interval_ms": INTERVAL_MS, "node_id": 7},
        "tracker": {"segment_size": 1 << 20, "min_segment_size": 128 << 10, "max_segment_size": 64 << 20,
                    "split_bytes": 256 << 10, "idle_ms": 500},
        "sampler": {"source": "kernel"},
    }
    s = Stack(haproxy_binary, tmp_path, app_server, agent_config=config)
    yield s
    s.stop()


def stream_over_keepalive(port: int, results: dict) -> None:
    """GET the stream, count every byte both ways, stay connected a while, close."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    request = f"GET /stream?bytes={STREAM_BYTES}&rate={STREAM_RATE} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    results["client_port"] = sock.getsockname()[1]
    sock.sendall(request)
    received = 0
    head = b""
    body_left = None
    while body_left is None or body_left > 0:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        received += len(chunk)
        if body_left is None:
            head += chunk
            if b"\r\n\r\n" in head:
                headers, rest = head.split(b"\r\n\r\n", 1)
                length = int([line for line in headers.split(b"\r\n") if line.lower().startswith(b"content-length")][0]
                             .split(b":")[1])
                body_left = length - len(rest)
        else:
            body_left -= len(chunk)
    results["sent"] = len(request)
    results["received"] = received
    results["done_at"] = time.monotonic()
    time.sleep(2.5)  # idle but alive: the segments should merge
    sock.close()
    results["closed_at"] = time.monotonic()


def test_stream_is_tracked_in_segments_and_published(tracking_stack, capture):
    port = tracking_stack.haproxy.http_port
    results: dict = {}
    streamer = threading.Thread(target=stream_over_keepalive, args=(port, results))
    streamer.start()
    for _ in range(6):  # short connections beside the stream
        status, _ = http_get(port)
        assert status == 200
        time.sleep(0.2)
    streamer.join(timeout=60)
    assert results.get("received", 0) > STREAM_BYTES
    client_port = results["client_port"]

    def stream_records():
        return [(h, r) for h, r in capture.records() if r.src_port == client_port]

    final = wait_until(lambda: [r for _, r in stream_records() if r.flags & ConnFlags.CLOSED],
                       timeout=10, what="the stream's closed record")
    history = [r for _, r in stream_records()]
    last = final[-1]
    assert last.counter_source == CounterSource.KERNEL
    # Byte totals agree with what the client counted (kernel: bytes_acked / bytes_received).
    assert abs(last.bytes_out_total - results["received"]) <= results["received"] * 0.01
    assert abs(last.bytes_in_total - results["sent"]) <= max(results["sent"] * 0.01, 1)
    # Segments tile each direction.
    for rec in history:
        for direction, total in ((DIR_IN, rec.bytes_in_total), (DIR_OUT, rec.bytes_out_total)):
            segs = [s for s in rec.segments if s.direction == direction]
            assert sum(s.byte_count for s in segs) == total
    # Hot while streaming: finer level, segments below the base size.
    assert max(r.granularity_level for r in history) >= 1
    assert any(s.direction == DIR_OUT and s.level >= 1 for r in history for s in r.segments)
    # Idle afterwards: the many 1 MiB-ish segments merged into a few.
    busiest = max(len(r.segments) for r in history)
    assert busiest >= 10
    assert len(last.segments) < busiest / 3
    # Interval bytes over the records add up to the total.
    assert sum(s.bytes_transferred for r in history for s in r.segments if s.direction == DIR_OUT) == \
        last.bytes_out_total
    # The short connections were tracked and closed too.
    closed = {r.src_port for _, r in capture.records() if r.flags & ConnFlags.CLOSED}
    assert len(closed - {client_port}) >= 6
    # Packets carry the node id and strictly increasing sequences.
    sequences = [h.sequence for h, _ in capture.records()]
    assert all(h.node_id == 7 for h, _ in capture.records())
    assert sequences == sorted(sequences)
    metrics = tracking_stack.agent.metrics()
    assert metrics["spoa_lease_packets_sent_total"] > 0
    assert metrics['spoa_lease_counter_updates_total{source="kernel"}'] > 0
