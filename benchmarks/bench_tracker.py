"""Segment tracker: update throughput and memory per connection, Cython vs twin.

  python benchmarks/bench_tracker.py [--connections N] [--json OUT]

update: one cumulative-counter update of one connection direction that lands
bytes in its tail segment (the per-interval work of the kernel sampler loop).
Memory: tracemalloc-measured bytes per tracked connection (keys included) with
1 segment per direction and with 16 segments per connection.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
import tracemalloc

from spoa import _tracker, _tracker_py
from spoa.records import DIR_OUT

TWINS = {"cython": _tracker.SegmentTracker, "python": _tracker_py.SegmentTracker}


def make(cls, n):
    t = cls(max_connections=n + 1, max_total_segments=64 * n + 64, split_bytes=1 << 60)
    keys = [(i.to_bytes(4, "big") + b"\x00" * 32) for i in range(n)]  # compact 36-byte 4-tuple keys
    for i, k in enumerate(keys):
        t.register(k, i.to_bytes(16, "big"), "192.0.2.1", 1024 + i % 60000, "198.51.100.1", 443, "fe", 0)
    return t, keys


def updates_per_second(cls, n, rounds):
    t, keys = make(cls, n)
    update = t.update
    best = 0.0
    total = 0
    for r in range(rounds):
        total += 1000  # 1000 new bytes per connection per round: stays in the tail
        started = time.perf_counter()
        for k in keys:
            update(k, DIR_OUT, total, r, 1, 0)
        elapsed = time.perf_counter() - started
        best = max(best, n / elapsed)
    return best


def batch_updates_per_second(cls, n, rounds):
    """update_batch over the whole table per round: the kernel-sample shape."""
    from array import array

    t, keys = make(cls, n)
    best = 0.0
    packets = array("Q", [0] * n)
    stamps = array("q", [1] * n)
    for r in range(rounds):
        totals = array("Q", [1000 * (r + 1)] * n)
        started = time.perf_counter()
        t.update_batch(keys, DIR_OUT, totals, packets, stamps, 0)
        best = max(best, n / (time.perf_counter() - started))
    return best


def memory_per_connection(cls, n, segments):
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t, keys = make(cls, n)
    if segments > 2:
        # (segments - 1) full segments plus the tail, in the out direction
        size = t.segment_size
        for k in keys:
            t.update(k, DIR_OUT, size * (segments - 2) + 1, 0, 1, 0)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert t.total_segments == n * segments, (t.total_segments, n * segments)
    return (after - before) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=100_000)
    parser.add_argument("--json")
    args = parser.parse_args()
    n = args.connections
    result = {"machine": f"{platform.processor() or platform.machine()}, Python {platform.python_version()}",
              "connections": n, "twins": {}}
    for name, cls in TWINS.items():
        m = n if name == "cython" else n // 10
        result["twins"][name] = {
            "updates_per_s": updates_per_second(cls, m, 5),
            "batch_updates_per_s": batch_updates_per_second(cls, m, 5),
            "bytes_per_conn_1seg": memory_per_connection(cls, m, 2),
            "bytes_per_conn_16seg": memory_per_connection(cls, m, 16),
        }
    c, p = result["twins"]["cython"], result["twins"]["python"]
    print(f"{'':24}{'cython':>14}{'python':>14}{'ratio':>8}")
    print(f"{'updates/s':24}{c['updates_per_s']:>14,.0f}{p['updates_per_s']:>14,.0f}"
          f"{c['updates_per_s'] / p['updates_per_s']:>7.1f}x")
    print(f"{'updates/s, update_batch':24}{c['batch_updates_per_s']:>14,.0f}{p['batch_updates_per_s']:>14,.0f}"
          f"{c['batch_updates_per_s'] / p['batch_updates_per_s']:>7.1f}x")
    for label, key in (("bytes/conn, 1 seg/dir", "bytes_per_conn_1seg"), ("bytes/conn, 16 segs", "bytes_per_conn_16seg")):
        print(f"{label:24}{c[key]:>14,.0f}{p[key]:>14,.0f}{p[key] / c[key]:>7.1f}x")
    for key in ("bytes_per_conn_1seg", "bytes_per_conn_16seg"):
        print(f"1M connections, {key[-5:]}: {c[key] * 1e6 / 2**20:,.0f} MiB (cython)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
