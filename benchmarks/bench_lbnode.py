"""LB node: records/s decoded and ingested, per-interval cost, memory per connection.

  PYTHONPATH=. python benchmarks/bench_lbnode.py [--connections N] [--rounds R]

Workload: one server node's logical packet of N connections (default
100 000), IPv4, an 8-byte frontend name, each record with 2 segments (one per
direction, the usual record) or 16 (8 per direction), encoded at mtu 1400
(the product default: 7 records a datagram with 2 segments, 1 with 16) and
at 65507. Rates count connection records and segment records (connection
records x segments) per second; best of R rounds.

decode   ColumnBatch.append_datagram over every datagram (HMAC check, parse into
         numpy columns), batches cleared every DRAIN datagrams as the receiver
         does; decode_datagram (one ConnectionRecord + SegmentRecords per record)
         for comparison.
ingest   LeaseTable.ingest_batch of those batches: known connections refreshed
         (the steady state), or seen for the first time.
e2e      BatchReceiver.datagram_received per datagram (decode, replay check,
         batch) and a flush into LeaseTable.ingest_batch every DRAIN datagrams,
         as one drain of the UDP socket does; no socket.
compiled vs pure-Python: the same run with the twins (spoa.wire._packet_py,
spoa.lbnode._slotmap_py) on N / 10 connections.
interval LeaseTable.end_interval for N refreshed connections (SES forecaster,
         volume and activity policies), per connection.
memory   tracemalloc growth per held connection (table arrays preallocated for
         the capacity, segment history included, are counted per slot of capacity).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from contextlib import contextmanager

import numpy as np

from spoa import config
from spoa.lbnode import _slotmap, _slotmap_py, node, segment_history
from spoa.lbnode.forecast import SES
from spoa.lbnode.lease_policy import ActivityPolicy, LeaseBounds, VolumePolicy
from spoa.lbnode.node import LeaseTable
from spoa.lbnode.packet_receiver import BatchReceiver
from spoa.lbnode.service import policy_from_config
from spoa.wire import _packet, _packet_py
from spoa.wire.records import ConnectionRecord, PacketHeader, SegmentRecord

KEY = b"k" * 32
BOUNDS = LeaseBounds(min_ms=3000, max_ms=3_600_000, standard_ms=30_000)
DRAIN = 512  # datagrams per batch: spoa.lbnode.packet_receiver.DRAIN_DATAGRAMS
MTUS = (1400, 65507)
SEGMENTS = (2, 16)
PACKET = 10_000  # records per logical packet


def records(n: int, nseg: int, total: int, first: int = 0) -> list[ConnectionRecord]:
    segs = tuple(SegmentRecord(j & 1, (j >> 1) << 20, 1 << 20, 1000 + j, 2, 1_717_171_716_000, 0)
                 for j in range(nseg))
    return [ConnectionRecord(conn_id=(first + i).to_bytes(16, "big"), src="192.0.2.1", src_port=1024 + i % 60000,
                             dst="198.51.100.1", dst_port=443, frontend="fe_https", flags=0, counter_source=0,
                             granularity_level=0, requested_lease_ms=0, predicted_lease_ms=0, lease_source=0,
                             bytes_in_total=total, bytes_out_total=total, segments=segs) for i in range(n)]


def datagrams(n: int, nseg: int, mtu: int, total: int, sequence: int = 1) -> list[bytes]:
    """The records as packets of at most PACKET records (a packet has at most 65535 datagrams)."""
    recs = records(n, nseg, total)
    return [d for k in range(0, n, PACKET)
            for d in _packet.encode_packet(PacketHeader(1, sequence * n + k, 0, 1000), recs[k:k + PACKET], KEY, mtu)]


def table(n: int, nseg: int = 2, policy: str = "volume") -> LeaseTable:
    """`volume` / `activity`: the product's policies as configured by default (calibrated threshold,
    silences forecast by SES, end bound); `*-plain`: without those (the spec's fixed threshold,
    the empirical gap quantile, no end bound), to price them."""
    if policy.endswith("-plain"):
        p = VolumePolicy(BOUNDS, 100.0, capacity=n) if policy == "volume-plain" else ActivityPolicy(BOUNDS, capacity=n)
    else:
        lb = config.defaults(config.LBNODE_SCHEMA)
        lease = dict(lb["lease"], policy=policy, min_ms=BOUNDS.min_ms, max_ms=BOUNDS.max_ms,
                     standard_ms=BOUNDS.standard_ms)
        p = policy_from_config(lease, 1000, n, lb["forecast"])
    return LeaseTable(n, SES(n), p, BOUNDS.standard_ms, 1000, segments=segment_history.SegmentHistory(n * nseg, n))


@contextmanager
def twins(compiled: bool):
    """The compiled modules, or the pure-Python twins, behind the LB node."""
    modules = (node, segment_history)
    saved = [m.SlotMap for m in modules]
    for m in modules:
        m.SlotMap = (_slotmap if compiled else _slotmap_py).SlotMap
    try:
        yield _packet if compiled else _packet_py
    finally:
        for m, cls in zip(modules, saved):
            m.SlotMap = cls


def batches(codec, data: list[bytes]) -> list:
    out = []
    for k in range(0, len(data), DRAIN):
        batch = codec.ColumnBatch()
        for d in data[k:k + DRAIN]:
            batch.append_datagram(d, KEY)
        out.append(batch)
    return out


def best(rounds: int, run) -> float:
    """Shortest of `rounds` runs of run(), which returns its own elapsed seconds."""
    return min(run() for _ in range(rounds))


def decode_seconds(codec, data: list[bytes]) -> float:
    batch = codec.ColumnBatch()
    started = time.perf_counter()
    for k, d in enumerate(data):
        if k % DRAIN == 0:
            batch.clear()
        batch.append_datagram(d, KEY)
    return time.perf_counter() - started


def objects_seconds(codec, data: list[bytes]) -> float:
    started = time.perf_counter()
    for d in data:
        codec.decode_datagram(d, KEY)
    return time.perf_counter() - started


def ingest_seconds(codec, n: int, nseg: int, mtu: int, refresh: bool) -> float:
    """LeaseTable.ingest_batch alone: first sight (allocation) or a refresh of known connections."""
    t = table(n, nseg)
    if refresh:
        for b in batches(codec, datagrams(n, nseg, mtu, 5000)):
            t.ingest_batch(b, 1000)
        t.end_interval(1000)
    ready = batches(codec, datagrams(n, nseg, mtu, 10000, 2))
    started = time.perf_counter()
    for b in ready:
        t.ingest_batch(b, 2000)
    return time.perf_counter() - started


def e2e_seconds(codec, n: int, nseg: int, mtu: int) -> float:
    """Receiver to table for known connections: decode, replay check, ingest."""
    t = table(n, nseg)
    warm = BatchReceiver(KEY, lambda b: t.ingest_batch(b, 1000), batch=codec.ColumnBatch())
    for d in datagrams(n, nseg, mtu, 5000):
        warm.datagram_received(d, None)
    warm.flush()
    t.end_interval(1000)
    data = datagrams(n, nseg, mtu, 10000, 2)
    receiver = BatchReceiver(KEY, lambda b: t.ingest_batch(b, 2000), batch=codec.ColumnBatch(),
                             flush_records=1 << 30)
    receiver._scheduled = True  # as in drain(): the flush below covers the datagrams
    started = time.perf_counter()
    for k, d in enumerate(data):
        receiver.datagram_received(d, None)
        if k % DRAIN == DRAIN - 1:
            receiver.flush()
            receiver._scheduled = True
    receiver.flush()
    elapsed = time.perf_counter() - started
    assert receiver.accepted == len(data) and t.stats.refreshes == 2 * n
    return elapsed


def interval_ns(n: int, policy: str) -> float:
    t = table(n, 2, policy)
    t.ingest(1, records(n, 2, 5000), 1000)
    t.end_interval(1000)
    if t.policy.end_bound is not None:  # the class has closes behind it: the bound applies to every lease
        t.policy.end_bound.learn(np.zeros(64, np.intp), np.full(64, 30_000.0))
    fastest = float("inf")
    for k in range(2, 6):
        t.ingest(1, records(n, 2, 5000 * k), 1000 * k)
        started = time.perf_counter()
        t.end_interval(1000 * k)
        fastest = min(fastest, time.perf_counter() - started)
    return fastest / n * 1e9


def memory_per_connection(n: int) -> float:
    ready = batches(_packet, datagrams(n, 2, 1400, 5000))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t = table(n)
    for b in ready:
        t.ingest_batch(b, 1000)
    t.end_interval(1000)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(t) == n and len(t.segments) == 2 * n
    return (after - before) / n


def rates(n: int, nseg: int, seconds: float) -> str:
    return f"{n / seconds / 1e6:5.2f} M conn/s {n * nseg / seconds / 1e6:6.2f} M seg/s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    n, rounds = args.connections, args.rounds
    print(f"{n:,} connections (pure-Python twins: {n // 10:,}), best of {rounds}, batches of {DRAIN} datagrams")
    for mtu in MTUS:
        for nseg in SEGMENTS:
            data = datagrams(n, nseg, mtu, 5000)
            print(f"\nmtu {mtu}, {nseg} segments/record: {len(data):,} datagrams, {n / len(data):.1f} records each")
            for compiled in (True, False):
                with twins(compiled) as codec:
                    m = n if compiled else n // 10
                    some = data if compiled else datagrams(m, nseg, mtu, 5000)
                    name = "compiled" if compiled else "python  "
                    measured = {
                        "decode (columns)": best(rounds, lambda: decode_seconds(codec, some)),
                        "decode (objects)": best(rounds, lambda: objects_seconds(codec, some)),
                        "ingest refresh": best(rounds, lambda: ingest_seconds(codec, m, nseg, mtu, True)),
                        "ingest first sight": best(rounds, lambda: ingest_seconds(codec, m, nseg, mtu, False)),
                        "e2e decode+ingest": best(rounds, lambda: e2e_seconds(codec, m, nseg, mtu)),
                    }
                    for what, seconds in measured.items():
                        print(f"  {name} {what:<19} {rates(m, nseg, seconds)}")
                    if compiled:
                        e2e_compiled = measured["e2e decode+ingest"] / m
                    else:
                        print(f"  compiled / python, e2e: {measured['e2e decode+ingest'] / m / e2e_compiled:.1f}x")
    print()
    for policy in ("volume", "volume-plain", "activity", "activity-plain"):
        print(f"end_interval ({policy} policy, SES): {interval_ns(n, policy):,.0f} ns per connection")
    print(f"memory per held connection (2 segments, segment history included): {memory_per_connection(n):,.0f} B")


if __name__ == "__main__":
    main()
