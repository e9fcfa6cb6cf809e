#!/usr/bin/env python3
"""Soak: thousands of keep-alive clients through a real HAProxy for minutes.

The whole product as an operator runs it, on loopback: HAProxy (example.cfg +
agents.cfg), `python -m spoa agent`, `python -m spoa lbnode`, an asyncio app
server, and --connections keep-alive clients each sending a request every
~1/--rate seconds (jittered) for --duration seconds. Every --sample seconds
it records each daemon's RSS (VmRSS) and CPU time (utime + stime), and the
agent's and LB node's metrics.

Reported: requests and their statuses, the share of responses whose X-Lease
says `predicted` after the first minute, each process's RSS slope (least
squares over the samples after --warm-up seconds, MiB per minute: a leak
shows as a slope that does not flatten) and CPU per reporting interval (ms,
and µs per tracked connection), hints sent by the LB node vs applied +
refused at the agent, UDP drops.

    python benchmarks/bench_soak.py [--connections 5000] [--duration 300] [--haproxy 3.2] \
        [--json OUT] [--results benchmarks/RESULTS.md]

Bounded: loopback only, a fixed number of connections, stops after --duration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _machine import cpu_model  # noqa: E402 - benchmarks/ is the script's folder
from _results import write_section  # noqa: E402
from spoa.tools import provision  # noqa: E402
from spoa.tools.demo.loadgen import HttpConn, parse_lease  # noqa: E402
from tests.e2e.harness import AgentProcess, HAProxyProcess, LbNodeProcess, free_port, wait_port  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
KEY = b"soak-benchmark-shared-key-0123456"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB), in MiB per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    return 60 * sum((t - mx) * (v - my) for t, v in points) / var if var else 0.0


class Clients:
    def __init__(self, port: int, count: int, rate: float) -> None:
        self.port, self.count, self.rate = port, count, rate
        self.statuses: Counter = Counter()
        self.sources: Counter = Counter()  # after the first minute
        self.errors: Counter = Counter()
        self.started = time.monotonic()

    async def run(self, until: float) -> None:
        conns = []
        for _ in range(self.count):
            conns.append(await HttpConn.open("127.0.0.1", self.port))
        await asyncio.gather(*(self._client(conn, until) for conn in conns))

    async def _client(self, conn: HttpConn, until: float) -> None:
        try:
            while time.monotonic() < until:
                await asyncio.sleep(random.uniform(0.5, 1.5) / self.rate)
                status, headers, _ = await conn.request("/")
                self.statuses[status] += 1
                if time.monotonic() - self.started > 60:
                    lease = parse_lease(headers.get("x-lease"))
                    self.sources[lease[1] if lease else "none"] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError) as exc:
            self.errors[type(exc).__name__] += 1
        finally:
            await conn.close()


async def soak(args, procs: dict, agent: AgentProcess, lbnode: LbNodeProcess, port: int) -> dict:
    started = time.monotonic()
    until = started + args.duration
    clients = Clients(port, args.connections, args.rate)
    task = asyncio.create_task(clients.run(until))
    samples = []
    while not task.done():
        await asyncio.sleep(min(args.sample, max(0.0, until - time.monotonic()) + 0.01))
        t = time.monotonic() - started
        row = {"t": round(t, 1)}
        for name, pid in procs.items():
            row[f"{name}_rss_mib"] = round(rss_mib(pid), 1)
            row[f"{name}_cpu_s"] = cpu_s(pid)
        a = await asyncio.to_thread(agent.metrics)
        row["tracked"] = a.get("spoa_lease_tracked_connections", 0)
        row["agent_packets"] = a.get("spoa_lease_packets_sent_total", 0)
        samples.append(row)
        print(json.dumps(row), flush=True)
        if t > args.duration + 30:
            break
    await task
    a, n = agent.metrics(), lbnode.metrics()
    refused = sum(v for k, v in a.items() if k.startswith("spoa_lease_hints_refused_total"))
    return {"clients": clients, "samples": samples, "agent": a, "lbnode": n, "refused": refused}


def summarise(args, run: dict, line: str) -> dict:
    samples, clients = run["samples"], run["clients"]
    # After the warm-up and while the clients run (the tail after they stop
    # would dilute the per-connection figures).
    steady = [s for s in samples if args.warm_up <= s["t"] <= args.duration]
    out = {"connections": args.connections, "duration_s": args.duration, "rate_per_connection": args.rate,
           "haproxy_line": line, "interval_ms": args.interval_ms, "requests": sum(clients.statuses.values()),
           "statuses": dict(clients.statuses), "client_errors": dict(clients.errors),
           "sources_after_1min": dict(clients.sources)}
    total = sum(clients.sources.values())
    out["predicted_share"] = clients.sources["predicted"] / total if total else 0.0
    first, last = steady[0], steady[-1]
    span = last["t"] - first["t"]
    intervals = span * 1000 / args.interval_ms
    tracked = sum(s["tracked"] for s in steady) / len(steady)
    for name in ("agent", "lbnode", "haproxy"):
        points = [(s["t"], s[f"{name}_rss_mib"]) for s in steady]
        cpu = last[f"{name}_cpu_s"] - first[f"{name}_cpu_s"]
        out[name] = {"rss_start_mib": first[f"{name}_rss_mib"], "rss_end_mib": last[f"{name}_rss_mib"],
                     "rss_slope_mib_per_min": round(slope_per_min(points), 3),
                     "cpu_share": round(cpu / span, 3) if span else 0.0,
                     "cpu_ms_per_interval": round(1000 * cpu / intervals, 2) if intervals else 0.0,
                     "cpu_us_per_connection_interval": round(1e6 * cpu / intervals / tracked, 2)
                     if intervals and tracked else 0.0}
    a, n = run["agent"], run["lbnode"]
    out["tracked_connections_mean"] = round(tracked)
    out["hints"] = {"sent_by_lbnode": n.get("spoa_lbnode_hints_sent_total", 0),
                    "applied_at_agent": a.get("spoa_lease_hints_applied_total", 0), "refused_at_agent": run["refused"],
                    "udp_drops": n.get("spoa_lbnode_udp_drops_total", 0),
                    "premature_expiries": n.get("spoa_lbnode_premature_expiries_total", 0)}
    out["machine"] = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                      "kernel": platform.release()}
    return out


def markdown(s: dict) -> str:
    rows = "\n".join(
        f"| {name} | {s[name]['rss_start_mib']:.0f} → {s[name]['rss_end_mib']:.0f} | "
        f"{s[name]['rss_slope_mib_per_min']:+.3f} | {s[name]['cpu_share']:.2f} | {s[name]['cpu_ms_per_interval']} | "
        f"{s[name]['cpu_us_per_connection_interval']} |" for name in ("agent", "lbnode", "haproxy"))
    h = s["hints"]
    return f"""## Soak: {s['connections']} keep-alive clients through HAProxy {s['haproxy_line']} ({s['duration_s']} s)

