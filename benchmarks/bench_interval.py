"""The agent's work per reporting interval, per connection, phase by phase.

  PYTHONPATH=. python benchmarks/bench_interval.py [--connections 10000,100000] [--rounds 5]

What LeaseModule.tick() does every interval for N tracked connections, with the
kernel sample handed in ready-made (a dict of TcpSample, as KernelSampler.sample()
returns it; the dump and parse themselves are in bench_sampler.py) and the
datagrams encoded but not sent:

- apply: _apply_kernel_sample (one SegmentTracker.apply_sample call: the sample
  joined to the tracker, counters of both directions, closing states, touch,
  closes of the missing)
- end_interval; publish: publish_batch(now), the due records in wire form
  written from the slab (a quiet connection whose refresh is not due yet is
  left out; each published one's next refresh time is set in the slab);
  begin_interval
- encode: encode_batch of those records into signed datagrams (mtu 1400, HMAC
  included), in packets of at most PACKET_RECORDS (as Publisher.send splits them)

Two traffic shapes: "active" (every connection moves bytes every interval: every
record goes out) and "idle, predicted" (no bytes, predicted leases of 60 s from
fresh hints: publish(now) defers every record, the reduced lease overhead).
Compiled modules vs the pure-Python twins (SPOA_NO_EXTENSIONS=1 in a child
process, at a tenth of the size), same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _machine import cpu_model

PHASES = ("apply", "end_interval", "publish", "begin_interval", "encode")


class FixedSampler:
    """Hands LeaseModule the sample prepared for the round."""

    def __init__(self) -> None:
        self.samples: dict = {}

    def sample(self) -> dict:
        return self.samples

    def set_ports(self, ports) -> None:
        pass


def run(n: int, rounds: int, idle: bool) -> dict:
    from spoa.servernode import lease_module
    from spoa.servernode.lease_module import LeaseModule, LeaseSettings
    from spoa.servernode.sampler import TcpSample, pack_key
    from spoa.servernode.tracker import SegmentTracker
    from spoa.wire.hints import Hint
    from spoa.servernode.publisher import PACKET_RECORDS
    from spoa.wire.packet import encode_batch
    from spoa.wire.records import LeaseSource, PacketHeader

    tracker = SegmentTracker(max_connections=n + 1, max_total_segments=8 * n + 64)
    sampler = FixedSampler()
    module = LeaseModule(tracker, sampler, None, 1000, 1, LeaseSettings())
    module._ports.add(443)
    now = time.time_ns() // 1_000_000
    keys, ids = [], []
    for i in range(n):
        client = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        key = pack_key("198.51.100.1", 443, client, 1024 + i % 60000)
        tracker.register(key, i.to_bytes(16, "big"), client, 1024 + i % 60000, "198.51.100.1", 443, "fe", now)
        keys.append(key)
        ids.append(i.to_bytes(16, "big"))
    best = dict.fromkeys(PHASES, float("inf"))
    published = 0
    for r in range(1, rounds + 2):
        moved = 1 if idle else r  # idle: the counters stop after the first round
        sampler.samples = {k: TcpSample(key=k, state=1, bytes_received=1000 * moved, bytes_acked=5000 * moved,
                                        segs_in=moved, segs_out=moved, data_segs_in=moved, data_segs_out=moved,
                                        last_data_recv_ms=0, last_data_sent_ms=0, rtt_us=100) for k in keys}
        # One interval later on the module's clock whatever the round took in
        # wall time: at 1M a round takes longer than a 60 s lease's refresh.
        now += 1000
        lease_module.now_ms = lambda: now
        if idle:  # fresh predicted 60 s leases from the LB node
            module.on_hints(None, [Hint(c, 60_000, LeaseSource.PREDICTED, 0) for c in ids])
        took = {}
        started = time.perf_counter()
        module._apply_kernel_sample(now)
        took["apply"] = time.perf_counter() - started
        started = time.perf_counter()
        tracker.end_interval(now)
        took["end_interval"] = time.perf_counter() - started
        started = time.perf_counter()
        records = tracker.publish_batch(now)
        took["publish"] = time.perf_counter() - started
        started = time.perf_counter()
        tracker.begin_interval(now)
        took["begin_interval"] = time.perf_counter() - started
        started = time.perf_counter()
        for start in range(0, len(records), PACKET_RECORDS):
            encode_batch(PacketHeader(1, r, now, 1000), records, b"k" * 32, 1400, start, start + PACKET_RECORDS)
        took["encode"] = time.perf_counter() - started
        if r > 2:  # the first two rounds register counters and publish everything once
            published = len(records)
            for phase in PHASES:
                best[phase] = min(best[phase], took[phase])
    return {"connections": n, "published_per_interval": published,
            "us_per_connection": {p: best[p] / n * 1e6 for p in PHASES},
            "total_us_per_connection": sum(best.values()) / n * 1e6}


def child(n: int, rounds: int) -> dict:
    """The same measurement with the pure-Python twins, in a fresh process."""
    env = dict(os.environ, SPOA_NO_EXTENSIONS="1")
    out = subprocess.run([sys.executable, __file__, "--child", str(n), "--rounds", str(rounds)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", default="10000,100000")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps({shape: run(args.child, args.rounds, shape == "idle") for shape in ("active", "idle")}))
        return
    print(f"{cpu_model()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; µs per connection per interval,"
          f" best of {args.rounds} rounds")
    header = f"{'shape':8}{'conns':>9}{'impl':>8}" + "".join(f"{p:>17}" for p in PHASES) + f"{'total':>9}{'sent':>11}"
    print(header)
    for n in (int(x) for x in args.connections.split(",")):
        twin = child(n // 10, args.rounds)
        for shape in ("active", "idle"):
            rows = (("cython", run(n, args.rounds, shape == "idle")), ("python", twin[shape]))
            for impl, row in rows:
                cells = "".join(f"{row['us_per_connection'][p]:>17.2f}" for p in PHASES)
                print(f"{shape:8}{row['connections']:>9,}{impl:>8}{cells}{row['total_us_per_connection']:>9.2f}"
                      f"{row['published_per_interval']:>11,}")
            ratio = rows[1][1]["total_us_per_connection"] / rows[0][1]["total_us_per_connection"]
            print(f"{'':25}python / cython total: {ratio:.1f}x")


if __name__ == "__main__":
    main()
