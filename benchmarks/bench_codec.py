#!/usr/bin/env python3
"""Codec micro-benchmark: one NOTIFY decoded + one ACK encoded ("a codec pair").

Implementations, all timed in the same invocation:

* ``cython``      spoa.spop._codec (cext/spoa/spop/_codec.pyx), in this interpreter;
* ``python``      spoa.spop._codec_py, the pure-Python twin, in this interpreter;
* ``spoe-forge``  the PyPI ``spoe-forge`` package (pure Python, needs Python
                  >= 3.12), in a worker subprocess run by that interpreter; the
                  twin is timed again in that worker so the interpreter change
                  can be told apart from the codec difference.

What one pair does (same bytes in, byte-identical ACK out, checked first):

decode  feed the 4-byte-prefixed NOTIFY frame (one message, 6 arguments: ipv4
        src, int src_port, ipv4 dst, int dst_port, string frontend, int64 cid)
        to a long-lived frame reader, take the next frame (header: type, flags,
        stream-id, frame-id), decode its message list (spoa: Frame.messages(),
        which validates every argument and builds Message objects whose values
        stay undecoded; spoe-forge: Frame.decode() builds the whole frame with
        every value materialised), then read all 6 arguments by name (spoa:
        Message.get(name) x6, each a scan from the first argument that builds
        the value object, i.e. 2 IPv4Address, 3 int, 1 str; spoe-forge:
        AgentContext(name, args).get_arg(name) x6, what its handlers get).
encode  spoa: FrameWriter.begin_frame(ACK, stream_id, frame_id), set_var x3
        (sess.duration_ms=30000, sess.source="standard", txn.seq=123456),
        end_frame(), take() -> bytes. spoe-forge: Frame.construct(ACK, ...,
        actions=[SetVarAction x3]).encode(max_frame_size) -> bytes.

Not included: socket reads/writes, the event loop, handler dispatch, counters.
Timing: timeit loops (garbage collector off while timing, as timeit does); the loop
calls one Python closure per pair (~30-50 ns of call overhead, the same for
every row). --rounds short rounds (--round-time s per function), interleaved
across implementations and with the worker; the best round is reported (the
median too). The run prints how busy all CPUs were, since the box may be shared.

    python benchmarks/bench_codec.py [--rounds 25] [--round-time 0.02] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import timeit
from ipaddress import IPv4Address
from pathlib import Path
from _machine import cpu_model  # noqa: E402 - benchmarks/ is the script's folder

REPO = Path(__file__).resolve().parents[1]
FORGE_PYTHON = os.environ.get("SPOE_FORGE_PYTHON", "/root/.pyenv/versions/3.12.1/bin/python")
FORGE_VENV = Path(os.environ.get("SPOE_FORGE_VENV", "/tmp/sf-venv"))

# The NOTIFY: what `spoe-message lease-session` sends, with a numeric cid.
MESSAGE = "lease-session"
ARGS = [
    ("src", IPv4Address("192.0.2.10")),
    ("src_port", 54321),
    ("dst", IPv4Address("198.51.100.7")),
    ("dst_port", 443),
    ("frontend", "fe_http"),
    ("cid", 0x0123_4567_89AB_CDEF),
]
STREAM_ID, FRAME_ID = 98765, 1
MAX_FRAME_SIZE = 16380
# The ACK: what default_handlers.standard_lease answers.
SESS, TXN = 1, 2
ACK_TYPE = 103
ACK_VARS = [(SESS, "duration_ms", 30000), (SESS, "source", "standard"), (TXN, "seq", 123456)]


# -- timing -------------------------------------------------------------------------
# The machine may be shared (2 cores, other jobs): timings are taken in many
# short rounds, interleaved across implementations (the spoe-forge worker is
# asked for its round in turn, never concurrently), and the best round is kept.


def calibrate(fn, round_time: float) -> int:
    """Loop count for one round of about round_time seconds."""
    timer = timeit.Timer(fn)
    number = 1
    while True:
        t = timer.timeit(number)
        if t >= round_time / 4:
            return max(1, int(number * round_time / t))
        number *= 4


def time_round(fn, number: int) -> float:
    """ns per call over one timeit loop (gc off while timing, as timeit does)."""
    return timeit.Timer(fn).timeit(number) / number * 1e9


def summarize(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"best_ns": s[0], "median_ns": s[len(s) // 2], "rounds": len(s)}


def cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


# -- spoa (either twin) ---------------------------------------------------------------


def build_notify() -> bytes:
    sys.path.insert(0, str(REPO))
    from spoa.spop import _codec_py
    from spoa.spop.frames import write_notify

    w = _codec_py.FrameWriter()
    write_notify(w, STREAM_ID, FRAME_ID, [(MESSAGE, ARGS)])
    return w.take()


def spoa_funcs(codec, notify: bytes):
    reader = codec.FrameReader(MAX_FRAME_SIZE)
    writer = codec.FrameWriter()
    (s1, n1, v1), (s2, n2, v2), (s3, n3, v3) = ACK_VARS

    def decode():
        reader.feed(notify)
        frame = reader.next_frame()
        msg = frame.messages()[0]
        get = msg.get
        return frame, (get("src"), get("src_port"), get("dst"), get("dst_port"), get("frontend"), get("cid"))

    def encode(frame):
        writer.begin_frame(ACK_TYPE, frame.stream_id, frame.frame_id)
        writer.set_var(s1, n1, v1)
        writer.set_var(s2, n2, v2)
        writer.set_var(s3, n3, v3)
        writer.end_frame()
        return writer.take()

    def pair():
        frame, _values = decode()
        return encode(frame)

    frame, values = decode()
    return {"decode": lambda: decode(), "encode": lambda: encode(frame), "pair": pair}, values, encode(frame)


# -- spoe-forge (runs in the >= 3.12 worker) -----------------------------------------------


def forge_funcs(notify: bytes):
    import asyncio

    from spoe_forge.agent.context import AgentContext
    from spoe_forge.spop.constants import ActionScope, FrameType
    from spoe_forge.spop.frame import Frame
    from spoe_forge.spop.spop_types import SetVarAction

    loop = asyncio.new_event_loop()
    reader = asyncio.StreamReader(loop=loop)
    (s1, n1, v1), (s2, n2, v2), (s3, n3, v3) = ACK_VARS
    s1, s2, s3 = ActionScope(s1), ActionScope(s2), ActionScope(s3)
    ack_type = FrameType.ACK

    def decode():
        # Frame.decode is a coroutine reading from an asyncio.StreamReader; with
        # the bytes already fed it never suspends, so it is driven with send()
        # (no event-loop iteration is timed).
        reader.feed_data(notify)
        coro = Frame.decode(reader, MAX_FRAME_SIZE)
        try:
            coro.send(None)
        except StopIteration as stop:
            frame = stop.value
        else:  # pragma: no cover
            raise RuntimeError("Frame.decode suspended")
        name, args = frame.messages[0]
        ctx = AgentContext(name, args)
        get = ctx.get_arg
        return frame, (get("src"), get("src_port"), get("dst"), get("dst_port"), get("frontend"), get("cid"))

    def encode(frame):
        md = frame.metadata
        ack = Frame.construct(
            ack_type,
            stream_id=md.stream_id,
            frame_id=md.frame_id,
            actions=[SetVarAction(s1, n1, v1), SetVarAction(s2, n2, v2), SetVarAction(s3, n3, v3)],
        )
        return ack.encode(MAX_FRAME_SIZE)

    def pair():
        frame, _values = decode()
        return encode(frame)

    frame, values = decode()
    return {"decode": lambda: decode(), "encode": lambda: encode(frame), "pair": pair}, values, encode(frame)


class Bench:
    """A set of named functions, calibrated once, timed one round at a time."""

    def __init__(self, funcs: dict, round_time: float) -> None:
        self.funcs = funcs
        self.numbers = {name: calibrate(fn, round_time) for name, fn in funcs.items()}
        self.samples: dict = {name: [] for name in funcs}

    def round(self) -> dict:
        out = {name: time_round(fn, self.numbers[name]) for name, fn in self.funcs.items()}
        for name, ns in out.items():
            self.samples[name].append(ns)
        return out


def flat(prefix: str, funcs: dict) -> dict:
    return {f"{prefix}:{what}": fn for what, fn in funcs.items()}


def worker_main() -> int:
    """Inside the spoe-forge interpreter: a job line, then one round per request line."""
    job = json.loads(sys.stdin.readline())
    notify = bytes.fromhex(job["notify"])
    expected = bytes.fromhex(job["ack"])
    hello: dict = {"python": platform.python_version(), "checks": {}, "errors": {}}
    funcs: dict = {}
    try:
        import importlib.metadata

        hello["spoe_forge_version"] = importlib.metadata.version("spoe-forge")
        fns, values, ack = forge_funcs(notify)
        hello["checks"]["spoe-forge"] = {"values": [str(v) for v in values], "ack_identical": ack == expected}
        funcs.update(flat("spoe-forge", fns))
    except Exception as exc:  # reported, not fatal
        hello["errors"]["spoe-forge"] = f"{type(exc).__name__}: {exc}"
    try:
        sys.path.insert(0, str(REPO))
        from spoa.spop import _codec_py

        fns, values, ack = spoa_funcs(_codec_py, notify)
        hello["checks"]["python"] = {"values": [str(v) for v in values], "ack_identical": ack == expected}
        funcs.update(flat("python", fns))
    except Exception as exc:
        hello["errors"]["python"] = f"{type(exc).__name__}: {exc}"
    bench = Bench(funcs, job["round_time"])
    print(json.dumps(hello), flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        print(json.dumps(bench.round()), flush=True)
    return 0


# -- driver ------------------------------------------------------------------------------


class ForgeWorker:
    """The >= 3.12 interpreter with spoe-forge, driven round by round over pipes."""

    def __init__(self, notify: bytes, ack: bytes, round_time: float) -> None:
        self.proc = None
        self.hello: dict = {}
        self.error = self._start(notify, ack, round_time)

    def _start(self, notify: bytes, ack: bytes, round_time: float) -> str | None:
        py = FORGE_VENV / "bin" / "python"
        if not py.exists():
            if not Path(FORGE_PYTHON).exists():
                return f"no Python >= 3.12 at {FORGE_PYTHON} (set SPOE_FORGE_PYTHON)"
            try:
                subprocess.run([FORGE_PYTHON, "-m", "venv", str(FORGE_VENV)], check=True, capture_output=True, timeout=120)
            except Exception as exc:
                return f"cannot create venv {FORGE_VENV}: {exc}"
        if subprocess.run([str(py), "-c", "import spoe_forge"], capture_output=True, timeout=60).returncode != 0:
            inst = subprocess.run([str(py), "-m", "pip", "install", "-q", "spoe-forge"],
                                  capture_output=True, text=True, timeout=300)
            if inst.returncode != 0:
                return "pip install spoe-forge failed: " + inst.stderr.strip()[-500:]
        self.proc = subprocess.Popen([str(py), __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.proc.stdin.write(json.dumps({"notify": notify.hex(), "ack": ack.hex(), "round_time": round_time}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            return f"worker exited {self.proc.returncode} before reporting"
        self.hello = json.loads(line)
        return None

    def round(self) -> dict:
        if self.proc is None:
            return {}
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def cython_breakdown(codec, notify: bytes) -> dict:
    """Pieces of the Cython pair, to show where its time goes."""
    reader = codec.FrameReader(MAX_FRAME_SIZE)
    writer = codec.FrameWriter()

    def feed_next():
        reader.feed(notify)
        return reader.next_frame()

    frame = feed_next()
    msg = frame.messages()[0]
    get = msg.get
    packed = IPv4Address("192.0.2.10").packed

    def encode():
        writer.begin_frame(ACK_TYPE, 98765, 1)
        for scope, name, value in ACK_VARS:
            writer.set_var(scope, name, value)
        writer.end_frame()
        return writer.take()

    return {
        "empty closure call (loop overhead)": lambda: None,
        "feed + next_frame (header)": feed_next,
        "frame.messages() (validate 6 args)": frame.messages,
        "6 x Message.get (incl. 2 IPv4Address)": lambda: (get("src"), get("src_port"), get("dst"),
                                                         get("dst_port"), get("frontend"), get("cid")),
        "  of which get(src_port) alone": lambda: get("src_port"),
        "  of which get(dst) alone (IPv4)": lambda: get("dst"),
        "IPv4Address(4 bytes) alone": lambda: IPv4Address(packed),
        "encode ACK (begin, 3 set_var, end, take)": encode,
    }


def git_state() -> dict:
    """Commit and uncommitted codec files of the tree being measured (others may be editing it)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--", "spoa/spop/_codec_py.py", "cext/spoa").splitlines()}


