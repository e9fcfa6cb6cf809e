"""Predicted leases end to end: real HAProxy, the agent, the LB node.

The lease the LB node predicts reaches HAProxy as sess.lease.* variables
(X-Lease header, log line), follows the connection's traffic, falls back to
the standard lease when the LB node goes away and recovers when it returns;
forged and replayed packets are refused and counted.
"""

from __future__ import annotations

import socket
import time

import pytest

from spoa.wire.packet import encode_packet
from spoa.wire.records import ConnectionRecord, PacketHeader

from .conftest import Stack
from .harness import LbNodeProcess, free_port, parse_lease_header, wait_until

KEY = b"lease-e2e-shared-key-0123456789ab"
INTERVAL_MS = 200
STANDARD_MS = 30000


class KeepAliveClient:
    """One client connection, many requests: what a lease is about."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def get(self, path: str = "/") -> tuple[int, dict]:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed by HAProxy"
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        left = int(headers["content-length"]) - len(body)
        while left > 0:
            left -= len(self.sock.recv(1 << 20))
        return int(lines[0].split(" ")[1]), headers

    def lease(self, path: str = "/") -> tuple[int, str]:
        status, headers = self.get(path)
        assert status == 200
        lease = parse_lease_header(headers.get("x-lease"))
        assert lease is not None, headers
        return lease[0], lease[1]

    def close(self) -> None:
        self.sock.close()


def start_lbnode(tmp, policy: str, port: int | None = None, tcp_port: int | None = None) -> LbNodeProcess:
    key_file = tmp / "lease.key"
    key_file.write_bytes(KEY)
    return LbNodeProcess(tmp, port=port, config={
        "lbnode": {"key_file": str(key_file), "interval_ms": INTERVAL_MS, "max_connections": 10000,
                   "tcp_listen": f"127.0.0.1:{tcp_port}" if tcp_port else None},
        # the specification's volume formula as such: one threshold, not calibrated per class
        "lease": {"policy": policy, "min_ms": 1000, "max_ms": 600_000, "standard_ms": STANDARD_MS,
                  "resource_utilization_threshold": 20.0, "calibrated_lease_ms": None},
        "anomaly": {"min_samples": 50},
    }).start()


@pytest.fixture
def make_lease_stack(haproxy_binary, app_server, tmp_path):
    """HAProxy + agent + LB node running the given lease policy."""
    stacks = []

    def make(policy: str, transport: str = "udp") -> Stack:
        tcp_port = free_port() if transport == "tcp" else None
        lbnode = start_lbnode(tmp_path, policy, tcp_port=tcp_port)
        stack = Stack(haproxy_binary, tmp_path, app_server, agent_config={
            "publish": {"lb_nodes": [f"127.0.0.1:{tcp_port or lbnode.port}"], "key_file": str(tmp_path / "lease.key"),
                        "interval_ms": INTERVAL_MS, "transport": transport},
            "lease": {"standard_ms": STANDARD_MS, "min_ms": 1000, "max_ms": 600_000, "hint_ttl_ms": 1000},
        })
        stack.lbnode = lbnode
        stack.policy = policy
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()
        stack.lbnode.stop()


@pytest.fixture(params=["volume", "activity"])
def lease_stack(request, make_lease_stack):
    return make_lease_stack(request.param)


def test_lease_follows_the_connections_traffic(lease_stack):
    client = KeepAliveClient(lease_stack.haproxy.http_port)
    try:
        first = client.lease()
        assert first == (STANDARD_MS, "standard")  # nothing predicted yet
        busy = []
        for _ in range(6):  # heavy: 2 MB per request
            busy.append(client.lease("/stream?bytes=2000000&rate=0"))
            time.sleep(0.3)
        assert busy[-1][1] == "predicted", busy
        quiet = []
        for _ in range(8):  # then light, sparse requests: silences of 5 intervals and more
            time.sleep(1.0)
            quiet.append(client.lease("/"))
        assert quiet[-1][1] == "predicted", quiet
        durations = {d for d, source in busy + quiet if source == "predicted"}
        assert len(durations) >= 2, "the lease never changed with the traffic"
        if lease_stack.policy == "volume":
            # the specification's formula: less volume, shorter lease
            assert quiet[-1][0] < max(d for d, s in busy if s == "predicted")
        else:
            # activity policy: sparse requests widen the gaps, the lease grows to cover them
            assert quiet[-1][0] > 1000
    finally:
        client.close()
    assert "source=predicted" in lease_stack.haproxy.log()
    metrics = lease_stack.lbnode.metrics()
    assert metrics['spoa_lbnode_leases_total{source="predicted"}'] > 0
    assert metrics["spoa_lbnode_hints_sent_total"] > 0


def test_idle_keepalive_connection_is_not_expired_prematurely(make_lease_stack):
    lease_stack = make_lease_stack("activity")  # the policy this property is claimed for
    client = KeepAliveClient(lease_stack.haproxy.http_port)
    try:
        for _ in range(6):  # alive but mostly idle: a small request every 1.2 s
            client.lease("/")
            time.sleep(1.2)
        lease, source = client.lease("/")
        assert source == "predicted" and lease > 1200  # covers the gaps it has seen
    finally:
        client.close()
    metrics = lease_stack.lbnode.metrics()
    assert metrics["spoa_lbnode_premature_expiries_total"] == 0
    assert metrics["spoa_lbnode_refreshes_total"] > 0


def test_lbnode_down_means_standard_lease_and_recovery(lease_stack):
    port = lease_stack.haproxy.http_port
    client = KeepAliveClient(port)
    try:
        wait_until(lambda: client.lease()[1] == "predicted", timeout=10, interval=0.3, what="a predicted lease")
        lease_stack.lbnode.stop()
        # hints go stale after hint_ttl_ms: standard lease, and no client sees an error
        fell_back = wait_until(lambda: lease if (lease := client.lease())[1] == "fallback" else None,
                               timeout=10, interval=0.3, what="fallback to the standard lease")
        assert fell_back == (STANDARD_MS, "fallback")
        lease_stack.lbnode = start_lbnode(lease_stack.tmp, lease_stack.policy, port=lease_stack.lbnode.port)
        wait_until(lambda: client.lease()[1] == "predicted", timeout=15, interval=0.3, what="recovery")
    finally:
        client.close()


def test_forged_and_replayed_packets_are_refused_and_counted(make_lease_stack):
    lease_stack = make_lease_stack("volume")  # independent of the policy
    target = ("127.0.0.1", lease_stack.lbnode.port)
    header = PacketHeader(node_id=99, sequence=1, timestamp_ms=int(time.time() * 1000), interval_ms=200)
    record = ConnectionRecord(conn_id=b"f" * 16, src="192.0.2.1", src_port=1, dst="192.0.2.2", dst_port=2,
                              frontend="fe", flags=0, counter_source=0, granularity_level=0,
                              requested_lease_ms=0, predicted_lease_ms=0, lease_source=0, bytes_in_total=1,
                              bytes_out_total=1)
    genuine = encode_packet(header, [record], KEY)[0]
    forged = encode_packet(header, [record], b"not-the-shared-key-0123456789abc")[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in (genuine, genuine, forged, b"GET / HTTP/1.1\r\n\r\n", genuine[:30]):
            sock.sendto(datagram, target)

    def rejected():
        m = lease_stack.lbnode.metrics()
        return {reason: m[f'spoa_lbnode_packets_rejected_total{{reason="{reason}"}}']
                for reason in ("replayed", "bad_hmac", "bad_magic", "truncated")}

    counts = wait_until(lambda: r if all((r := rejected()).values()) else None, timeout=5,
                        what="every kind of bad packet counted")
    assert counts["replayed"] == 1 and counts["bad_hmac"] == 1
    assert lease_stack.lbnode.proc.poll() is None  # still serving


def test_packets_and_hints_over_tcp(make_lease_stack):
    """The TCP option: same datagrams, length-prefixed; hints come back on the connection."""
    lease_stack = make_lease_stack("volume", transport="tcp")
    client = KeepAliveClient(lease_stack.haproxy.http_port)
    try:
        wait_until(lambda: client.lease("/stream?bytes=500000&rate=0")[1] == "predicted", timeout=10,
                   interval=0.3, what="a predicted lease over TCP")
    finally:
        client.close()
    metrics = lease_stack.lbnode.metrics()
    assert metrics["spoa_lbnode_packets_accepted_total"] > 0 and metrics["spoa_lbnode_hints_sent_total"] > 0
