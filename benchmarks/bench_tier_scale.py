"""Ingest + persist of 1, 2 and 3 LB-node processes of one tier, same offered load (issue 13).

  PYTHONPATH=. python benchmarks/bench_tier_scale.py [--connections 30000] [--intervals 6]
      [--interval-ms 1000] [--nodes 1 2 3] [--results RESULTS.md]

A local 3-primary/3-replica Valkey cluster (spoa/tools/store_cluster.py); for each node count, that
many `python -m spoa lbnode` processes (default configuration, `cluster:` on it) and the agent's
own Publisher (tests/e2e/tier.py: each connection's record to its slot's owner once it has the
tier map) publishing the same N connections every interval, each one changed (the worst case:
every row written every interval). Over `--intervals` intervals after every connection is held
and written once, from /proc/PID/stat and the nodes' metrics:
- CPU of the LB nodes (summed, and the busiest one's share of a core), of the store (every
  valkey-server process, replicas included) and of the agent (this process), µs per connection
  per interval;
- store commands and payload bytes per connection per interval, agent -> LB node bytes too, and
  the primaries' memory per connection (INFO used_memory, grown since the node count's start);
- capacity: the connections per second the tier takes before its busiest node fills a core
  (offered rate / that share), and before this machine's cores fill (offered rate x nproc / every
  process's CPU share, the agent's and the store's included);
then, with the most nodes, the failover: SIGKILL of one LB node to the first hint from the new
owner for one of its connections (and for all of them), as the agent receives them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _machine import cpu_model  # noqa: E402 - benchmarks/ is the script's folder
from _results import report  # noqa: E402
from spoa.tools.store_cluster import StoreCluster  # noqa: E402
from tests.e2e.tier import Agent, cpu_seconds, lbnodes, start_tier, total  # noqa: E402

SLOTS = 1024  # the default
COUNTERS = ("spoa_lbnode_store_write_rows_total", "spoa_lbnode_store_write_commands_total",
            "spoa_lbnode_store_write_bytes_total", "spoa_lbnode_premature_expiries_total")


def _store_memory(cluster: StoreCluster) -> int:
    """Bytes the primaries hold (INFO used_memory, summed)."""
    used = 0
    for node in cluster.nodes:
        if node.primary is None:
            client = cluster.client(node)
            used += int(client.info("memory")["used_memory"])
            client.close()
    return used


def _readings(nodes, cluster: StoreCluster, agent: Agent) -> dict:
    return {"wall": time.monotonic(), "lb": [cpu_seconds(n.proc.pid) for n in nodes],
            "primaries": sum(cpu_seconds(s.process.pid) for s in cluster.nodes if s.primary is None),
            "store": sum(cpu_seconds(s.process.pid) for s in cluster.nodes), "agent": time.process_time(),
            "sent": agent.publisher.bytes_sent, **{name: total(nodes, name) for name in COUNTERS}}


async def _failover(nodes, agent: Agent, timeout: float) -> tuple[float, float]:
    """Seconds from SIGKILL of the first node to the first hint from a new owner for one of its
    connections, and for every one of them (bounded by timeout)."""
    victim = 100  # lbnodes' first id
    orphans = [conn for conn, owner in agent.owner_of().items() if owner == victim]
    killed = time.monotonic()
    nodes[0].kill()

    def resumed(conn: int) -> bool:
        node, at = agent.hinted.get(conn, (victim, 0.0))
        return at > killed and node != victim

    first = None
    deadline = killed + timeout
    while not all(map(resumed, orphans)):
        assert time.monotonic() < deadline, f"no hints from new owners within {timeout}s of the SIGKILL"
        await agent.interval()
        if first is None and any(map(resumed, orphans)):
            first = min(agent.hinted[c][1] for c in orphans if resumed(c)) - killed
    return first, max(agent.hinted[c][1] for c in orphans) - killed


async def measure(count: int, connections: int, intervals: int, interval_ms: int, cluster: StoreCluster,
                  tmp: Path, failover: bool) -> dict:
    tmp.mkdir()
    nodes = lbnodes(tmp, cluster.seeds, count, interval_ms, SLOTS, membership_ms=max(900, 3 * interval_ms))
    agent = Agent(nodes, connections, interval_ms, SLOTS)
    memory = _store_memory(cluster)  # what earlier runs left (their own namespaces)
    try:
        await start_tier(nodes, agent, 30 + connections / 5000)
        await agent.intervals(2)  # every connection written once, the store's layout fields too
        before = _readings(nodes, cluster, agent)
        await agent.intervals(intervals)
        after = await asyncio.to_thread(_readings, nodes, cluster, agent)
        out = {"nodes": count}
        wall = after["wall"] - before["wall"]
        per = connections * intervals  # connection-intervals
        lb = [a - b for a, b in zip(after["lb"], before["lb"])]
        out["lb_us"] = sum(lb) / per * 1e6
        out["busiest"] = max(lb) / wall  # share of one core
        out["store_us"] = (after["store"] - before["store"]) / per * 1e6
        out["store_share"] = (after["store"] - before["store"]) / wall
        out["primary_us"] = (after["primaries"] - before["primaries"]) / per * 1e6
        out["store_memory"] = (_store_memory(cluster) - memory) / connections  # bytes per connection, primaries
        out["agent_us"] = (after["agent"] - before["agent"]) / per * 1e6
        out["rows_per_s"] = (after[COUNTERS[0]] - before[COUNTERS[0]]) / wall
        out["commands"] = (after[COUNTERS[1]] - before[COUNTERS[1]]) / per
        out["bytes"] = (after[COUNTERS[2]] - before[COUNTERS[2]]) / per
        out["sent"] = (after["sent"] - before["sent"]) / per
        out["premature"] = after[COUNTERS[3]]
        offered = connections / (interval_ms / 1000)
        out["offered"] = offered
        out["capacity_nodes"] = offered / out["busiest"]
        everything = (sum(lb) + after["store"] - before["store"] + after["agent"] - before["agent"]) / wall
        out["capacity_box"] = offered * os.cpu_count() / everything
        if failover:
            out["failover"] = await _failover(nodes, agent, 30)
        return out
    finally:
        for node in nodes:
            node.kill()
        agent.publisher.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=30_000)
    parser.add_argument("--intervals", type=int, default=6)
    parser.add_argument("--interval-ms", type=int, default=1000)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    began = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, StoreCluster(3, 1, 1000) as cluster:
        results = []
        for count in args.nodes:
            r = asyncio.run(measure(count, args.connections, args.intervals, args.interval_ms, cluster,
                                    Path(tmp) / str(count), count == max(args.nodes) and count > 1))
            assert r["premature"] == 0, r
            results.append(r)
            one = results[0]
            rows.append(f"| {count} | {r['rows_per_s']:,.0f} | {r['lb_us']:.2f} | {r['busiest']:.3f} | "
                        f"{r['store_us']:.2f} ({r['primary_us']:.2f}) | {r['store_share']:.3f} | {r['store_memory']:,.0f} | {r['agent_us']:.2f} | {r['commands']:.3f} | "
                        f"{r['bytes']:.0f} | {r['sent']:.0f} | {r['capacity_nodes']:,.0f} "
                        f"({r['capacity_nodes'] / one['capacity_nodes']:.2f}x) | {r['capacity_box']:,.0f} "
                        f"({r['capacity_box'] / one['capacity_box']:.2f}x) |")
            print(rows[-1], flush=True)
    load_after = os.getloadavg()
    last = results[-1]
    failover = ""
    if "failover" in last:
        first, every = last["failover"]
        failover = (f"Failover with {last['nodes']} nodes (membership {max(900, 3 * args.interval_ms)} ms, interval "
                    f"{args.interval_ms} ms): SIGKILL of one LB node to the first hint from the new owner for one of "
                    f"its connections **{first:.2f} s**, for all of them {every:.2f} s, as the agent received them.")
    text = "\n".join([
        "## LB-node tier: 1, 2, 3 nodes (bench_tier_scale.py)", "",
        f"{began}, `nproc` {os.cpu_count()}, {cpu_model()}, loadavg {' '.join(f'{x:.2f}' for x in load_before)} "
        f"before, {' '.join(f'{x:.2f}' for x in load_after)} after (a shared box: ratios within this run are the "
        f"figures). Local 3-primary/3-replica Valkey cluster (started in {cluster.started_s:.1f} s), {SLOTS} slots; "
        f"the agent's Publisher routing {args.connections:,} connections to their owners every "
        f"{args.interval_ms} ms, each changed every interval, {args.intervals} intervals measured. µs are CPU per "
        "connection per interval (LB nodes summed; store: every valkey-server, replicas included; agent: the "
        "publisher). Store memory: primaries' used_memory grown, per connection. Share: fraction of one core. Capacity: connections per second before the busiest LB node "
        "fills a core, and before this box's cores fill with everything on it (agent and store included).", "",
        "| LB nodes | rows persisted/s | LB µs | busiest node share | store µs (primaries) | store share "
        "| store memory B/conn | agent µs "
        "| commands/conn | store bytes/conn | agent bytes/conn | capacity, nodes | capacity, box |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, "", failover, ""])
    report(args.results, "## LB-node tier: 1, 2, 3 nodes", text)


if __name__ == "__main__":
    main()