def machine_info() -> dict:
    return {"python": platform.python_version(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "cpu": cpu_model()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=25, help="interleaved timing rounds (best is kept)")
    ap.add_argument("--round-time", type=float, default=0.02, help="seconds per function per round")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--nice", type=int, default=0,
                    help="run this script and its children at this nice value (e.g. -10, as root, so that other "
                         "jobs on a shared machine disturb the measurement less)")
    ap.add_argument("--no-forge", action="store_true", help="skip spoe-forge")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.nice:
        os.nice(args.nice)
    if args.worker:
        return worker_main()

    sys.path.insert(0, str(REPO))
    from spoa.spop import _codec_py

    try:
        from spoa.spop import _codec as _codec_c
    except ImportError:
        sys.exit("spoa.spop._codec is not built: run `python setup.py build_ext --inplace` first")

    notify = build_notify()
    expected_values = [str(v) for _, v in ARGS]
    funcs: dict = {}
    cy, values, ref_ack = spoa_funcs(_codec_c, notify)
    assert [str(v) for v in values] == expected_values, values
    funcs.update(flat("cython", cy))
    py, values, ack = spoa_funcs(_codec_py, notify)
    assert [str(v) for v in values] == expected_values and ack == ref_ack, "twins disagree"
    funcs.update(flat("python", py))
    funcs.update(flat("breakdown", cython_breakdown(_codec_c, notify)))

    worker = ForgeWorker(notify, ref_ack, args.round_time) if not args.no_forge else None
    forge_error = "skipped (--no-forge)" if worker is None else worker.error
    hello = worker.hello if worker else {}
    for impl, chk in hello.get("checks", {}).items():
        if chk["values"] != expected_values or not chk["ack_identical"]:
            print(f"WARNING: {impl} in the worker disagrees: values {chk['values']}, "
                  f"ACK identical={chk['ack_identical']}")
    if hello.get("errors", {}).get("spoe-forge"):
        forge_error = hello["errors"]["spoe-forge"]

    local = Bench(funcs, args.round_time)
    remote_samples: dict = {}
    busy0 = cpu_busy()
    for _ in range(args.rounds):
        local.round()
        if worker is not None and worker.proc is not None:
            for name, ns in worker.round().items():
                remote_samples.setdefault(name, []).append(ns)
    busy1 = cpu_busy()
    if worker is not None:
        worker.close()
    machine_busy = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])

    def table(samples: dict, prefix: str) -> dict:
        return {k.split(":", 1)[1]: summarize(v) for k, v in samples.items() if k.startswith(prefix + ":")}

    results = {"cython": table(local.samples, "cython"), "python": table(local.samples, "python")}
    fpy = hello.get("python", "?")
    if "spoe-forge:pair" in remote_samples:
        results["spoe-forge"] = table(remote_samples, "spoe-forge")
    if "python:pair" in remote_samples:
        results[f"python@{fpy}"] = table(remote_samples, "python")
    breakdown = table(local.samples, "breakdown")

    m = machine_info()
    print(f"# codec pair: decode NOTIFY ({len(notify)} B, 6 args, all read) + encode ACK ({len(ref_ack)} B, 3 set-var)")
    print(f"# {m.get('cpu')} x{m['cpus']}, kernel {m['kernel']}; {args.rounds} interleaved rounds of "
          f"{args.round_time * 1000:.0f} ms per function; all CPUs {machine_busy:.0%} busy during the run "
          f"(~{100 / m['cpus']:.0f}% is this benchmark)")
    print(f"{'implementation':<34}{'decode':>9}{'encode':>9}{'pair':>9}{'pair median':>13}   ns, best round")
    labels = {"cython": f"cython (py {m['python']})", "python": f"python twin (py {m['python']})",
              f"python@{fpy}": f"python twin (py {fpy})",
              "spoe-forge": f"spoe-forge {hello.get('spoe_forge_version')} (py {fpy})"}
    for key, r in results.items():
        print(f"{labels[key]:<34}{r['decode']['best_ns']:>9.0f}{r['encode']['best_ns']:>9.0f}"
              f"{r['pair']['best_ns']:>9.0f}{r['pair']['median_ns']:>13.0f}")
    if forge_error:
        print(f"spoe-forge: NOT MEASURED: {forge_error}")

    c = results["cython"]["pair"]["best_ns"]
    ratios = {"python twin / cython (same interpreter)": results["python"]["pair"]["best_ns"] / c}
    if "spoe-forge" in results:
        sf = results["spoe-forge"]["pair"]["best_ns"]
        ratios[f"spoe-forge (py {fpy}) / cython (py {m['python']})"] = sf / c
        if f"python@{fpy}" in results:
            ratios[f"spoe-forge / python twin (both py {fpy})"] = sf / results[f"python@{fpy}"]["pair"]["best_ns"]
        ratios[f"python twin py {fpy} / py {m['python']}"] = (
            results.get(f"python@{fpy}", {}).get("pair", {}).get("best_ns", float("nan")) / results["python"]["pair"]["best_ns"])
    print("ratios (pair, best rounds):")
    for k, v in ratios.items():
        print(f"  {k:<48} {v:6.2f}x")
    print("cython pair, broken down (ns, best round):")
    for k, v in breakdown.items():
        print(f"  {k:<48} {v['best_ns']:7.0f}")
    print(f"target <= 500 ns per pair: cython {c:.0f} ns -> {'MET' if c <= 500 else 'MISSED'}")

    report = {
        "machine": m,
        "tree": git_state(),
        "machine_busy_fraction": machine_busy,
        "command": " ".join(["python"] + sys.argv), "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "notify_bytes": len(notify),
        "ack_bytes": len(ref_ack),
        "rounds": args.rounds,
        "round_time_s": args.round_time,
        "results": results,
        "cython_breakdown": breakdown,
        "ratios": ratios,
        "spoe_forge": {"version": hello.get("spoe_forge_version"), "python": fpy, "error": forge_error},
        "target_pair_ns": 500,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
