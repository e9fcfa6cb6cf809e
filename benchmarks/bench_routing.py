"""The agent's publishing to a tier of LB nodes: routed by the tier map, or sent to all (issue 13).

  PYTHONPATH=. python benchmarks/bench_routing.py [--connections 100000] [--lbnodes 3] [--rounds 5]
                                                  [--results benchmarks/RESULTS.md]

One interval's records of N connections (2 segments each), in wire form as the tracker's
publish_batch hands them over (a RecordBatch), go through the agent's real
Publisher (spoa/servernode/publisher.py) over UDP to `--lbnodes` bound sockets on 127.0.0.1
(the LB nodes' stand-ins, drained between intervals), in one run:
- **to all**: no tier map, every record to every LB node (as without a tier);
- **routed**: with a tier map, each record to its slot's owner only.
Per record: the agent's CPU (process time of Publisher.send), datagrams and bytes sent (to all,
each LB node gets every one of them; routed, its share). The routed path adds the split by owner (CRC16 of every key,
the owner lookup, one batch per owner) and saves encoding and sending each datagram once per
LB node.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import time
from pathlib import Path

from benchmarks._machine import cpu_model
from benchmarks._results import write_section
from spoa.servernode.publisher import Publisher
from spoa.wire.packet import RecordBatch
from spoa.wire.records import ConnectionRecord, PacketHeader, SegmentRecord
from spoa.wire.tier_map import TierMap

KEY = b"k" * 32
NODE = 7


def records(n: int) -> RecordBatch:
    now = int(time.time() * 1000)
    return RecordBatch.from_records([ConnectionRecord(conn_id=i.to_bytes(16, "big"), src="192.0.2.1", src_port=1024 + i % 60000,
                             dst="192.0.2.2", dst_port=443, frontend="fe", flags=0, counter_source=0,
                             granularity_level=0, requested_lease_ms=0, predicted_lease_ms=0, lease_source=0,
                             bytes_in_total=100, bytes_out_total=1000 + i,
                             segments=(SegmentRecord(0, 0, 1 << 20, 1000, 1, now, 0),
                                       SegmentRecord(1, 0, 1 << 20, 1000, 1, now, 0)))
            for i in range(n)])


def drain(sock: socket.socket) -> None:
    """Empty an LB node stand-in's receive buffer (what a full one drops is not counted: the
    figures are the sender's)."""
    while True:
        try:
            sock.recv(65535)
        except BlockingIOError:
            return


async def measure(n: int, lbnodes: int, rounds: int) -> dict:
    socks = []
    for _ in range(lbnodes):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        sock.setblocking(False)
        socks.append(sock)
    ports = [s.getsockname()[1] for s in socks]
    recs = records(n)
    out = {}
    for mode in ("to all", "routed"):
        publisher = Publisher([f"127.0.0.1:{p}" for p in ports], KEY, 1400)
        await publisher.open()
        if mode == "routed":
            publisher.router.take(TierMap(1, 1, 1024, tuple((100 + i, "127.0.0.1", p) for i, p in enumerate(ports))))
        cpu = []
        sequence = 1
        for _ in range(rounds):
            sent = publisher.datagrams_sent, publisher.bytes_sent
            began = time.process_time()
            sequence = publisher.send(PacketHeader(NODE, sequence, 1, 1000), recs) + 1
            cpu.append(time.process_time() - began)
            for s in socks:
                drain(s)
        publisher.close()
        out[mode] = {"cpu_us_per_record": 1e6 * statistics.median(cpu) / n,
                     "datagrams_per_round": (publisher.datagrams_sent - sent[0]),
                     "bytes_per_record": (publisher.bytes_sent - sent[1]) / n,
                     "send_errors": publisher.send_errors}
    for s in socks:
        s.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=100_000)
    ap.add_argument("--lbnodes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--results", type=Path, help="write the section into this RESULTS.md")
    args = ap.parse_args()
    result = asyncio.run(measure(args.connections, args.lbnodes, args.rounds))
    load = os.getloadavg()[0]
    lines = [f"## Agent publishing to a tier: routed vs to all ({args.connections:,} connections, "
             f"{args.lbnodes} LB nodes)", "",
             f"`benchmarks/bench_routing.py`, one run, {os.cpu_count()} vCPU {cpu_model()}, loadavg {load:.1f}; "
             "the agent's Publisher over UDP to local sockets, median of "
             f"{args.rounds} intervals, 2 segments per record.", "",
             "| mode | agent CPU µs per record | datagrams per interval | bytes sent per record |",
             "|---|---:|---:|---:|"]
    for mode, r in result.items():
        lines.append(f"| {mode} | {r['cpu_us_per_record']:.2f} | {r['datagrams_per_round']:,} | "
                     f"{r['bytes_per_record']:.0f} |")
    ratio = result["routed"]["cpu_us_per_record"] / result["to all"]["cpu_us_per_record"]
    lines += ["", f"Routed costs {ratio:.2f}× the agent CPU of sending to all {args.lbnodes} and sends "
              f"{result['routed']['bytes_per_record'] / result['to all']['bytes_per_record']:.2f}× the bytes; "
              "each LB node receives only its share instead of everything.", ""]
    text = "\n".join(lines)
    print(text)
    if args.results:
        write_section(args.results, "## Agent publishing to a tier", text)


if __name__ == "__main__":
    main()
