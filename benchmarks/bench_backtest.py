"""Lease backtest on a 100k-connection trace: does `python -m spoa backtest` finish in under a minute?

    python benchmarks/bench_backtest.py [--connections 100000] [--seed 1] [--duration 600]
                                        [--mix default|real-like] [--jobs 2] [--json OUT]

Generates a seeded synthetic trace (spoa.tools.backtest.synthetic, the default mix:
heavy-tailed on/off, bulk, keep-alive only, websocket-like chatty, HTTP
keep-alive), writes it as CSV (not timed), then times the command as an
operator runs it (a subprocess, every policy with every forecaster, default
jobs) from the CSV to the JSON: wall clock, the reading, the simulation and
each pass. ``--mix real-like`` gives the connections the lifetimes seen on the
public captures (mostly HTTP keep-alive, ~30 intervals per connection instead
of ~250): the cost follows connection-intervals, not connections.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spoa.tools.backtest import synthetic  # noqa: E402
from spoa.tools.backtest.traces import write_csv  # noqa: E402

MIXES = {"default": None,
         "real-like": {"http_keepalive": 0.7, "onoff": 0.15, "bulk": 0.1, "chatty": 0.05}}
TARGET_S = 60.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--duration", type=float, default=600.0, help="arrivals spread over this many seconds")
    ap.add_argument("--mix", choices=sorted(MIXES), default="default")
    ap.add_argument("--jobs", type=int, help="passed to the command (default: its own default)")
    ap.add_argument("--json", metavar="OUT", help="write the measurements here")
    ap.add_argument("--keep", metavar="DIR", help="keep the CSV and the command's JSON in DIR")
    args = ap.parse_args()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-backtest-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    conns = synthetic.generate(args.connections, seed=args.seed, duration_s=args.duration, mix=MIXES[args.mix])
    gen_s = time.perf_counter() - t0
    csv_path = work / f"synthetic-{args.mix}-{args.connections}.csv"
    t0 = time.perf_counter()
    write_csv(conns, csv_path)
    write_s = time.perf_counter() - t0
    summary = conns.summary()
    print(f"trace: {summary['connections']:,} connections, {summary['connection_intervals']:,} connection-intervals "
          f"({summary['active_intervals']:,} active), {csv_path.stat().st_size / 1e6:.0f} MB CSV "
          f"(generated {gen_s:.1f} s, written {write_s:.1f} s; not timed)")

    out = work / "backtest.json"
    cmd = [sys.executable, "-m", "spoa", "backtest", str(csv_path), "--json", str(out), "--no-progress",
           "--summary-only"]
    if args.jobs:
        cmd += ["--jobs", str(args.jobs)]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return 1
    doc = json.loads(out.read_text())
    timing = doc["timings"]["traces"][csv_path.name]
    passes = {}
    for name, d in doc["policies"].items():
        passes.setdefault(round(d["sim_seconds"], 3), []).append(name)
    print(f"command wall clock: {wall:.1f} s (target < {TARGET_S:.0f} s: {'MET' if wall < TARGET_S else 'MISSED'}); "
          f"read {timing['read_s']:.1f} s, simulate {timing['simulate_s']:.1f} s with {doc['timings']['jobs']} jobs")
    for secs, names in sorted(passes.items(), reverse=True):
        print(f"  pass {secs:6.1f} s: {', '.join(names)}")
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} (2 vCPUs, shared)")
    fixed = doc["policies"]["fixed"]
    default = doc["policies"].get(doc["default_policy"], {})
    print(f"{doc['default_policy']}: entries cut {100 * default.get('entries_cut', 0):.1f} %, premature "
          f"{default.get('premature_expiries')}; fixed entries {fixed['publishing_entries']:,}")
    result = {"connections": summary["connections"], "connection_intervals": summary["connection_intervals"],
              "active_intervals": summary["active_intervals"], "mix": args.mix, "seed": args.seed,
              "wall_s": wall, "read_s": timing["read_s"], "simulate_s": timing["simulate_s"],
              "jobs": doc["timings"]["jobs"], "passes_s": {", ".join(v): k for k, v in passes.items()},
              "load_before": load_before, "load_after": load_after, "target_s": TARGET_S,
              "met": wall < TARGET_S}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
