"""LB node memory: RSS idle and with N connections held, at the default limits.

  PYTHONPATH=. python benchmarks/bench_lbnode_memory.py [--held 10000 100000 1000000] [--results RESULTS.md]

Starts `python -m spoa lbnode` as an operator does (default configuration:
lbnode.max_connections 1 M, TSB forecaster, activity policy, anomaly
detection, 32 intervals of history), reads its resident set idle, then sends
it publishing packets over UDP on loopback (2 segments per connection, the
usual record) in steps, waits until its metrics hold every connection and
reads the RSS again. The tables grow with what they hold; they used to be
preallocated for max_connections (about 430 MB idle).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks._results import write_section
from benchmarks._machine import cpu_model
from benchmarks.bench_lbnode import KEY, PACKET, records
from spoa.testing import free_port, scrape_metrics, wait_port
from spoa.wire import _packet
from spoa.wire.records import PacketHeader


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def send(sock: socket.socket, address: tuple, first: int, count: int, sequence: int) -> int:
    """Connections first..first+count as packets of PACKET records; the next sequence."""
    for k in range(first, first + count, PACKET):
        recs = records(min(PACKET, first + count - k), 2, 1000, first=k)
        for i, datagram in enumerate(_packet.encode_packet(PacketHeader(1, sequence, int(time.time() * 1000), 1000),
                                                            recs, KEY, 1400)):
            sock.sendto(datagram, address)
            if i % 200 == 199:
                time.sleep(0.01)  # within the LB node's receive buffer and ingest rate
        sequence += 1
    return sequence


def settled(metrics: int) -> int:
    """Connections held once the count stops moving (the datagrams are in)."""
    last = -1
    while True:
        time.sleep(2.0)  # an interval or two
        now = int(scrape_metrics(metrics).get("spoa_lbnode_connections", 0))
        if now == last:
            return now
        last = now


def measure(held: list[int]) -> list[tuple[int, float]]:
    """[(connections held, RSS MiB)], the first row idle."""
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "key"
        key_file.write_bytes(KEY)
        # Long leases: the connections stay held while the steps run.
        cfg = Path(tmp) / "lbnode.yaml"
        cfg.write_text(yaml.safe_dump({"lbnode": {"key_file": str(key_file)},
                                       "lease": {"standard_ms": 600_000, "min_ms": 600_000}}))
        port, metrics = free_port(), free_port()
        proc = subprocess.Popen([sys.executable, "-m", "spoa", "lbnode", "--config", str(cfg), "--listen",
                                 f"127.0.0.1:{port}", "--metrics", f"127.0.0.1:{metrics}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            wait_port(metrics, proc=proc)
            time.sleep(2.0)  # a few idle intervals
            rows = [(0, rss_mib(proc.pid))]
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            done, sequence = 0, 1
            for target in sorted(held):
                sequence = send(sock, ("127.0.0.1", port), done, target - done, sequence)
                done = target
                held_now = settled(metrics)
                rows.append((held_now, rss_mib(proc.pid)))
            return rows
        finally:
            proc.terminate()
            proc.wait(30)


def section(rows: list[tuple[int, float]]) -> str:
    idle = rows[0][1]
    lines = "\n".join(f"| {n:,} | {rss:.0f} | {(rss - idle) * 2**20 / n:.0f} |" if n else f"| 0 (idle) | {rss:.0f} | |"
                      for n, rss in rows)
    return f"""## LB node memory: idle and held connections (bench_lbnode_memory.py)

Machine: {cpu_model()}, {os.cpu_count()} CPUs. `python -m spoa lbnode` with the default limits
(`lbnode.max_connections` 1,000,000, TSB, activity policy, anomaly on, `forecast.history` 32), fed
over UDP on loopback, 2 segments per connection. The tables start at 1,024 slots and double as
connections arrive, so memory follows the connections held, not the limit (before: arrays
preallocated for 1 M connections: 414 MB idle measured here on the previous main, 453 MB with
100,000 held). RSS includes the interpreter and numpy. Connections held are what the LB node's
metrics count (datagrams its receive buffer dropped at the send rate are not resent).

| connections held | RSS MiB | bytes per held connection (above idle) |
|---:|---:|---:|
{lines}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--held", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--results", type=Path, help="write the section into this RESULTS.md")
    args = parser.parse_args(argv)
    text = section(measure(args.held))
    print(text)
    if args.results:
        write_section(args.results, "## LB node memory: ", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
