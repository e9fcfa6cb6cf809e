"""The LB-node tier as operators run it: three `python -m spoa lbnode` processes on a real
3-primary/3-replica Valkey cluster, a publisher sending every record to every LB node (today's
agents do so). Each node holds only its share; SIGKILL one and the survivors adopt its
connections from the store, none new, with no premature expiry; SIGSTOP one past its
membership and, woken, it is fenced, rejoins and loads its share back.

The agents' routing to owners (issue 13) is not built yet: the publisher here stands in for
them, and HAProxy is not involved.
"""

from __future__ import annotations

import itertools
import signal
import socket
import time

import pytest

from spoa.wire.packet import encode_packet
from spoa.wire.records import ConnectionRecord, PacketHeader

from .e2e.harness import LbNodeProcess, wait_until

KEY = b"k" * 32
SERVER_NODE = 7
CONNECTIONS = 300
INTERVAL_MS = 200
SLOTS = 64


def _record(i: int, total: int) -> ConnectionRecord:
    return ConnectionRecord(conn_id=i.to_bytes(16, "big"), src="192.0.2.1", src_port=1000 + i, dst="192.0.2.2",
                            dst_port=443, frontend="fe", flags=0, counter_source=0, granularity_level=0,
                            requested_lease_ms=0, predicted_lease_ms=0, lease_source=0, bytes_in_total=0,
                            bytes_out_total=total)


class Publisher:
    """Every connection's record to every LB node, once per interval, totals growing."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sequence = itertools.count(time.time_ns() // 1000)
        self.step = 0

    def send(self) -> None:
        self.step += 1
        records = [_record(i, 1000 * self.step * (i + 1)) for i in range(CONNECTIONS)]
        header = PacketHeader(node_id=SERVER_NODE, sequence=next(self.sequence), timestamp_ms=int(time.time() * 1000),
                              interval_ms=INTERVAL_MS)
        for datagram in encode_packet(header, records, KEY, 1400):
            for port in self.ports:
                self.sock.sendto(datagram, ("127.0.0.1", port))
            header = PacketHeader(node_id=SERVER_NODE, sequence=next(self.sequence), timestamp_ms=header.timestamp_ms,
                                  interval_ms=INTERVAL_MS)

    def run_until(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
            self.send()
            time.sleep(INTERVAL_MS / 1000)


def _metric(node: LbNodeProcess, name: str) -> float:
    return node.metrics().get(name, 0.0)


def _slots(nodes) -> float:
    return sum(_metric(n, "spoa_lbnode_slots_owned") for n in nodes)


def _held(nodes) -> float:
    return sum(_metric(n, "spoa_lbnode_connections") for n in nodes)


@pytest.fixture
def tier(tmp_path, store_cluster):
    """Three LB node processes of one tier, every connection held once across them (killed after)."""
    key = tmp_path / "lease.key"
    key.write_bytes(KEY)
    cluster = {"store": store_cluster.seeds, "namespace": f"proc-{time.time_ns()}", "slots": SLOTS,
               "membership_ms": 900, "timeout_ms": 300, "grace_ms": 3000}
    nodes = [LbNodeProcess(tmp_path, config={"lbnode": {"key_file": str(key), "node_id": 100 + i,
                                                        "interval_ms": INTERVAL_MS}, "cluster": cluster})
             for i in range(3)]
    publisher = Publisher([node.port for node in nodes])
    try:
        for node in nodes:
            node.start()
        publisher.run_until(lambda: _slots(nodes) == SLOTS and all(_metric(n, "spoa_lbnode_tier_members") == 3
                                                                   for n in nodes), 15,
                            "three members sharing every slot")
        publisher.run_until(lambda: _held(nodes) == CONNECTIONS, 10, "every connection held once across the tier")
        yield nodes, publisher
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)  # a frozen one must take its SIGKILL
            node.kill()
        publisher.sock.close()


def test_sigkilled_lbnode_connections_are_adopted_by_the_survivors(tier):
    nodes, publisher = tier
    held = [_metric(n, "spoa_lbnode_connections") for n in nodes]
    assert all(0.15 * CONNECTIONS < h < 0.55 * CONNECTIONS for h in held), held  # each its share
    for _ in range(3):  # a few intervals, so every connection's state is in the store
        publisher.send()
        time.sleep(INTERVAL_MS / 1000)
    victim, survivors = nodes[0], nodes[1:]
    lost = held[0]
    assert _metric(victim, "spoa_lbnode_store_write_rows_total") >= lost
    new_before = sum(_metric(n, "spoa_lbnode_new_connections_total") for n in survivors)
    killed = time.monotonic()
    victim.kill()
    publisher.ports = [n.port for n in survivors]
    publisher.run_until(lambda: _slots(survivors) == SLOTS, 10, "the survivors to own every slot")
    failover = time.monotonic() - killed
    adopted = sum(_metric(n, "spoa_lbnode_connections_adopted_total") for n in survivors)
    assert adopted == lost, (adopted, lost)
    publisher.run_until(lambda: _held(survivors) == CONNECTIONS, 5, "every connection held by a survivor")
    for node in survivors:
        m = node.metrics()
        assert m["spoa_lbnode_premature_expiries_total"] == 0, node.log()
        assert m["spoa_lbnode_fenced"] == 0 and m["spoa_lbnode_store_write_errors_total"] == 0
    # the victim's connections came to the survivors adopted, none as new
    assert sum(_metric(n, "spoa_lbnode_new_connections_total") for n in survivors) == new_before
    assert failover < 5
    for node in survivors:
        assert node.stop() == 0


def test_frozen_lbnode_is_fenced_on_waking_and_rejoins(tier):
    nodes, publisher = tier
    frozen, others = nodes[0], nodes[1:]
    frozen.proc.send_signal(signal.SIGSTOP)
    try:  # longer than its membership: the others take its slots, loading them from the store
        publisher.ports = [n.port for n in others]
        publisher.run_until(lambda: _slots(others) == SLOTS, 10, "the others to own every slot")
        publisher.run_until(lambda: _held(others) == CONNECTIONS, 5, "every connection held by the others")
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    publisher.ports = [n.port for n in nodes]
    publisher.run_until(lambda: _metric(frozen, "spoa_lbnode_fences_total") == 1
                        and _slots(nodes) == SLOTS and _metric(frozen, "spoa_lbnode_slots_owned") > 0
                        and all(_metric(n, "spoa_lbnode_tier_members") == 3 for n in nodes), 10,
                        "the woken node fenced, rejoined and owning its share again")
    publisher.run_until(lambda: _held(nodes) == CONNECTIONS, 5, "every connection held once again")
    for node in nodes:
        m = node.metrics()
        assert m["spoa_lbnode_premature_expiries_total"] == 0, node.log()
        assert m["spoa_lbnode_fenced"] == 0
    assert _metric(frozen, "spoa_lbnode_connections_adopted_total") > 0  # its share back, from the store
    for node in nodes:
        assert node.stop() == 0
