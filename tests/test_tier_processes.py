"""The LB-node tier as operators run it: three `python -m spoa lbnode` processes on a real
3-primary/3-replica Valkey cluster, and the agent's own Publisher (spoa.servernode.publisher)
sending to them over UDP: it starts with every record to every LB node, learns the tier map
the LB nodes send and then routes each record to its slot's owner only.

SIGKILL one LB node: the survivors adopt its connections from the store (none new, no
premature expiry), announce the new map, the agent re-routes by itself, and hints for the
dead node's connections come from their new owners within a stated number of intervals.
SIGSTOP one past its membership: woken, it is fenced, rejoins, loads its share back, and the
agent routes that share to it again. HAProxy is not involved here (tests/e2e/ drive it).
"""

from __future__ import annotations

import asyncio
import signal
import time

import numpy as np

from spoa.servernode.publisher import Publisher
from spoa.wire.records import ConnectionRecord, PacketHeader
from spoa.wire.slots import conn_slots, owners

from .e2e.harness import LbNodeProcess

KEY = b"k" * 32
SERVER_NODE = 7
CONNECTIONS = 300
INTERVAL_MS = 200
SLOTS = 64
MEMBERSHIP_MS = 900
# From SIGKILL to hints from the new owners for every connection of the dead node: its
# membership lapses (900 ms), a survivor's next read of the live set (every 300 ms), the load
# of its slots, the map on its next interval, then one interval of the agent and one of the
# new owner. About 1.5-2 s measured; the bound leaves room for a loaded machine.
RESUME_INTERVALS = 20


def _record(i: int, total: int) -> ConnectionRecord:
    return ConnectionRecord(conn_id=i.to_bytes(16, "big"), src="192.0.2.1", src_port=1000 + i, dst="192.0.2.2",
                            dst_port=443, frontend="fe", flags=0, counter_source=0, granularity_level=0,
                            requested_lease_ms=0, predicted_lease_ms=0, lease_source=0, bytes_in_total=0,
                            bytes_out_total=total)


class Agent:
    """The agent's publishing side: its real Publisher, every connection's record once per
    interval (totals growing), and the hints that come back, by connection."""

    def __init__(self, nodes: list[LbNodeProcess]) -> None:
        self.publisher = Publisher([f"127.0.0.1:{node.port}" for node in nodes], KEY, 1400, on_hints=self._hints)
        self.sequence = time.time_ns() // 1000
        self.step = 0
        self.hinted: dict[int, tuple[int, float]] = {}  # conn -> (LB node id, monotonic time) of its last hint

    def _hints(self, header, hints) -> None:
        now = time.monotonic()
        for hint in hints:
            self.hinted[int.from_bytes(hint.conn_id, "big")] = (header.node_id, now)

    def send(self) -> None:
        self.step += 1
        records = [_record(i, 1000 * self.step * (i + 1)) for i in range(CONNECTIONS)]
        header = PacketHeader(node_id=SERVER_NODE, sequence=self.sequence, timestamp_ms=int(time.time() * 1000),
                              interval_ms=INTERVAL_MS)
        self.sequence = self.publisher.send(header, records) + 1

    async def run_until(self, predicate, timeout: float, what: str) -> None:
        """An interval at a time until predicate() (it may scrape metrics: run off the loop)."""
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(predicate):
            assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
            self.send()
            await asyncio.sleep(INTERVAL_MS / 1000)

    async def intervals(self, count: int) -> None:
        for _ in range(count):
            self.send()
            await asyncio.sleep(INTERVAL_MS / 1000)

    def owner_of(self) -> dict[int, int]:
        """Each connection's owner by the agent's map (what the LB nodes compute)."""
        live = self.publisher.router.map.live
        conn_ids = np.array([i.to_bytes(16, "big") for i in range(CONNECTIONS)], "V16")
        slots = conn_slots(np.full(CONNECTIONS, SERVER_NODE, np.uint64), conn_ids, SLOTS)
        return dict(enumerate(live[k] for k in owners(live, SLOTS)[slots].tolist()))


def _metric(node: LbNodeProcess, name: str) -> float:
    return node.metrics().get(name, 0.0)


def _total(nodes, name: str) -> float:
    return sum(_metric(n, name) for n in nodes)


def _routed_to(agent: Agent, count: int) -> bool:
    return agent.publisher.router.fresh and len(agent.publisher.router.map.members) == count


async def _tier(tmp_path, store_cluster, scenario) -> None:
    """Three LB node processes of one tier, every connection held once across them, the agent
    routing by their map; then `scenario(nodes, agent)`; every node killed (and thawed) after."""
    key = tmp_path / "lease.key"
    key.write_bytes(KEY)
    cluster = {"store": store_cluster.seeds, "namespace": f"proc-{time.time_ns()}", "slots": SLOTS,
               "membership_ms": MEMBERSHIP_MS, "timeout_ms": 300, "grace_ms": 3000}
    nodes = [LbNodeProcess(tmp_path, config={"lbnode": {"key_file": str(key), "node_id": 100 + i,
                                                        "interval_ms": INTERVAL_MS}, "cluster": cluster})
             for i in range(3)]
    agent = Agent(nodes)
    await agent.publisher.open()
    try:
        for node in nodes:
            node.start()
        await agent.run_until(lambda: _total(nodes, "spoa_lbnode_slots_owned") == SLOTS
                              and all(_metric(n, "spoa_lbnode_tier_members") == 3 for n in nodes), 15,
                              "three members sharing every slot")
        await agent.run_until(lambda: _routed_to(agent, 3), 5, "the agent routing by the tier map")
        await agent.run_until(lambda: _total(nodes, "spoa_lbnode_connections") == CONNECTIONS, 10,
                              "every connection held once across the tier")
        await scenario(nodes, agent)
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)  # a frozen one must take its SIGKILL
            node.kill()
        agent.publisher.close()