`python benchmarks/bench_soak.py --connections {s['connections']} --duration {s['duration_s']:g} --haproxy {s['haproxy_line']}`
({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {s['machine']['cpu']}, {s['machine']['cores']} CPUs,
kernel {s['machine']['kernel']}, Python {s['machine']['python']}). Each client sends a request every
~{1 / s['rate_per_connection']:.0f} s (jittered); reporting interval {s['interval_ms']} ms; the figures below
are over the samples after the warm-up (the first minute of ramp-up and lease learning).

{s['requests']} requests, statuses {s['statuses']}, client errors {s['client_errors'] or 'none'};
after the first minute {100 * s['predicted_share']:.2f} % of responses carried a `predicted` lease
({s['sources_after_1min']}). Hints: {h['sent_by_lbnode']:.0f} sent by the LB node,
{h['applied_at_agent']:.0f} applied + {h['refused_at_agent']:.0f} refused at the agent; UDP drops
{h['udp_drops']:.0f}; premature expiries {h['premature_expiries']:.0f}. Mean tracked connections
{s['tracked_connections_mean']}.

CPU is each process's whole CPU time (for the agent: every SPOE message and the interval work)
divided by the reporting intervals, and by the tracked connections.

| process | RSS MiB (start → end) | RSS slope MiB/min | CPU (cores) | CPU ms per interval | µs per connection per interval |
|---|---:|---:|---:|---:|---:|
{rows}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of traffic")
    parser.add_argument("--rate", type=float, default=0.5, help="requests per second per connection")
    parser.add_argument("--interval-ms", type=int, default=1000, help="reporting interval of agent and LB node")
    parser.add_argument("--haproxy", choices=provision.LINES, default="3.2")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warm-up", type=float, default=60.0, help="seconds left out of slopes and CPU")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--results", type=Path, help="write the section into this RESULTS.md")
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 20000 or not 10 <= args.duration <= 3600:
        parser.error("--connections 1..20000 and --duration 10..3600: the soak stays bounded")
    binary = provision.ensure(args.haproxy)
    with tempfile.TemporaryDirectory(prefix="spoa-soak-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "lease.key").write_bytes(KEY)
        app_port = free_port()
        app = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "_app.py"), str(app_port)])
        wait_port(app_port, proc=app)
        lbnode = LbNodeProcess(tmp, config={
            "lbnode": {"key_file": str(tmp / "lease.key"), "interval_ms": args.interval_ms}}).start()
        agent = AgentProcess(tmp, config={
            "publish": {"lb_nodes": [f"127.0.0.1:{lbnode.port}"], "key_file": str(tmp / "lease.key"),
                        "interval_ms": args.interval_ms}}).start()
        haproxy = HAProxyProcess(binary, tmp, agent.port, app_port).start()
        procs = {"agent": agent.proc.pid, "lbnode": lbnode.proc.pid, "haproxy": haproxy.proc.pid}
        try:
            run = asyncio.run(soak(args, procs, agent, lbnode, haproxy.http_port))
        finally:
            haproxy.stop()
            agent.stop()
            lbnode.stop()
            app.terminate()
            app.wait(10)
    summary = summarise(args, run, args.haproxy)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "samples": run["samples"]}, indent=2))
    if args.results:
        write_section(args.results, "## Soak: ", markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
