#!/usr/bin/env python3
"""Kernel sampler benchmark: sock_diag dump vs parse vs ss(8), on real sockets.

One run opens N real TCP connections on 127.0.0.1 (the server side listens on
--listeners ports: those are the "frontend ports" the sampler filters on),
moves a few bytes each way on every connection, and then times, for each N:

raw           KernelSampler.dump_raw(keep=False): both dumps (AF_INET +
              AF_INET6), kernel-filtered, recv() only, nothing parsed. This is
              the kernel's cost plus one recv syscall per ~32 KiB datagram.
raw-nofilter  the same without the bytecode filter (the client ends and every
              other socket on the machine come back too), for the filter's effect.
parse/cython  spoa.servernode._sampler.parse_chunk over the recorded datagrams of one dump
parse/python  spoa.servernode.sampler._parse_chunk_py, the same datagrams
parse/cffi    a cffi ABI-mode parser written here (cdata struct access), the
              same datagrams: the third candidate implementation
(every parser keys each socket by its 36-byte spoa.wire.records.pack_key, built
from the raw address and port bytes)
sample/cython KernelSampler.sample(): raw + parse/cython, what callers pay
sample/python the same with the pure-Python parser
ss            ss_sample(): `ss -tinHe state ... ( sport = :P ... )` + parse
ss-run        the ss subprocess alone (its output captured, not parsed)
ss-parse      parse_ss() of that output

Each figure is the best of --repeat runs, with the garbage collector on (as
in the agent) and a gc.collect() before each run. Ratios are against `raw`.

The connections are held by worker processes of at most 9000 connections
(18k descriptors) each, since RLIMIT_NOFILE is per process and its hard limit
cannot be raised without CAP_SYS_RESOURCE (20000 on the benchmark machine);
worker k listens on 127.0.0.(k+2) at the same ports. If opening them fails, the 100k row is built by replaying the
10k dump's datagrams 10 times through the parsers, with the remote address
rewritten per copy so the keys stay distinct, and `raw` is then 10 x the 10k
figure: the output says so.

    python benchmarks/bench_sampler.py [--sizes 10000,100000] [--repeat 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spoa.servernode import sampler as S  # noqa: E402

CLIENT_BYTES = 100  # client -> server on every connection
SERVER_BYTES = 300  # server -> client


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# --- cffi candidate ----------------------------------------------------------


def make_cffi_parser():
    try:
        from cffi import FFI
    except ImportError:
        return None
    ffi = FFI()
    ffi.cdef(
        """
        struct nlmsghdr { uint32_t len; uint16_t type; uint16_t flags; uint32_t seq; uint32_t pid; };
        struct diag { uint8_t family, state, timer, retrans; uint8_t sport[2], dport[2];
                      uint8_t src[16], dst[16]; uint32_t ifindex, cookie[2];
                      uint32_t expires, rqueue, wqueue, uid, inode; };
        struct rta { uint16_t len, type; };
        struct info { uint8_t state; uint8_t pad0[43]; uint32_t last_data_sent, last_ack_sent,
                      last_data_recv, last_ack_recv; uint8_t pad1[8]; uint32_t rtt; uint8_t pad2[48];
                      uint64_t bytes_acked, bytes_received; uint32_t segs_out, segs_in;
                      uint8_t pad3[8]; uint32_t data_segs_in, data_segs_out; };
        """
    )
    assert ffi.sizeof("struct info") == 160 and ffi.sizeof("struct diag") == 72
    v4m = b"\0" * 10 + b"\xff\xff"

    def key_of(fam, m):
        raw = ffi.buffer(m, 40)[:]  # family .. dst
        if fam == socket.AF_INET:
            return v4m + raw[8:12] + raw[4:6] + v4m + raw[24:28] + raw[6:8]
        return raw[8:24] + raw[4:6] + raw[24:40] + raw[6:8]

    def parse(data, out, seq=-1):
        base = ffi.from_buffer(data)
        n = len(data)
        off = count = 0
        while off < n:
            h = ffi.cast("struct nlmsghdr *", base + off)
            mlen = h.len
            if mlen < 16 or mlen > n - off:
                raise S.SamplerError(74, S.E_BAD_LEN)
            if h.type == S.NLMSG_DONE:
                return (off + mlen, count, 0, 0)
            if h.type != S.SOCK_DIAG_BY_FAMILY:
                raise S.SamplerError(74, S.E_BAD_TYPE)
            m = ffi.cast("struct diag *", base + off + 16)
            a, end, info = off + 16 + 72, off + mlen, None
            while end - a >= 4:
                r = ffi.cast("struct rta *", base + a)
                if r.len < 4:
                    raise S.SamplerError(74, S.E_BAD_ATTR)
                if r.type == S.INET_DIAG_INFO and r.len - 4 >= 160:
                    info = ffi.cast("struct info *", base + a + 4)
                a += (r.len + 3) & ~3
            if info is not None:
                key = key_of(m.family, m)
                out[key] = S.TcpSample(
                    key, m.state, info.bytes_received, info.bytes_acked,
                    info.segs_in, info.segs_out, info.data_segs_in, info.data_segs_out,
                    info.last_data_recv, info.last_data_sent, info.rtt, info.last_ack_recv, m.inode,
                )  # fmt: skip
                count += 1
            off += (mlen + 3) & ~3
        return (-1, count, 0, 0)

    return parse


# --- connections ---------------------------------------------------------------

WORKER_CAP = 9000  # connections per worker process: 2 descriptors each


def worker(addr: str, ports: list[int]) -> None:
    """Holds connections to listeners on addr:ports; commands on stdin: `grow N`, `quit`."""
    raise_nofile(2 * WORKER_CAP + 200)
    listeners = [socket.create_server((addr, p), backlog=4096) for p in ports]
    clients: list[socket.socket] = []
    servers: list[socket.socket] = []
    payload_c, payload_s = b"c" * CLIENT_BYTES, b"s" * SERVER_BYTES
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "quit":
            break
        target = int(cmd[1])
        try:
            while len(clients) < target:
                i = len(clients)
                c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    c.connect((addr, ports[i % len(ports)]))
                except OSError:
                    c.close()
                    raise
                s, _ = listeners[i % len(ports)].accept()
                clients.append(c)
                servers.append(s)
                c.send(payload_c)
                s.send(payload_s)
            for c, s in zip(clients, servers):  # every byte received (and so acked)
                for sk in (s, c):
                    sk.setblocking(False)
                    try:
                        sk.recv(65536)
                    except BlockingIOError:
                        pass
            print(f"ok {len(clients)}", flush=True)
        except OSError as e:
            print(f"err {len(clients)} {e}", flush=True)
    linger = struct.pack("ii", 1, 0)  # RST on close: no TIME_WAIT left behind
    for sk in clients + servers:
        try:
            sk.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        except OSError:
            pass
        sk.close()


class Fleet:
    """N loopback connections, held by worker processes (RLIMIT_NOFILE is per process).

    Worker k listens on 127.0.0.(k+2) at the same `listeners` ports, reserved
    by the parent on 127.0.0.1: those are the frontend ports sampled.
    """

    def __init__(self, listeners: int) -> None:
        self.reserved = [socket.create_server(("127.0.0.1", 0)) for _ in range(listeners)]
        self.ports = [s.getsockname()[1] for s in self.reserved]
        self.workers: list[subprocess.Popen] = []
        self.counts: list[int] = []

    @property
    def size(self) -> int:
        return sum(self.counts)

    def grow(self, n: int) -> None:
        while len(self.workers) * WORKER_CAP < n:
            k = len(self.workers)
            self.workers.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", f"127.0.0.{k + 2}", ",".join(map(str, self.ports))],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
            )
            self.counts.append(0)
        # Spread n evenly; all workers work at once.
        per = [n // len(self.workers) + (1 if i < n % len(self.workers) else 0) for i in range(len(self.workers))]
        for w, want in zip(self.workers, per):
            assert w.stdin is not None
            w.stdin.write(f"grow {want}\n")
            w.stdin.flush()
        errors = []
        for i, w in enumerate(self.workers):
            assert w.stdout is not None
            reply = w.stdout.readline().split(maxsplit=2)
            if not reply:
                errors.append(f"worker {i} died")
                continue
            self.counts[i] = int(reply[1])
            if reply[0] != "ok":
                errors.append(f"worker {i}: {reply[2] if len(reply) > 2 else ''}")
        if errors:
            raise OSError("; ".join(errors))

    def close(self) -> None:
        for w in self.workers:
            try:
                assert w.stdin is not None
                w.stdin.write("quit\n")
                w.stdin.close()
            except (OSError, ValueError):
                pass
        for w in self.workers:
            try:
                w.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.kill()
        for sk in self.reserved:
            sk.close()


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
        except (ValueError, OSError):  # raising the hard limit needs CAP_SYS_RESOURCE
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- measurements ----------------------------------------------------------------


def replay_chunks(chunks: list[bytes], copies: int) -> list[bytes]:
    """`copies` copies of a dump's datagrams, copy k with remote addresses 127.(k+1).x.y."""
    out: list[bytes] = []
    for k in range(copies):
        for ch in chunks:
            b = bytearray(ch)
            off = 0
            while off + 16 <= len(b):
                mlen, mtype = struct.unpack_from("=IH", b, off)
                if mtype == S.SOCK_DIAG_BY_FAMILY and b[off + 16] == socket.AF_INET:
                    b[off + 16 + 24 + 1] = (b[off + 16 + 24 + 1] + k + 1) & 0xFF  # idiag_dst second octet
                off += (mlen + 3) & ~3
            out.append(bytes(b))
    # Only the last copy's NLMSG_DONE may stay: the parsers stop at DONE.
    return out