async def _routed_only_to_owners(nodes, agent: Agent) -> None:
    """Routing by the map: no LB node receives a record it does not own, and each
    connection's hints come from its owner only."""
    not_owned = await asyncio.to_thread(_total, nodes, "spoa_lbnode_records_not_owned_total")
    routed = agent.publisher.records_routed
    agent.hinted.clear()
    await agent.intervals(4)
    assert await asyncio.to_thread(_total, nodes, "spoa_lbnode_records_not_owned_total") == not_owned
    assert agent.publisher.records_routed - routed == 4 * CONNECTIONS
    owner = agent.owner_of()
    assert {conn: node for conn, (node, _t) in agent.hinted.items()} == owner


def test_sigkilled_lbnode_connections_are_adopted_and_the_agent_reroutes(tmp_path, store_cluster):
    async def scenario(nodes, agent):
        held = [_metric(n, "spoa_lbnode_connections") for n in nodes]
        assert all(0.15 * CONNECTIONS < h < 0.55 * CONNECTIONS for h in held), held  # each its share
        await _routed_only_to_owners(nodes, agent)
        victim, survivors = nodes[0], nodes[1:]
        lost = held[0]
        assert _metric(victim, "spoa_lbnode_store_write_rows_total") >= lost
        orphans = [conn for conn, owner in agent.owner_of().items() if owner == 100]
        assert len(orphans) == lost
        new_before = _total(survivors, "spoa_lbnode_new_connections_total")
        killed = time.monotonic()
        victim.kill()

        def resumed() -> bool:
            return all(agent.hinted[c][1] > killed and agent.hinted[c][0] != 100 for c in orphans)

        await agent.run_until(resumed, RESUME_INTERVALS * INTERVAL_MS / 1000,
                              f"hints from new owners for the killed node's {lost:.0f} connections")
        resume = time.monotonic() - killed
        print(f"SIGKILL to hints from the new owners: {resume:.2f} s ({resume * 1000 / INTERVAL_MS:.1f} intervals)")
        assert _routed_to(agent, 2)  # the agent re-routed by itself
        adopted = _total(survivors, "spoa_lbnode_connections_adopted_total")
        assert adopted == lost, (adopted, lost)
        assert _total(survivors, "spoa_lbnode_slots_owned") == SLOTS
        await agent.run_until(lambda: _total(survivors, "spoa_lbnode_connections") == CONNECTIONS, 5,
                              "every connection held by a survivor")
        await _routed_only_to_owners(survivors, agent)
        for node in survivors:
            m = node.metrics()
            assert m["spoa_lbnode_premature_expiries_total"] == 0, node.log()
            assert m["spoa_lbnode_fenced"] == 0 and m["spoa_lbnode_store_write_errors_total"] == 0
        # the victim's connections came to the survivors adopted, none as new
        assert _total(survivors, "spoa_lbnode_new_connections_total") == new_before
        for node in survivors:
            assert node.stop() == 0

    asyncio.run(_tier(tmp_path, store_cluster, scenario))


def test_frozen_lbnode_is_fenced_on_waking_rejoins_and_gets_its_share_routed_back(tmp_path, store_cluster):
    async def scenario(nodes, agent):
        frozen, others = nodes[0], nodes[1:]
        frozen.proc.send_signal(signal.SIGSTOP)
        try:  # longer than its membership: the others take its slots, loading them from the store
            await agent.run_until(lambda: _total(others, "spoa_lbnode_slots_owned") == SLOTS, 10,
                                  "the others to own every slot")
            await agent.run_until(lambda: _routed_to(agent, 2), 5, "the agent routing to the two others")
            await agent.run_until(lambda: _total(others, "spoa_lbnode_connections") == CONNECTIONS, 5,
                                  "every connection held by the others")
        finally:
            frozen.proc.send_signal(signal.SIGCONT)
        await agent.run_until(lambda: _metric(frozen, "spoa_lbnode_fences_total") == 1
                              and _total(nodes, "spoa_lbnode_slots_owned") == SLOTS
                              and _metric(frozen, "spoa_lbnode_slots_owned") > 0
                              and all(_metric(n, "spoa_lbnode_tier_members") == 3 for n in nodes), 10,
                              "the woken node fenced, rejoined and owning its share again")
        await agent.run_until(lambda: _routed_to(agent, 3), 5, "the agent routing to all three again")
        await agent.run_until(lambda: _total(nodes, "spoa_lbnode_connections") == CONNECTIONS, 5,
                              "every connection held once again")
        await _routed_only_to_owners(nodes, agent)
        for node in nodes:
            m = node.metrics()
            assert m["spoa_lbnode_premature_expiries_total"] == 0, node.log()
            assert m["spoa_lbnode_fenced"] == 0
        assert _metric(frozen, "spoa_lbnode_connections_adopted_total") > 0  # its share back, from the store
        for node in nodes:
            assert node.stop() == 0

    asyncio.run(_tier(tmp_path, store_cluster, scenario))
