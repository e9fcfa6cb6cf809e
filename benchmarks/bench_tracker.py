"""Segment tracker: update throughput and memory per connection, Cython vs twin.

  python benchmarks/bench_tracker.py [--connections 10000,200000,1000000] [--rounds 5] [--json OUT]

Keys are the product's (records.pack_key: 36 bytes). Rows:
- update: one update() call per connection, landing bytes in its tail segment.
- update_batch, in order: one call for the whole table, keys in registration
  order (the slab is then walked in address order).
- update_batch, shuffled: the same keys freshly built in a random order (a
  kernel dump does not list sockets in registration order), so every
  connection is a cache/TLB miss; with update_batch's prefetching on (the
  default window) and off (window 0).
Compiled at each size, the pure-Python twin at a tenth of it.

Memory: per connection with 1 segment per direction and with 16 segments per
connection, by memory_bytes() and by RSS growth (/proc/self/statm; mmap'd slab
chunks are invisible to tracemalloc), each in a fresh child process so freed
memory of an earlier run cannot hide growth. The twin's is also measured with
tracemalloc, in a child of its own (tracemalloc's bookkeeping inflates RSS).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
import tracemalloc
from array import array
from pathlib import Path

from spoa.servernode import _tracker, _tracker_py
from spoa.wire.records import DIR_OUT, pack_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402

TWINS = {"cython": _tracker.SegmentTracker, "python": _tracker_py.SegmentTracker}
PAGE = os.sysconf("SC_PAGE_SIZE")


def conn_key(i: int) -> bytes:
    """HAProxy's socket 198.51.100.1:443 <-> client 10.x.y.z:port, distinct for i < 2^24."""
    return pack_key("198.51.100.1", 443, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1024 + i % 60000)


def make(cls, n):
    t = cls(max_connections=n + 1, max_total_segments=64 * n + 64, split_bytes=1 << 60)
    keys = [conn_key(i) for i in range(n)]
    for i, k in enumerate(keys):
        t.register(k, i.to_bytes(16, "big"), "10.0.0.1", 1024 + i % 60000, "198.51.100.1", 443, "fe", 0)
    return t, keys


