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

from .e2e.tier import Agent, lbnodes, metric, start_tier, total

CONNECTIONS = 300
INTERVAL_MS = 200
SLOTS = 64
MEMBERSHIP_MS = 900
# From SIGKILL to hints from the new owners for every connection of the dead node: its
# membership lapses (900 ms), a survivor's next read of the live set (every 300 ms), the load
# of its slots, the map on its next interval, then one interval of the agent and one of the
# new owner. About 1.5-2 s measured; the bound leaves room for a loaded machine.
RESUME_INTERVALS = 20


async def _tier(tmp_path, store_cluster, scenario) -> None:
    """Three LB node processes of one tier, every connection held once across them, the agent
    routing by their map; then `scenario(nodes, agent)`; every node killed (and thawed) after."""
    nodes = lbnodes(tmp_path, store_cluster.seeds, 3, INTERVAL_MS, SLOTS, membership_ms=MEMBERSHIP_MS)
    agent = Agent(nodes, CONNECTIONS, INTERVAL_MS, SLOTS)
    try:
        await start_tier(nodes, agent, 15)
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
    not_owned = await asyncio.to_thread(total, nodes, "spoa_lbnode_records_not_owned_total")
    routed = agent.publisher.records_routed
    agent.hinted.clear()
    await agent.intervals(4)
    assert await asyncio.to_thread(total, nodes, "spoa_lbnode_records_not_owned_total") == not_owned
    assert agent.publisher.records_routed - routed == 4 * CONNECTIONS
    owner = agent.owner_of()
    assert {conn: node for conn, (node, _t) in agent.hinted.items()} == owner


def _healthy(nodes) -> None:
    """No premature expiry on any node, none fenced."""
    for node in nodes:
        m = node.metrics()
        assert m["spoa_lbnode_premature_expiries_total"] == 0, node.log()
        assert m["spoa_lbnode_fenced"] == 0, node.log()


def test_sigkilled_lbnode_connections_are_adopted_and_the_agent_reroutes(tmp_path, store_cluster):
    async def scenario(nodes, agent):
        held = [metric(n, "spoa_lbnode_connections") for n in nodes]
        assert all(0.15 * CONNECTIONS < h < 0.55 * CONNECTIONS for h in held), held  # each its share
        await _routed_only_to_owners(nodes, agent)
        victim, survivors = nodes[0], nodes[1:]
        lost = held[0]
        assert metric(victim, "spoa_lbnode_store_write_rows_total") >= lost
        orphans = [conn for conn, owner in agent.owner_of().items() if owner == 100]
        assert len(orphans) == lost
        new_before = total(survivors, "spoa_lbnode_new_connections_total")
        killed = time.monotonic()
        victim.kill()

        def resumed() -> bool:
            return all(agent.hinted[c][1] > killed and agent.hinted[c][0] != 100 for c in orphans)

        await agent.run_until(resumed, RESUME_INTERVALS * INTERVAL_MS / 1000,
                              f"hints from new owners for the killed node's {lost:.0f} connections")
        resume = time.monotonic() - killed
        print(f"SIGKILL to hints from the new owners: {resume:.2f} s ({resume * 1000 / INTERVAL_MS:.1f} intervals)")
        assert agent.routed_to(2)  # the agent re-routed by itself
        adopted = total(survivors, "spoa_lbnode_connections_adopted_total")
        assert adopted == lost, (adopted, lost)
        assert total(survivors, "spoa_lbnode_slots_owned") == SLOTS
        await agent.run_until(lambda: total(survivors, "spoa_lbnode_connections") == CONNECTIONS, 5,
                              "every connection held by a survivor")
        await _routed_only_to_owners(survivors, agent)
        _healthy(survivors)
        assert total(survivors, "spoa_lbnode_store_write_errors_total") == 0
        # the victim's connections came to the survivors adopted, none as new
        assert total(survivors, "spoa_lbnode_new_connections_total") == new_before
        for node in survivors:
            assert node.stop() == 0

    asyncio.run(_tier(tmp_path, store_cluster, scenario))


def test_frozen_lbnode_is_fenced_on_waking_rejoins_and_gets_its_share_routed_back(tmp_path, store_cluster):
    async def scenario(nodes, agent):
        frozen, others = nodes[0], nodes[1:]
        frozen.proc.send_signal(signal.SIGSTOP)
        try:  # longer than its membership: the others take its slots, loading them from the store
            await agent.run_until(lambda: total(others, "spoa_lbnode_slots_owned") == SLOTS, 10,
                                  "the others to own every slot")
            await agent.run_until(lambda: agent.routed_to(2), 5, "the agent routing to the two others")
            await agent.run_until(lambda: total(others, "spoa_lbnode_connections") == CONNECTIONS, 5,
                                  "every connection held by the others")
        finally:
            frozen.proc.send_signal(signal.SIGCONT)
        await agent.run_until(lambda: metric(frozen, "spoa_lbnode_fences_total") == 1
                              and total(nodes, "spoa_lbnode_slots_owned") == SLOTS
                              and metric(frozen, "spoa_lbnode_slots_owned") > 0
                              and all(metric(n, "spoa_lbnode_tier_members") == 3 for n in nodes), 10,
                              "the woken node fenced, rejoined and owning its share again")
        await agent.run_until(lambda: agent.routed_to(3), 5, "the agent routing to all three again")
        await agent.run_until(lambda: total(nodes, "spoa_lbnode_connections") == CONNECTIONS, 5,
                              "every connection held once again")
        await _routed_only_to_owners(nodes, agent)
        _healthy(nodes)
        assert metric(frozen, "spoa_lbnode_connections_adopted_total") > 0  # its share back, from the store
        for node in nodes:
            assert node.stop() == 0

    asyncio.run(_tier(tmp_path, store_cluster, scenario))