def parse_all(parser, chunks: list[bytes]) -> dict:
    out: dict = {}
    for ch in chunks:
        parser(ch, out, -1)
    return out


def measure(fleet: Fleet, n: int, repeat: int, parsers: dict, replay_from: dict | None) -> dict:
    ports = fleet.ports
    res: dict = {"n": n}
    if replay_from is None:
        with S.KernelSampler(ports) as ks:
            chunks = ks.dump_raw(keep=True)
            res["raw"] = best(lambda: ks.dump_raw(keep=False), repeat)
            res["datagrams"] = len(chunks)
            res["bytes"] = sum(map(len, chunks))
            res["sample/cython"] = best(ks.sample, repeat) if "cython" in parsers else None
            got = ks.sample()
            res["sockets"] = len(got)
            res["info_len"] = ks.info_len
        with S.KernelSampler(ports, parser=S._parse_chunk_py) as ks:
            res["sample/python"] = best(ks.sample, repeat)
        with S.KernelSampler(None) as ks:
            res["raw-nofilter"] = best(lambda: ks.dump_raw(keep=False), repeat)
            nf = ks.dump_raw(keep=True)
            res["bytes-nofilter"] = sum(map(len, nf))
        res["replayed"] = False
        # ss, split into the subprocess and the parse of its text
        res["ss"] = best(lambda: S.ss_sample(ports), max(1, repeat // 2))
        cmd = S.ss_command(ports)
        res["ss-run"] = best(lambda: subprocess.run(cmd, capture_output=True, text=True, check=True), max(1, repeat // 2))
        text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        res["ss-parse"] = best(lambda: S.parse_ss(text), max(1, repeat // 2))
        res["ss-sockets"] = len(S.parse_ss(text))
    else:
        copies = n // replay_from["n"]
        # Per-family chunk lists: the parsers stop at each NLMSG_DONE, so feed datagram by datagram.
        chunks = replay_chunks(replay_from["chunks"], copies)
        res.update(replayed=True, copies=copies, datagrams=len(chunks), bytes=sum(map(len, chunks)))
        res["raw"] = replay_from["raw"] * copies
        res["raw-nofilter"] = replay_from["raw-nofilter"] * copies
        res["ss"] = replay_from["ss"] * copies
        res["ss-run"] = replay_from["ss-run"] * copies
        res["ss-parse"] = replay_from["ss-parse"] * copies
        res["sockets"] = len(parse_all(parsers["python"], chunks))
    for name, p in parsers.items():
        res[f"parse/{name}"] = best(lambda p=p: parse_all(p, chunks), repeat if name != "cffi" else max(1, repeat // 2))
    if replay_from is None:
        res["chunks"] = chunks
    else:
        for name in ("cython", "python"):
            res[f"sample/{name}"] = res["raw"] + res[f"parse/{name}"] if f"parse/{name}" in res else None
    return res


ROWS = [
    ("raw", "dump, recv only (filtered)"),
    ("raw-nofilter", "dump, recv only, no filter"),
    ("parse/cython", "parse, Cython"),
    ("parse/python", "parse, Python struct"),
    ("parse/cffi", "parse, cffi ABI mode"),
    ("sample/cython", "sample() with Cython"),
    ("sample/python", "sample() with Python"),
    ("ss", "ss_sample() total"),
    ("ss-run", "  ss subprocess only"),
    ("ss-parse", "  ss text parse only"),
]


def report(results: list[dict]) -> str:
    lines = []
    for r in results:
        n = r["n"]
        hdr = f"N = {n:,} connections ({r['sockets']:,} sampled sockets"
        if r.get("replayed"):
            hdr += f"; REPLAYED: the {n // r['copies']:,} dump x{r['copies']}, raw/ss = {r['copies']} x the smaller figures"
        else:
            hdr += f"; {r['datagrams']} datagrams, {r['bytes'] / 1e6:.1f} MB filtered, {r['bytes-nofilter'] / 1e6:.1f} MB unfiltered"
        lines.append(hdr + ")")
        lines.append(f"  {'what':30s} {'ms':>9s} {'us/socket':>10s} {'x raw':>7s}")
        for key, label in ROWS:
            v = r.get(key)
            if v is None:
                continue
            lines.append(f"  {label:30s} {v * 1e3:9.2f} {v / n * 1e6:10.3f} {v / r['raw']:7.2f}")
        ratios = []
        if r.get("parse/python") and r.get("parse/cython"):
            ratios.append(f"parse python/cython = {r['parse/python'] / r['parse/cython']:.1f}x")
        if r.get("parse/cffi") and r.get("parse/cython"):
            ratios.append(f"parse cffi/cython = {r['parse/cffi'] / r['parse/cython']:.1f}x")
        if r.get("ss") and r.get("sample/cython"):
            ratios.append(f"ss/sample(cython) = {r['ss'] / r['sample/cython']:.1f}x")
        if r.get("ss") and r.get("sample/python"):
            ratios.append(f"ss/sample(python) = {r['ss'] / r['sample/python']:.1f}x")
        lines.append("  " + "; ".join(ratios))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--listeners", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-cffi", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", nargs=2, metavar=("ADDR", "PORTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], [int(p) for p in args.worker[1].split(",")])
        return
    sizes = sorted(int(x) for x in args.sizes.split(","))
    if not S.KernelSampler.available():
        sys.exit("sock_diag is not available here")

    parsers = {}
    if S._compiled is not None:
        parsers["cython"] = S._compiled.parse_chunk
    parsers["python"] = S._parse_chunk_py
    if not args.no_cffi:
        cffi_parser = make_cffi_parser()
        if cffi_parser is not None:
            parsers["cffi"] = cffi_parser

    limit = raise_nofile(2 * WORKER_CAP + 200)
    print(f"kernel {platform.release()}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"spoa.servernode.sampler {S.IMPLEMENTATION} (direct slots: {S.DIRECT_SLOTS}), RLIMIT_NOFILE {limit} "
          f"per process, {WORKER_CAP} connections per worker", flush=True)

    fleet = Fleet(args.listeners)
    results: list[dict] = []
    try:
        base = None
        for n in sizes:
            t0 = time.perf_counter()
            replay = None
            try:
                fleet.grow(n)
            except OSError as e:
                if base is None:
                    raise
                print(f"N={n}: opening connections failed at {fleet.size} ({e}); replaying the "
                      f"{base['n']} dump instead", flush=True)
                replay = base
            else:
                print(f"N={n}: {fleet.size} connections open in {time.perf_counter() - t0:.1f} s "
                      f"({len(fleet.workers)} worker processes)", flush=True)
            r = measure(fleet, n, args.repeat, parsers, replay)
            if base is None and not r["replayed"]:
                base = {k: r[k] for k in ("n", "chunks", "raw", "raw-nofilter", "ss", "ss-run", "ss-parse")}
            r.pop("chunks", None)
            results.append(r)
            print(report([r]), flush=True)
    finally:
        fleet.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