def shuffled(n, seed=1):
    """The keys again, in a random order, as fresh objects (as a kernel sample makes them)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [conn_key(i) for i in order]


def updates_per_second(t, keys, rounds):
    update = t.update
    n = len(keys)
    best = 0.0
    for r in range(rounds):
        total = 1000 * (r + 1)  # 1000 new bytes per connection per round: stays in the tail
        started = time.perf_counter()
        for k in keys:
            update(k, DIR_OUT, total, r, 1, 0)
        best = max(best, n / (time.perf_counter() - started))
    return best


def batch_updates_per_second(t, keys, rounds, base):
    """update_batch over the whole table per round: the kernel-sample shape."""
    n = len(keys)
    packets = array("Q", [0] * n)
    stamps = array("q", [1] * n)
    best = 0.0
    for r in range(rounds):
        totals = array("Q", [base + 1000 * (r + 1)] * n)
        started = time.perf_counter()
        known = t.update_batch(keys, DIR_OUT, totals, packets, stamps, 0)
        best = max(best, n / (time.perf_counter() - started))
        assert known == n
    return best


def speed(name, n, rounds):
    cls = TWINS[name]
    rounds = max(rounds, 1_000_000 // n)  # >= 1M updates per row: small tables need many rounds
    t, keys = make(cls, n)
    row = {"connections": n, "update": updates_per_second(t, keys, rounds)}
    base = 1000 * rounds
    row["batch_in_order"] = batch_updates_per_second(t, keys, rounds, base)
    mixed = shuffled(n)
    del keys
    row["batch_shuffled"] = batch_updates_per_second(t, mixed, rounds, 2 * base)
    if name == "cython":
        window = _tracker.set_prefetch_window(0)
        try:
            row["batch_shuffled_no_prefetch"] = batch_updates_per_second(t, mixed, rounds, 3 * base)
        finally:
            _tracker.set_prefetch_window(window)
        row["prefetch_window"] = window
    del t, mixed
    gc.collect()
    return row


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def anon_huge_bytes():
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_child(name, n, segments, traced):
    """Runs in a child process: one tracker of n connections, measured by
    memory_bytes() and RSS, or (traced) by tracemalloc."""
    cls = TWINS[name]
    keys = [conn_key(i) for i in range(n)]
    ids = [i.to_bytes(16, "big") for i in range(n)]  # made before measuring, as keys are
    gc.collect()
    if traced:
        tracemalloc.start()
    rss0 = rss_bytes()
    before = tracemalloc.get_traced_memory()[0] if traced else 0
    t = cls(max_connections=n + 1, max_total_segments=64 * n + 64, split_bytes=1 << 60)
    base = t.memory_bytes()
    for i, k in enumerate(keys):
        t.register(k, ids[i], "10.0.0.1", 1024 + i % 60000, "198.51.100.1", 443, "fe", 0)
    if segments > 2:
        # (segments - 2) full segments plus the tail out, the in direction's one segment
        size = t.segment_size
        for k in keys:
            t.update(k, DIR_OUT, size * (segments - 2) + 1, 0, 1, 0)
    assert t.total_segments == n * segments, (t.total_segments, n * segments)
    gc.collect()
    result = {
        "memory_bytes": (t.memory_bytes() - base) / n,
        "rss": (rss_bytes() - rss0) / n,
        "anon_huge_pages_mib": (anon_huge_bytes() or 0) / 2**20,
    }
    if traced:
        result = {"tracemalloc": (tracemalloc.get_traced_memory()[0] - before) / n}
        tracemalloc.stop()
    elif name == "python":
        # the twin's estimate counts the keys and ids it holds; they existed before
        result["memory_bytes"] -= sum(sys.getsizeof(k) + sys.getsizeof(c) for k, c in zip(keys, ids)) / n
    return result


def memory(name, n, segments):
    def child(traced):
        out = subprocess.run([sys.executable, __file__, "--memory-child", name, str(n), str(segments), str(traced)],
                             check=True, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        return json.loads(out.stdout)

    result = child(0)
    if name == "python":
        result.update(child(1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", default="10000,200000,1000000",
                        help="comma-separated sizes for the compiled twin (the twin runs a tenth)")
    parser.add_argument("--rounds", type=int, default=5, help="at least; best round counts")
    parser.add_argument("--memory-connections", type=int, default=1_000_000)
    parser.add_argument("--json")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        name, n, segments, traced = args.memory_child
        print(json.dumps(memory_child(name, int(n), int(segments), traced == "1")))
        return
    sizes = [int(s) for s in args.connections.split(",")]
    result = {"machine": f"{cpu_model()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
              "speed": [], "memory": {}}
    print(result["machine"])
    print(f"\n{'updates/s':34}{'conns (c/py)':>16}{'cython':>13}{'python':>12}{'ratio':>8}")
    for n in sizes:
        c = speed("cython", n, args.rounds)
        p = speed("python", max(1, n // 10), args.rounds)
        result["speed"].append({"cython": c, "python": p})
        for label, key in (("update", "update"), ("update_batch, in order", "batch_in_order"),
                           ("update_batch, shuffled", "batch_shuffled")):
            print(f"{label:34}{f'{n:,}/{n // 10:,}':>16}{c[key]:>13,.0f}{p[key]:>12,.0f}{c[key] / p[key]:>7.1f}x")
        gain = c["batch_shuffled"] / c["batch_shuffled_no_prefetch"]
        print(f"{'update_batch, shuffled, no prefetch':34}{f'{n:,}':>16}{c['batch_shuffled_no_prefetch']:>13,.0f}"
              f"{'':>12}{gain:>7.2f}x (prefetch {c['prefetch_window']})")
    m = args.memory_connections
    print(f"\n{'bytes/connection':34}{'conns (c/py)':>16}{'cython':>13}{'python':>12}{'ratio':>8}")
    for segments, label in ((2, "1 seg/dir"), (16, "16 segs")):
        c = memory("cython", m, segments)
        p = memory("python", m // 10, segments)
        result["memory"][label] = {"cython": c, "python": p, "connections": m}
        for how in ("memory_bytes", "rss"):
            print(f"{f'{label}, {how}':34}{f'{m:,}/{m // 10:,}':>16}{c[how]:>13,.0f}{p[how]:>12,.0f}"
                  f"{p[how] / c[how]:>7.1f}x")
        print(f"{f'{label}, tracemalloc':34}{'':>16}{'-':>13}{p['tracemalloc']:>12,.0f}")
        print(f"  {m:,} connections, {label}: {c['memory_bytes'] * m / 2**20:,.0f} MiB by memory_bytes, "
              f"{c['rss'] * m / 2**20:,.0f} MiB by RSS (cython; AnonHugePages {c['anon_huge_pages_mib']:,.0f} MiB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
