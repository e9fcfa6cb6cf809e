"""An LB-node tier of real processes on loopback, and the publisher that stands in for agents.

Shared by the tier's process tests and benchmarks/bench_tier_scale.py: `python -m spoa lbnode`
processes with a `cluster:` section on a local store (spoa/tools/store_cluster.py), a sender of
real publishing datagrams (spoa.wire encode over UDP, every record to every LB node, as today's
agents do) that also receives the hints the LB nodes send back, and the /proc readings (CPU, RSS)
the measurements take.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import time
from pathlib import Path

from spoa.wire.hints import decode_hints
from spoa.wire.packet import PacketError, encode_packet
from spoa.wire.records import ConnectionRecord, PacketHeader

from .harness import LbNodeProcess

KEY = b"k" * 32
SERVER_NODE = 7
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def conn_id(i: int) -> bytes:
    return i.to_bytes(16, "big")


def _record(i: int, total: int) -> ConnectionRecord:
    return ConnectionRecord(conn_id=conn_id(i), src="192.0.2.1", src_port=1000 + i % 60000, dst="192.0.2.2",
                            dst_port=443, frontend="fe", flags=0, counter_source=0, granularity_level=0,
                            requested_lease_ms=0, predicted_lease_ms=0, lease_source=0, bytes_in_total=0,
                            bytes_out_total=total)


class Publisher:
    """Every connection's record to every LB node, once per `send`, totals growing; the hints
    the nodes answer arrive on the same socket (they go back to the sender's address)."""

    def __init__(self, ports: list[int], connections: int, interval_ms: int) -> None:
        self.ports = ports
        self.connections = connections
        self.interval_ms = interval_ms
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.sequence = itertools.count(time.time_ns() // 1000)
        self.step = 0

    def send(self) -> None:
        self.step += 1
        records = [_record(i, 1000 * self.step * (i + 1)) for i in range(self.connections)]
        header = PacketHeader(node_id=SERVER_NODE, sequence=next(self.sequence), timestamp_ms=int(time.time() * 1000),
                              interval_ms=self.interval_ms)
        for datagram in encode_packet(header, records, KEY, 1400):
            for port in self.ports:
                self.sock.sendto(datagram, ("127.0.0.1", port))
            header = PacketHeader(node_id=SERVER_NODE, sequence=next(self.sequence), timestamp_ms=header.timestamp_ms,
                                  interval_ms=self.interval_ms)

    def hints(self):
        """(LB node id, hints) of each hint datagram received since the last call."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            try:
                header, hints = decode_hints(data, KEY)
            except PacketError:
                continue
            yield header.node_id, hints

    def interval(self, on_hints=None) -> None:
        """One interval: the records sent, then the rest of it slept, or spent handing each hint
        datagram that arrives to on_hints(LB node id, hints)."""
        end = time.monotonic() + self.interval_ms / 1000
        self.send()
        while (left := end - time.monotonic()) > 0:
            if on_hints is None:
                time.sleep(left)
            elif select.select([self.sock], [], [], left)[0]:
                for lbnode_id, hints in self.hints():
                    on_hints(lbnode_id, hints)

    def run_until(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
            self.interval()

    def close(self) -> None:
        self.sock.close()


def lbnodes(tmp: Path, seeds: list[str], count: int, interval_ms: int, slots: int, **cluster) -> list[LbNodeProcess]:
    """`count` LB node processes (not started) of one tier on the store at `seeds`, ids 100, 101, ..."""
    key = tmp / "lease.key"
    key.write_bytes(KEY)
    cluster = {"store": seeds, "namespace": f"proc-{time.time_ns()}", "slots": slots, "membership_ms": 900,
               "timeout_ms": 300, "grace_ms": 3000, **cluster}
    return [LbNodeProcess(tmp, config={"lbnode": {"key_file": str(key), "node_id": 100 + i, "interval_ms": interval_ms},
                                       "cluster": cluster})
            for i in range(count)]


def metric(node: LbNodeProcess, name: str) -> float:
    return node.metrics().get(name, 0.0)


def total(nodes, name: str) -> float:
    return sum(metric(n, name) for n in nodes)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (/proc/PID/statm)."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
