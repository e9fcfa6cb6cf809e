"""LB node: ingest records/s, per-interval forecast+lease cost, memory per connection.

  PYTHONPATH=. python benchmarks/bench_lbnode.py [--connections N]

decode = the datagrams into records (compiled vs pure-Python packet codec,
same run); ingest = LeaseTable.ingest of decoded records (known connections
refreshed, or seen for the first time). interval = LeaseTable.end_interval
for N refreshed connections (SES forecaster, volume and activity policies).
memory = tracemalloc growth per held connection (table arrays preallocated
for the capacity are counted per slot of capacity).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

from spoa import _packet, _packet_py
from spoa.forecast import SES
from spoa.lbnode import LeaseTable
from spoa.lease_policy import ActivityPolicy, LeaseBounds, VolumePolicy
from spoa.records import ConnectionRecord, PacketHeader, SegmentRecord

KEY = b"k" * 32
BOUNDS = LeaseBounds(min_ms=3000, max_ms=3_600_000, standard_ms=30_000)


def records(n: int, total: int) -> list[ConnectionRecord]:
    seg = (SegmentRecord(1, 0, total, 1000, 2, 1, 0),)
    return [ConnectionRecord(conn_id=i.to_bytes(16, "big"), src="192.0.2.1", src_port=1024 + i % 60000,
                             dst="198.51.100.1", dst_port=443, frontend="fe", flags=0, counter_source=0,
                             granularity_level=0, requested_lease_ms=0, predicted_lease_ms=0, lease_source=0,
                             bytes_in_total=0, bytes_out_total=total, segments=seg) for i in range(n)]


def table(n: int, policy: str) -> LeaseTable:
    p = VolumePolicy(BOUNDS, 100.0) if policy == "volume" else ActivityPolicy(BOUNDS, capacity=n)
    return LeaseTable(n, SES(n), p, BOUNDS.standard_ms, 1000)


def decode_rate(codec, n: int) -> float:
    datagrams = codec.encode_packet(PacketHeader(1, 1, 0, 1000), records(n, 5000), KEY, 65507)
    started = time.perf_counter()
    for d in datagrams:
        codec.decode_datagram(d, KEY)
    return n / (time.perf_counter() - started)


def ingest_rate(n: int, refresh: bool) -> float:
    """Records/s into the table: first sight (allocation) or a refresh of known connections."""
    t = table(n, "volume")
    if refresh:
        t.ingest(1, records(n, 5000), 1000)
        t.end_interval(1000)
    batch = records(n, 10000)
    started = time.perf_counter()
    for i in range(0, n, 1000):  # packets of 1000 records, as decoded datagrams arrive
        t.ingest(1, batch[i:i + 1000], 2000)
    return n / (time.perf_counter() - started)


def interval_ns(n: int, policy: str) -> float:
    t = table(n, policy)
    t.ingest(1, records(n, 5000), 1000)
    t.end_interval(1000)
    best = float("inf")
    for k in range(2, 6):
        t.ingest(1, records(n, 5000 * k), 1000 * k)
        started = time.perf_counter()
        t.end_interval(1000 * k)
        best = min(best, time.perf_counter() - started)
    return best / n * 1e9


def memory_per_connection(n: int) -> float:
    recs = records(n, 5000)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t = table(n, "volume")
    t.ingest(1, recs, 1000)
    t.end_interval(1000)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(t) == n
    return (after - before) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=100_000)
    n = ap.parse_args().connections
    c, p = decode_rate(_packet, n), decode_rate(_packet_py, n // 10)
    print(f"decode, records/s: compiled codec {c:,.0f}, pure-Python codec {p:,.0f} ({c / p:.1f}x)")
    print(f"table ingest, records/s: refresh {ingest_rate(n, True):,.0f}, first sight {ingest_rate(n, False):,.0f}")
    for policy in ("volume", "activity"):
        print(f"end_interval ({policy} policy, SES): {interval_ns(n, policy):,.0f} ns per connection")
    print(f"memory per held connection (record cache not counted): {memory_per_connection(n):,.0f} B")


if __name__ == "__main__":
    main()
