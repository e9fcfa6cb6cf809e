#!/usr/bin/env python3
"""Publishing packet codec benchmark: records/s encoded and decoded, compiled vs twin.

Both implementations are timed in this one process, interleaved round by round
(every round times each case once, so load from other processes hits all
cases alike): ``cython`` is spoa.wire._packet (cext/spoa/wire/_packet.pyx), ``python``
is spoa.wire._packet_py.

Workload: one server node's logical packet of --records connections (default
1000), every record with either 1 or 16 segments, an 8-byte frontend name,
IPv4 addresses, mtu 1400 (so 10 records per datagram with 1 segment, 1 with
16), a 32-byte key.

encode  encode_packet(header, records, key, 1400) -> list of datagrams: field
        validation, serialization, splitting, one HMAC-SHA256 per datagram.
decode  decode_datagram(d, key) for every datagram of that packet: length
        checks, HMAC verification, and building every ConnectionRecord and
        SegmentRecord (the frozen dataclasses of spoa/wire/records.py).
hmac    the HMAC-SHA256 of the same datagrams alone, computed as both twins do
        (a copy of a keyed hmac object per datagram): the floor they share.

Reported: records/s (best and median round), the cython/python ratio, and the
share of HMAC time in cython's. The twins' outputs are checked identical first.

    python benchmarks/bench_packet.py [--records 1000] [--rounds 15] [--json OUT]
                                      [--results benchmarks/RESULTS.md]

--results writes the "## Publishing packet codec" section of that file
(appended when absent, replaced in place when present; other sections are
left alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spoa.wire import _packet_py  # noqa: E402
from spoa.wire.records import ConnectionRecord, PacketHeader, SegmentRecord  # noqa: E402
from _machine import cpu_model  # noqa: E402 - benchmarks/ is the script's folder

SECTION = "## Publishing packet codec"
KEY = bytes(range(32))
MTU = 1400
HEADER = PacketHeader(node_id=42, sequence=1_700_000_123, timestamp_ms=1_717_171_717_000, interval_ms=1000)


def make_records(n: int, nseg: int) -> list[ConnectionRecord]:
    return [
        ConnectionRecord(
            conn_id=i.to_bytes(16, "big"),
            src=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
            src_port=1024 + i % 60000,
            dst="198.51.100.7",
            dst_port=443,
            frontend="fe_https",
            flags=0,
            counter_source=0,
            granularity_level=1,
            requested_lease_ms=0,
            predicted_lease_ms=45_000,
            lease_source=1,
            bytes_in_total=10_000 + i,
            bytes_out_total=(nseg << 20) + i,
            segments=tuple(
                SegmentRecord(j & 1, (j >> 1) << 20, 1 << 20, 65_536 + j, 45 + j, 1_717_171_716_000 + j, 0)
                for j in range(nseg)
            ),
        )
        for i in range(n)
    ]


def calibrate(fn, round_time: float) -> int:
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= round_time:
            return number
        number = max(number * 2, int(number * round_time / max(elapsed, 1e-9) * 1.1))


def time_round(fn, number: int) -> float:
    """Seconds per call over one round."""
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def cases(mods: dict, records_n: int) -> tuple[dict, dict]:
    """name -> (function, records per call); and facts about the workload."""
    funcs: dict = {}
    facts: dict = {}
    for nseg in (1, 16):
        records = make_records(records_n, nseg)
        datagrams = _packet_py.encode_packet(HEADER, records, KEY, MTU)
        for twin, mod in mods.items():
            assert mod.encode_packet(HEADER, records, KEY, MTU) == datagrams, f"{twin} encodes differently"
            decoded = [r for d in datagrams for r in mod.decode_datagram(d, KEY)[3]]
            assert decoded == records, f"{twin} decodes differently"
            enc = mod.encode_packet
            dec = mod.decode_datagram
            funcs[f"{twin}:encode:{nseg}"] = (lambda enc=enc, records=records: enc(HEADER, records, KEY, MTU), records_n)
            funcs[f"{twin}:decode:{nseg}"] = (
                lambda dec=dec, datagrams=datagrams: [dec(d, KEY) for d in datagrams],
                records_n,
            )
        signed = [d[:-16] for d in datagrams]
        funcs[f"hmac:sign:{nseg}"] = (lambda signed=signed: [_packet_py._tag(KEY, s) for s in signed], records_n)
        facts[nseg] = {
            "datagrams": len(datagrams),
            "bytes": sum(map(len, datagrams)),
            "record_bytes": 84 + 8 + 42 * nseg,
            "records_per_datagram": records_n / len(datagrams),
        }
    return funcs, facts


def run(records_n: int, rounds: int, round_time: float) -> dict:
    mods = {"python": _packet_py}
    try:
        from spoa.wire import _packet

        mods = {"cython": _packet, "python": _packet_py}
    except ImportError as exc:
        print(f"spoa.wire._packet not built ({exc}); timing the twin only", file=sys.stderr)
    funcs, facts = cases(mods, records_n)
    numbers = {name: calibrate(fn, round_time) for name, (fn, _) in funcs.items()}
    samples: dict = {name: [] for name in funcs}
    for _ in range(rounds):
        for name, (fn, _) in funcs.items():
            samples[name].append(time_round(fn, numbers[name]))
    results = {}
    for name, times in samples.items():
        per_call = funcs[name][1]
        results[name] = {
            "best_records_per_s": per_call / min(times),
            "median_records_per_s": per_call / statistics.median(times),
            "best_us_per_record": min(times) / per_call * 1e6,
            "median_us_per_record": statistics.median(times) / per_call * 1e6,
        }
    return {
        "results": results,
        "facts": facts,
        "twins": list(mods),
        "records": records_n,
        "rounds": rounds,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def fmt_rate(value: float) -> str:
    return f"{value / 1e3:,.0f} k" if value < 1e6 else f"{value / 1e6:,.2f} M"


def markdown(report: dict) -> str:
    res = report["results"]
    lines = [
        SECTION,
        "",
        f"`python benchmarks/bench_packet.py` (Python {report['python']}, {report['cpu']}, {report['cpus']} CPUs, "
        f"load average {report['loadavg']:.1f} at the start; {report['records']} records per logical packet, "
        f"mtu {MTU}, best and median of {report['rounds']} interleaved rounds).",
        "",
        "| segments/record | operation | cython records/s (best / median) | python records/s (best / median) "
        "| cython / python (best / median) |",
        "|---:|---|---:|---:|---:|",
    ]
    for nseg in (1, 16):
        for op in ("encode", "decode"):
            py = res[f"python:{op}:{nseg}"]
            cy = res.get(f"cython:{op}:{nseg}")
            if cy is None:
                lines.append(f"| {nseg} | {op} | - | {fmt_rate(py['best_records_per_s'])} / "
                             f"{fmt_rate(py['median_records_per_s'])} | - |")
                continue
            best = cy["best_records_per_s"] / py["best_records_per_s"]
            median = cy["median_records_per_s"] / py["median_records_per_s"]
            lines.append(
                f"| {nseg} | {op} | {fmt_rate(cy['best_records_per_s'])} / {fmt_rate(cy['median_records_per_s'])} "
                f"| {fmt_rate(py['best_records_per_s'])} / {fmt_rate(py['median_records_per_s'])} "
                f"| {best:.1f}x / {median:.1f}x |"
            )
    lines += ["", "Where the time goes (best round, µs per record):", ""]
    lines += ["| segments/record | record bytes | records/datagram | HMAC alone | cython encode | cython decode |",
              "|---:|---:|---:|---:|---:|---:|"]
    for nseg in (1, 16):
        f = report["facts"][nseg]
        h = res[f"hmac:sign:{nseg}"]["best_us_per_record"]
        ce = res.get(f"cython:encode:{nseg}", {}).get("best_us_per_record", float("nan"))
        cd = res.get(f"cython:decode:{nseg}", {}).get("best_us_per_record", float("nan"))
        lines.append(f"| {nseg} | {f['record_bytes']} | {f['records_per_datagram']:.0f} | {h:.2f} | {ce:.2f} "
                     f"| {cd:.2f} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str, notes: str) -> None:
    """Append our section, or replace it in place; other sections untouched."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    body = section.rstrip("\n") + "\n" + ("\n" + notes if notes else "")
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + ("\n" + text[nxt + 1 :] if nxt >= 0 else "")
    path.write_text(text, encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--round-time", type=float, default=0.2, help="seconds per case per round")
    parser.add_argument("--json", type=Path, help="write the raw report here")
    parser.add_argument("--results", type=Path, help="write the markdown section into this file")
    parser.add_argument("--notes", type=Path, help="markdown appended under the table in --results")
    args = parser.parse_args()
    report = run(args.records, args.rounds, args.round_time)
    md = markdown(report)
    print(md)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.results:
        write_section(args.results, md, args.notes.read_text(encoding="utf-8") if args.notes else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
