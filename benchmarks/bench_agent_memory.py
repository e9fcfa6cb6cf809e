#!/usr/bin/env python3
"""The server node agent's memory per tracked connection, whole process.

  PYTHONPATH=. python benchmarks/bench_agent_memory.py [--connections 100000]

Registers N connections through LeaseModule.on_message (real NOTIFY messages
decoded by the codec, as HAProxy sends lease-request), gives every one a fresh
predicted hint (LeaseModule.on_hints, what the LB nodes answer) and runs one
publish interval (records encoded, not sent). Reports per connection what
stays allocated: the Python heap (tracemalloc, after a collection) plus the
tracker's slab (SegmentTracker.memory_bytes: mmap'd, not seen by tracemalloc;
it holds every per-connection state of the agent, ids, hints and last publish
times included). The growth of the resident set is shown too: an upper bound,
it keeps the allocator's high-water mark of the interval's transient records
and messages.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spoa.servernode.lease_module import LeaseModule, LeaseSettings, connection_id  # noqa: E402
from spoa.servernode.tracker import SegmentTracker  # noqa: E402
from spoa.spop.codec import FrameReader, FrameWriter  # noqa: E402
from spoa.spop.constants import FrameType  # noqa: E402
from spoa.spop.frames import write_notify  # noqa: E402
from spoa.wire.hints import Hint  # noqa: E402
from spoa.wire.packet import encode_batch  # noqa: E402
from spoa.wire.records import LeaseSource, PacketHeader  # noqa: E402


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cid(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-000000000000"


def message(i: int):
    w = FrameWriter()
    write_notify(w, 1, 1, [("lease-request", [
        ("cid", cid(i)),
        ("src", ipaddress.IPv4Address(0x0A000000 + i)), ("src_port", 1024 + i % 60000),
        ("dst", ipaddress.IPv4Address("198.51.100.1")), ("dst_port", 443), ("frontend", "fe"),
        ("method", "GET"), ("path", "/"),
    ])])
    r = FrameReader(65536)
    r.feed(w.take())
    return r.next_frame().messages()[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=100_000)
    args = ap.parse_args()
    n = args.connections
    module = LeaseModule(SegmentTracker(max_connections=n + 1, max_total_segments=8 * n + 64), None, None, 1000, 1,
                         LeaseSettings())
    gc.collect()
    before = rss_bytes()
    tracemalloc.start()
    for i in range(n):
        w = FrameWriter()
        w.begin_frame(FrameType.ACK, 1, 1)
        module.on_message(message(i), w)
    module.on_hints(PacketHeader(1, 1, 0, 1000), [Hint(connection_id(cid(i)), 60_000, int(LeaseSource.PREDICTED), 1)
                                                  for i in range(n)])
    now = time.time_ns() // 1_000_000
    module.tracker.end_interval(now)
    records = module.tracker.publish_batch(now)  # as LeaseModule.tick publishes
    encode_batch(PacketHeader(1, 2, now, 1000), records, b"k" * 32, 1400)
    module.tracker.begin_interval(now)
    del records
    gc.collect()
    heap = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    grown = rss_bytes() - before
    tracker = module.tracker.memory_bytes()
    print(f"{n:,} connections, {len(module.tracker):,} tracked, {module.stats.hints_applied:,} hints applied; "
          "bytes per connection:")
    print(f"  whole agent (heap + slab){(heap + tracker) / n:7.0f}")
    print(f"  tracker slab             {tracker / n:7.0f}")
    print(f"  Python heap              {heap / n:7.0f}")
    print(f"  process RSS growth       {grown / n:7.0f}  (upper bound, see above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
