"""An LB-node tier of real processes on loopback, and the agent's publishing side in front of it.

Shared by the tier's process tests and benchmarks/bench_tier_scale.py: `python -m spoa lbnode`
processes with a `cluster:` section on a local store (spoa/tools/store_cluster.py), the agent's
own Publisher (spoa.servernode.publisher: every record to every LB node until it learns the tier
map, then each to its slot's owner) with the hints that come back, and the /proc readings (CPU,
RSS) the measurements take.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import numpy as np

from spoa.servernode.publisher import Publisher
from spoa.wire.records import ConnectionRecord, PacketHeader
from spoa.wire.slots import conn_slots, owners

from .harness import LbNodeProcess

KEY = b"k" * 32
SERVER_NODE = 7
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _record(i: int, total: int) -> ConnectionRecord:
    return ConnectionRecord(conn_id=i.to_bytes(16, "big"), src="192.0.2.1", src_port=1000 + i % 60000, dst="192.0.2.2",
                            dst_port=443, frontend="fe", flags=0, counter_source=0, granularity_level=0,
                            requested_lease_ms=0, predicted_lease_ms=0, lease_source=0, bytes_in_total=0,
                            bytes_out_total=total)


class Agent:
    """The agent's publishing side: its real Publisher, every connection's record once per
    interval (totals growing), and the hints that come back, by connection."""

    def __init__(self, nodes: list[LbNodeProcess], connections: int, interval_ms: int, slots: int) -> None:
        self.publisher = Publisher([f"127.0.0.1:{node.port}" for node in nodes], KEY, 1400, on_hints=self._hints)
        self.connections = connections
        self.interval_ms = interval_ms
        self.slots = slots
        self.sequence = time.time_ns() // 1000
        self.step = 0
        self.hinted: dict[int, tuple[int, float]] = {}  # conn -> (LB node id, monotonic time) of its last hint

    def _hints(self, header, hints) -> None:
        now = time.monotonic()
        for hint in hints:
            self.hinted[int.from_bytes(hint.conn_id, "big")] = (header.node_id, now)

    def send(self) -> None:
        self.step += 1
        records = [_record(i, 1000 * self.step * (i + 1)) for i in range(self.connections)]
        header = PacketHeader(node_id=SERVER_NODE, sequence=self.sequence, timestamp_ms=int(time.time() * 1000),
                              interval_ms=self.interval_ms)
        self.sequence = self.publisher.send(header, records) + 1

    async def interval(self) -> None:
        """One interval: the records sent, the rest of it slept (hints arrive meanwhile)."""
        end = time.monotonic() + self.interval_ms / 1000
        self.send()
        await asyncio.sleep(max(0.0, end - time.monotonic()))

    async def run_until(self, predicate, timeout: float, what: str) -> None:
        """An interval at a time until predicate() (it may scrape metrics: run off the loop)."""
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(predicate):
            assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
            await self.interval()

    async def intervals(self, count: int) -> None:
        for _ in range(count):
            await self.interval()

    def owner_of(self) -> dict[int, int]:
        """Each connection's owner by the agent's map (what the LB nodes compute)."""
        live = self.publisher.router.map.live
        conn_ids = np.array([i.to_bytes(16, "big") for i in range(self.connections)], "V16")
        slots = conn_slots(np.full(self.connections, SERVER_NODE, np.uint64), conn_ids, self.slots)
        return dict(enumerate(live[k] for k in owners(live, self.slots)[slots].tolist()))

    def routed_to(self, count: int) -> bool:
        """The agent routes by a fresh map of `count` members."""
        router = self.publisher.router
        return router.fresh and len(router.map.members) == count


def lbnodes(tmp: Path, seeds: list[str], count: int, interval_ms: int, slots: int, **cluster) -> list[LbNodeProcess]:
    """`count` LB node processes (not started) of one tier on the store at `seeds`, ids 100, 101, ..."""
    key = tmp / "lease.key"
    key.write_bytes(KEY)
    cluster = {"store": seeds, "namespace": f"proc-{time.time_ns()}", "slots": slots, "membership_ms": 900,
               "timeout_ms": 300, "grace_ms": 3000, **cluster}
    return [LbNodeProcess(tmp, config={"lbnode": {"key_file": str(key), "node_id": 100 + i, "interval_ms": interval_ms},
                                       "cluster": cluster})
            for i in range(count)]


async def start_tier(nodes: list[LbNodeProcess], agent: Agent, timeout: float = 20, started=None) -> None:
    """Nodes started (then started(), before any record is sent); bounded waits until they share
    every slot, the agent routes by their map and every connection is held once across them."""
    count = len(nodes)
    await agent.publisher.open()
    for node in nodes:
        node.start()
    if started is not None:
        started()
    await agent.run_until(lambda: total(nodes, "spoa_lbnode_slots_owned") == agent.slots
                          and all(metric(n, "spoa_lbnode_tier_members") == count for n in nodes), timeout,
                          f"{count} members sharing every slot")
    await agent.run_until(lambda: agent.routed_to(count), timeout / 2, "the agent routing by the tier map")
    await agent.run_until(lambda: total(nodes, "spoa_lbnode_connections") == agent.connections, timeout / 2,
                          "every connection held once across the tier")


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
