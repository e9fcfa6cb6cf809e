#!/usr/bin/env python3
"""End-to-end benchmark: HTTP load through a real HAProxy, with and without SPOE.

One HAProxy (default line 2.6, `nbthread 1`, benchmarks/haproxy-bench.cfg +
haproxy/agents.cfg, which load haproxy/spoe-lease.conf) has two frontends that
answer from the same `http-request return` backend (no server behind):

  fe_spoe_off   no SPOE
  fe_spoe_on    `filter spoe engine lease` + `http-request send-spoe-group
                lease lease-http`: one NOTIFY (message lease-request, 8 args)
                per HTTP request to the agent, which answers 3 set-var.

Agent variants (--variants), each with a fresh HAProxy and agent:

  product-cython  `python -m spoa agent --listen ... --metrics ...` as an
                  operator runs it (uvloop, its own handlers), Cython codec;
  product-python  the same with SPOA_NO_EXTENSIONS=1 (pure-Python codec);
  core-cython     benchmarks/core_agent.py: spoa's Agent + AgentServer (same
                  protocol code, uvloop) with a handler that only reads 6 args
                  and sets the same 3 variables: the SPOP layer's own cost;
  core-python     the same with SPOA_NO_EXTENSIONS=1 (not run by default).

The codec an agent really loaded is checked in /proc/PID/maps. The product
is whatever the working tree holds when the script runs (others may be
editing it): the commit, the uncommitted files and a hash of spoa/ and
haproxy/ go into the JSON. For each: wrk (keep-alive, 1 thread) at --connections and at 1
connection, against each frontend, after a short warm-up that is not measured;
the one-connection off/on runs are alternated --reps times (medians reported),
because their latency depends on where the scheduler puts the 3 processes;
then again with wrk, HAProxy and the agent all pinned to one CPU (--c1-pin),
which removes the cross-vCPU wake-ups (tens of us each on this VM: its
kernel runs with haltpoll.guest_halt_poll_ns=0, so an idle vCPU halts at once).

Reported per run: req/s, latency p50/p90/p99 (wrk's histogram, exact, via
benchmarks/wrk_report.lua), and for the agent and HAProxy their CPU time
(utime+stime from /proc/<pid>/stat, all threads, 10 ms ticks) over the run;
agent CPU per message = that delta / delta of the agent's
spoa_agent_notify_frames_total (from /metrics, scraped outside the timed
window). "Added latency at one connection" = median over the reps of
p50(on) - p50(off) at -c1. Each run also reports "other": cores used by
anything but wrk, HAProxy and the agent (other jobs on a shared machine).

On this 2-core machine wrk, HAProxy and the agent share both cores: with
SPOE on, three busy processes compete, so req/s measures the whole box, not the
agent alone; CPU per message/request is the figure that does not depend on it.

    python benchmarks/bench_e2e.py [--haproxy 2.6] [--duration 5] [--json OUT] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "benchmarks"
sys.path.insert(0, str(REPO))

from spoa.tools import provision  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")

from spoa.testing import free_port, http_get, scrape_metrics, wait_port, wait_until  # noqa: E402
from _machine import cpu_model  # noqa: E402 - benchmarks/ is the script's folder


_LEASE = re.compile(r"duration=(\d+);source=(\w+);seq=(\d+)")


def parse_lease_header(value: str | None) -> tuple[int, str, int] | None:
    m = _LEASE.fullmatch(value or "")
    return (int(m[1]), m[2], int(m[3])) if m else None


def git_state() -> dict:
    """Commit and uncommitted changes of the tree being measured (others may be editing it)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    changed = [line for line in git("status", "--porcelain", "--untracked-files=all", "--", "spoa", "cext",
                                    "haproxy").splitlines()]
    digest = hashlib.sha256()
    for path in sorted((REPO / "spoa").rglob("*.py")) + sorted((REPO / "spoa").rglob("*.so")) + \
            sorted((REPO / "haproxy").glob("*")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_in_spoa_cext_haproxy": changed,
            "tree_sha256": digest.hexdigest()[:16]}


# -- processes -------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (up to max_wait s) for a 0.5 s window with < threshold cores busy.

    Nothing of ours runs between measured runs, so what is busy then is other
    jobs of a shared machine. Returns the busy cores of the last window.
    """
    deadline = time.monotonic() + max_wait
    while True:
        b0 = machine_busy()
        time.sleep(0.5)
        b1 = machine_busy()
        cores = (b1[0] - b0[0]) / CLK_TCK / 0.5
        if cores < threshold or time.monotonic() >= deadline:
            return cores


class Agent:
    """product: `python -m spoa agent`; core: benchmarks/core_agent.py (SPOP layer only)."""

    def __init__(self, tmp: Path, kind: str, pure: bool) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.pure = pure
        self.log_path = tmp / f"agent-{kind}-{'python' if pure else 'cython'}.log"
        env = dict(os.environ)
        env.pop("SPOA_NO_EXTENSIONS", None)
        if pure:
            env["SPOA_NO_EXTENSIONS"] = "1"
        program = ["-m", "spoa", "agent"] if kind == "product" else [str(HERE / "core_agent.py")]
        self.argv = [sys.executable, *program, "--listen", f"127.0.0.1:{self.port}",
                     "--metrics", f"127.0.0.1:{self.metrics_port}"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        wait_port(self.port, proc=self.proc)
        wait_port(self.metrics_port, proc=self.proc)

    def codec(self) -> str:
        """Which codec the running agent really loaded (is the .so mapped?)."""
        maps = Path(f"/proc/{self.proc.pid}/maps").read_text()
        return "cython" if "spoa/spop/_codec.cpython" in maps else "python"

    def metrics(self) -> dict[str, float]:
        """Prometheus text -> {"name{labels}": value}."""
        return scrape_metrics(self.metrics_port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


class HAProxy:
    def __init__(self, binary, tmp: Path, agent_port: int) -> None:
        self.off_port, self.on_port = free_port(), free_port()
        self.log_path = tmp / "haproxy.log"
        env = binary.run_env()
        env.update(SPOA_LEASE_DIR=str(REPO / "haproxy"), SPOA_LEASE_AGENT=f"127.0.0.1:{agent_port}",
                   BENCH_OFF=f"127.0.0.1:{self.off_port}", BENCH_ON=f"127.0.0.1:{self.on_port}")
        self.argv = binary.command("-db", "-f", str(HERE / "haproxy-bench.cfg"), "-f", str(REPO / "haproxy" / "agents.cfg"))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_port(self.off_port, proc=self.proc)
        wait_port(self.on_port, proc=self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


# -- load generators ----------------------------------------------------------------------

_WRK_JSON = re.compile(r"^WRK_JSON (\{.*\})$", re.M)


def run_wrk(port: int, connections: int, duration: float, cpu: int | None = None) -> dict:
    # wrk takes whole seconds
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    cmd = [*pin, "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "5s", "--latency",
           "-s", str(HERE / "wrk_report.lua"), f"http://127.0.0.1:{port}/"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    m = _WRK_JSON.search(proc.stdout)
    if proc.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    out = json.loads(m[1])
    out["command"] = " ".join(cmd[:-1] + ["http://127.0.0.1:PORT/"])
    return out


async def _py_load(port: int, connections: int, duration: float) -> dict:
    """Fallback when wrk is missing: keep-alive GET loops, one per connection."""
    lat: list[int] = []
    errors = Counter()
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    deadline = time.monotonic() + duration
    nbytes = 0

    async def one() -> None:
        nonlocal nbytes
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            errors["connect"] += 1
            return
        try:
            while time.monotonic() < deadline:
                t0 = time.perf_counter_ns()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head)[1])
                body = await reader.readexactly(length)
                lat.append((time.perf_counter_ns() - t0) // 1000)
                nbytes += len(head) + len(body)
                if not head.startswith(b"HTTP/1.1 200"):
                    errors["status"] += 1
        except (OSError, asyncio.IncompleteReadError):
            errors["read"] += 1
        finally:
            writer.close()

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(connections)))
    elapsed = time.monotonic() - t0
    lat.sort()

    def pct(p: float) -> int:
        return lat[min(len(lat) - 1, int(len(lat) * p / 100))] if lat else 0

    return {"requests": len(lat), "duration_us": int(elapsed * 1e6), "bytes": nbytes,
            "errors": {k: errors.get(k, 0) for k in ("connect", "read", "write", "status", "timeout")},
            "latency_us": {"mean": sum(lat) / max(1, len(lat)), "min": lat[0] if lat else 0, "max": lat[-1] if lat else 0,
                           "p50": pct(50), "p90": pct(90), "p99": pct(99), "p99_9": pct(99.9)},
            "command": f"python asyncio load generator, {connections} connections, {duration:g}s"}


def run_python_load(port: int, connections: int, duration: float, cpu: int | None = None) -> dict:
    try:
        import uvloop

        return uvloop.run(_py_load(port, connections, duration))
    except ImportError:
        return asyncio.run(_py_load(port, connections, duration))


# -- one measured run -------------------------------------------------------------------


def pin_all(cpus: str, *pids: int) -> None:
    """taskset every thread of these processes to the CPU list."""
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True, capture_output=True)


def measured_run(load, agent: Agent, haproxy: HAProxy, spoe: str, connections: int, duration: float,
                 warmup: float, quiet_wait: float = 0, cpu: int | None = None) -> dict:
    port = haproxy.on_port if spoe == "on" else haproxy.off_port
    idle_before = wait_quiet(quiet_wait) if quiet_wait > 0 else None
    if warmup > 0:
        load(port, connections, warmup)
    m0 = agent.metrics()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    s0 = resource.getrusage(resource.RUSAGE_SELF)
    a0, h0, b0 = cpu_seconds(agent.proc.pid), cpu_seconds(haproxy.proc.pid), machine_busy()
    t0 = time.monotonic()
    w = load(port, connections, duration, cpu)
    a1, h1, b1 = cpu_seconds(agent.proc.pid), cpu_seconds(haproxy.proc.pid), machine_busy()
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    s1 = resource.getrusage(resource.RUSAGE_SELF)
    m1 = agent.metrics()
    # CPU of the load generator: wrk (a waited child) or the in-process Python one
    loadgen_cpu = ((r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
                   + (s1.ru_utime + s1.ru_stime) - (s0.ru_utime + s0.ru_stime))
    busy_s = (b1[0] - b0[0]) / CLK_TCK
    d = {k: m1.get(k, 0) - m0.get(k, 0) for k in m1}
    notifies = d.get("spoa_agent_notify_frames_total", 0)
    requests = w["requests"]
    secs = w["duration_us"] / 1e6
    run = {
        "spoe": spoe,
        "connections": connections,
        "busy_cores_before": idle_before,
        "pinned_cpu": cpu,
        "load": w,
        "rps": requests / secs,
        "p50_us": w["latency_us"]["p50"],
        "p90_us": w["latency_us"]["p90"],
        "p99_us": w["latency_us"]["p99"],
        "mean_us": w["latency_us"]["mean"],
        "errors": sum(w["errors"].values()),
        "agent_cpu_s": a1 - a0,
        "haproxy_cpu_s": h1 - h0,
        "haproxy_cpu_us_per_req": (h1 - h0) / requests * 1e6 if requests else None,
        "machine_busy": (b1[0] - b0[0]) / max(1, b1[1] - b0[1]),
        "loadgen_cpu_s": loadgen_cpu,
        # cores used by anything else (other jobs on a shared box): noise indicator
        "other_cores": max(0.0, busy_s - (a1 - a0) - (h1 - h0) - loadgen_cpu) / wall,
        "notify_frames": notifies,
        "notify_per_request": notifies / requests if requests else None,
        "acks": d.get("spoa_agent_acks_total", 0),
        # reads (data_received calls) that carried NOTIFYs, from the depth histogram
        "notify_reads": d.get("spoa_agent_pipeline_depth_count", 0),
        "protocol_errors": sum(v for k, v in d.items() if k.startswith("spoa_agent_protocol_errors_total")),
        "handler_errors": d.get("spoa_agent_handler_errors_total", 0),
        "hellos": d.get("spoa_agent_hellos_total", 0),
        "max_pipeline_depth": m1.get("spoa_agent_max_pipeline_depth"),
        "agent_connections_active": m1.get("spoa_agent_connections_active"),
    }
    run["agent_cpu_us_per_msg"] = (a1 - a0) / notifies * 1e6 if notifies else None
    run["notify_per_read"] = notifies / run["notify_reads"] if run["notify_reads"] else None
    return run


def sanity(haproxy: HAProxy) -> dict:
    """One request each way: the ON frontend must carry the agent's variables."""
    status, headers = http_get(haproxy.on_port)
    lease = parse_lease_header(headers.get("x-lease"))
    ok = status == 200 and lease is not None and lease[1] == "standard" and "x-lease-error" not in headers
    status_off, headers_off = http_get(haproxy.off_port)
    return {"on_status": status, "on_x_lease": headers.get("x-lease"), "on_error": headers.get("x-lease-error"),
            "off_status": status_off, "off_x_lease": headers_off.get("x-lease"), "ok": ok}


def profile(agent: Agent, haproxy: HAProxy, load, connections: int, seconds: float, out_dir: Path,
            name: str) -> dict:
    """py-spy record (native frames, collapsed stacks) of the agent under SPOE-on load."""
    pyspy = shutil.which("py-spy")
    if not pyspy:
        return {"error": "py-spy not installed (pip install py-spy)"}
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"profile-{name}-c{connections}.txt"
    cmd = [pyspy, "record", "--native", "--format", "raw", "--rate", "200",
           "--duration", str(int(seconds) + 1), "--pid", str(agent.proc.pid), "-o", str(raw)]
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    load(haproxy.on_port, connections, seconds)
    _, err = spy.communicate(timeout=seconds + 60)
    if spy.returncode != 0 or not raw.exists():
        return {"error": f"py-spy failed: {err[-500:]}"}
    return {"raw": str(raw), "command": " ".join(cmd), **summarize_profile(raw)}


def _short(frame: str) -> str:
    # py-spy raw frames: "function (file.py:line)" or "function (file.py)"
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    func, path = m[1], m[2]
    return f"{func} ({Path(path).name})"


# Leaf frames where a thread waits rather than runs, and frames under which
# everything is waiting (the leaf may be an unresolved libc address): samples
# with either are left out of the percentages.
_IDLE_LEAVES = ("epoll_pwait", "epoll_wait", "poll ", "select ", "pselect", "nanosleep", "clock_nanosleep",
                "futex", "accept", "sem_wait", "sem_clockwait", "pthread_cond_wait", "pthread_cond_timedwait",
                "take_gil")
_IDLE_FRAMES = ("select_poll_poll_impl ", "_PollLikeSelector.select ", "pthread_cond_timedwait ",
                "PyThread_acquire_lock_timed ")


def summarize_profile(raw: Path, top: int = 25) -> dict:
    """Self and inclusive % of the busy samples (waiting leaves excluded) of a py-spy raw file."""
    self_t: Counter = Counter()
    incl: Counter = Counter()
    total = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        n = int(n)
        frames = [_short(f) for f in stack.split(";")]
        if frames[-1].startswith(_IDLE_LEAVES) or any(f.startswith(_IDLE_FRAMES) for f in frames):
            idle += n
            continue
        total += n
        self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    pct = lambda n: round(100 * n / max(1, total), 1)  # noqa: E731
    return {"busy_samples": total, "idle_samples": idle,
            "self": [(f, pct(n)) for f, n in self_t.most_common(top)],
            "inclusive": [(f, pct(n)) for f, n in incl.most_common(top + 20)]}


# -- main -------------------------------------------------------------------------------


def machine_info(binary) -> dict:
    info = {"python": platform.python_version(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "haproxy": binary.version, "cpu": cpu_model()}
    if shutil.which("wrk"):
        first = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
        info["wrk"] = first.split(" Copyright")[0].strip() or "wrk"
    try:
        import uvloop

        info["uvloop"] = uvloop.__version__
    except ImportError:
        pass
    return info


def fmt_row(label: str, r: dict) -> str:
    cpu = f"{r['agent_cpu_us_per_msg']:.1f}" if r.get("agent_cpu_us_per_msg") else "-"
    return (f"{label:<26}{r['connections']:>4}{r['rps']:>10.0f}{r['p50_us']:>9}{r['p90_us']:>9}{r['p99_us']:>9}"
            f"{r['errors']:>6}{cpu:>11}{r['haproxy_cpu_us_per_req']:>11.1f}"
            f"{(r['notify_per_request'] or 0):>9.3f}{(r['notify_per_read'] or 0):>9.2f}"
            f"{r['machine_busy']:>7.0%}{r['other_cores']:>7.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--haproxy", default="2.6", help="HAProxy line (spoa.tools.provision): 2.6, 2.8, 3.2")
    ap.add_argument("--duration", type=int, default=5, help="seconds per measured run")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load before each run")
    ap.add_argument("--connections", type=int, default=32, help="connections of the throughput runs")
    ap.add_argument("--reps", type=int, default=2, help="alternated off/on pairs at one connection")
    ap.add_argument("--c1-duration", type=int, default=2, help="seconds per one-connection run")
    ap.add_argument("--c1-pin", type=int, default=0, metavar="CPU",
                    help="also run the one-connection pairs with wrk, HAProxy and the agent pinned to this CPU "
                         "(-1: don't)")
    ap.add_argument("--quiet-wait", type=float, default=0.5,
                    help="before each run, wait up to this many seconds for other jobs to leave the CPUs idle")
    ap.add_argument("--variants", nargs="+", default=["product-cython", "product-python", "core-cython"],
                    help="agents to run: product-cython product-python core-cython core-python")
    ap.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    ap.add_argument("--profile", metavar="DIR",
                    help="after its measured runs, py-spy (--native) each Cython agent under SPOE-on load into DIR")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--nice", type=int, default=0,
                    help="run this script and its children at this nice value (e.g. -10, as root, so that other "
                         "jobs on a shared machine disturb the measurement less)")
    ap.add_argument("--summarize-profile", metavar="RAW", help="only print the summary of a py-spy raw file")
    args = ap.parse_args()
    if args.summarize_profile:
        prof = summarize_profile(Path(args.summarize_profile))
        print(f"{prof['busy_samples']} busy samples ({prof['idle_samples']} waiting left out); self, then inclusive:")
        for f, pct in prof["self"]:
            print(f"  self {pct:5.1f}%  {f}")
        for f, pct in prof["inclusive"]:
            print(f"  incl {pct:5.1f}%  {f}")
        return 0
    if args.nice:
        os.nice(args.nice)
    if args.c1_pin is not None and args.c1_pin < 0:
        args.c1_pin = None

    t_start = time.monotonic()
    if args.loadgen == "wrk" or (args.loadgen == "auto" and shutil.which("wrk")):
        if not shutil.which("wrk"):
            sys.exit("wrk not found (apt-get install -y wrk)")
        load, loadgen = run_wrk, "wrk"
    else:
        load, loadgen = run_python_load, "python"
        why = "--loadgen python" if args.loadgen == "python" else "wrk is not installed"
        print(f"NOTE ({why}): using the Python asyncio load generator, which is much slower than wrk "
              "and competes with HAProxy and the agent for the 2 cores (apt-get install -y wrk)")

    binary = provision.ensure(args.haproxy)
    info = machine_info(binary)
    report: dict = {"machine": info, "loadgen": loadgen, "command": " ".join(["python"] + sys.argv),
                    "nice": os.getpriority(os.PRIO_PROCESS, 0),
                    "tree": git_state(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "variants": {}}
    print(f"# {info.get('cpu')} x{info['cpus']}, kernel {info['kernel']}, Python {info['python']}, "
          f"HAProxy {binary.version} (nbthread 1), load: "
          + (f"{info.get('wrk', 'wrk')} -t1" if loadgen == "wrk" else "Python asyncio load generator (no wrk)"))
    header = (f"{'run':<26}{'c':>4}{'req/s':>10}{'p50us':>9}{'p90us':>9}{'p99us':>9}{'err':>6}"
              f"{'agent us/msg':>11}{' hap us/req':>11}{'ntf/req':>9}{'ntf/read':>9}{'busy':>7}{'other':>7}")
    known = {"product-cython": ("product", False), "product-python": ("product", True),
             "core-cython": ("core", False), "core-python": ("core", True)}
    for name in args.variants:
        if name not in known:
            sys.exit(f"unknown variant {name!r}: choose from {', '.join(known)}")
    for name in args.variants:
        kind, pure = known[name]
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-e2e-{name}-"))
        agent = Agent(tmp, kind, pure)
        haproxy = None
        try:
            haproxy = HAProxy(binary, tmp, agent.port)
            codec = agent.codec()
            if codec != ("python" if pure else "cython"):
                raise RuntimeError(f"agent {name} loaded the {codec} codec")
            wait_until(lambda: sanity(haproxy)["ok"], 10, 0.2, "agent answering through HAProxy", ignore=(OSError,))
            chk = sanity(haproxy)
            runs = []
            print(f"\n## {name}: {'the product agent' if kind == 'product' else 'SPOP core only'}, {codec} codec "
                  f"(loaded .so checked in /proc/PID/maps)\n   {'SPOA_NO_EXTENSIONS=1 ' if pure else ''}"
                  f"python {' '.join(agent.argv[1:])}")
            print(header)
            c = args.connections
            for spoe in ("off", "on"):
                r = measured_run(load, agent, haproxy, spoe, c, args.duration, args.warmup, args.quiet_wait)
                runs.append(r)
                print(fmt_row(f"SPOE {spoe}", r), flush=True)
            # One connection: latency is what matters and it is sensitive to
            # where the scheduler puts the three processes, so off/on are
            # alternated --reps times and the medians are reported.
            if args.warmup:
                load(haproxy.on_port, 1, args.warmup)
            for rep in range(args.reps):
                for spoe in ("off", "on"):
                    r = measured_run(load, agent, haproxy, spoe, 1, args.c1_duration, 0, args.quiet_wait)
                    r["rep"] = rep
                    runs.append(r)
                    print(fmt_row(f"SPOE {spoe} (rep {rep + 1})", r), flush=True)
            if args.c1_pin is not None and loadgen == "wrk":
                # The same with wrk, HAProxy and the agent on one CPU: no
                # cross-vCPU wake-ups, which cost tens of us on this VM.
                pin_all(str(args.c1_pin), agent.proc.pid, haproxy.proc.pid)
                try:
                    for rep in range(args.reps):
                        for spoe in ("off", "on"):
                            r = measured_run(load, agent, haproxy, spoe, 1, args.c1_duration, 0, args.quiet_wait,
                                             cpu=args.c1_pin)
                            r["rep"] = rep
                            runs.append(r)
                            print(fmt_row(f"SPOE {spoe} (rep {rep + 1}, cpu{args.c1_pin})", r), flush=True)
                finally:
                    pin_all(f"0-{os.cpu_count() - 1}", agent.proc.pid, haproxy.proc.pid)
            by = {(r["spoe"], r["connections"]): r for r in runs if r["connections"] == c}
            one = {spoe: [r for r in runs if r["connections"] == 1 and r["spoe"] == spoe and r["pinned_cpu"] is None]
                   for spoe in ("off", "on")}
            onep = {spoe: [r for r in runs if r["connections"] == 1 and r["spoe"] == spoe
                           and r["pinned_cpu"] is not None] for spoe in ("off", "on")}

            def med(values):
                v = sorted(values)
                return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

            def cpu_per_msg(rs):
                n = sum(r["notify_frames"] for r in rs)
                return sum(r["agent_cpu_s"] for r in rs) / n * 1e6 if n else None

            summary = {
                f"rps_off_c{c}": by[("off", c)]["rps"],
                f"rps_on_c{c}": by[("on", c)]["rps"],
                f"rps_on/off_c{c}": by[("on", c)]["rps"] / by[("off", c)]["rps"],
                f"p50_added_us_c{c}": by[("on", c)]["p50_us"] - by[("off", c)]["p50_us"],
                f"p99_added_us_c{c}": by[("on", c)]["p99_us"] - by[("off", c)]["p99_us"],
                "p50_off_us_c1_median": med([r["p50_us"] for r in one["off"]]),
                "p50_on_us_c1_median": med([r["p50_us"] for r in one["on"]]),
                "p50_added_us_c1": med([b["p50_us"] - a["p50_us"] for a, b in zip(one["off"], one["on"])]),
                "p50_added_us_c1_per_rep": [b["p50_us"] - a["p50_us"] for a, b in zip(one["off"], one["on"])],
                "mean_added_us_c1": med([b["mean_us"] - a["mean_us"] for a, b in zip(one["off"], one["on"])]),
                "p99_added_us_c1": med([b["p99_us"] - a["p99_us"] for a, b in zip(one["off"], one["on"])]),
                "rps_off_c1_median": med([r["rps"] for r in one["off"]]),
                "rps_on_c1_median": med([r["rps"] for r in one["on"]]),
                f"agent_cpu_us_per_msg_c{c}": by[("on", c)]["agent_cpu_us_per_msg"],
                "agent_cpu_us_per_msg_c1": cpu_per_msg(one["on"]),
                f"haproxy_cpu_us_per_req_added_c{c}": by[("on", c)]["haproxy_cpu_us_per_req"]
                - by[("off", c)]["haproxy_cpu_us_per_req"],
                "max_other_cores": max(r["other_cores"] for r in runs),
            }
            if onep["on"]:
                summary.update({
                    "pinned_p50_off_us_c1_median": med([r["p50_us"] for r in onep["off"]]),
                    "pinned_p50_on_us_c1_median": med([r["p50_us"] for r in onep["on"]]),
                    "pinned_p50_added_us_c1": med([b["p50_us"] - a["p50_us"] for a, b in zip(onep["off"], onep["on"])]),
                    "pinned_p50_added_us_c1_per_rep": [b["p50_us"] - a["p50_us"] for a, b in zip(onep["off"], onep["on"])],
                    "pinned_agent_cpu_us_per_msg_c1": cpu_per_msg(onep["on"]),
                })
            print(f"  on/off req/s at c={c}: {summary[f'rps_on/off_c{c}']:.2f}; added p50 at c=1: "
                  f"{summary['p50_added_us_c1']} us (median of {args.reps} pairs {summary['p50_added_us_c1_per_rep']}; mean +{summary['mean_added_us_c1']:.1f} us); agent CPU per message: "
                  f"{summary[f'agent_cpu_us_per_msg_c{c}']:.1f} us at c={c}, {summary['agent_cpu_us_per_msg_c1']:.1f} us at c=1")
            if "pinned_p50_added_us_c1" in summary:
                print(f"  all on cpu{args.c1_pin}, c=1: added p50 {summary['pinned_p50_added_us_c1']} us "
                      f"(pairs {summary['pinned_p50_added_us_c1_per_rep']}), agent CPU per message "
                      f"{summary['pinned_agent_cpu_us_per_msg_c1']:.1f} us")
            variant = {"kind": kind, "codec": codec, "sanity": chk, "runs": runs, "summary": summary, "agent_argv": agent.argv,
                       "haproxy_argv": haproxy.argv}
            if args.profile and not pure:
                print(f"  profiling the agent with py-spy ({args.duration:g}s, SPOE on, c={c}; not a measured run)",
                      flush=True)
                variant["profile"] = prof = profile(agent, haproxy, load, c, args.duration, Path(args.profile), name)
                if "error" in prof:
                    print(f"  profile: {prof['error']}")
                else:
                    print(f"  py-spy: {prof['busy_samples']} busy samples ({prof['idle_samples']} waiting left out)"
                          f" -> {prof['raw']}\n  top self time, % of busy samples:")
                    for f, pct in prof["self"][:15]:
                        print(f"    {pct:5.1f}%  {f}")
                    print("  top inclusive time:")
                    for f, pct in prof["inclusive"]:
                        if pct < 99:
                            print(f"    {pct:5.1f}%  {f}")
            report["variants"][name] = variant
        except BaseException:
            print(f"agent and HAProxy logs kept in {tmp}", file=sys.stderr)
            raise
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if haproxy is not None:
                haproxy.stop()
            agent.stop()
    c = args.connections
    v = report["variants"]
    ratios = {}
    key_c, key_1 = f"agent_cpu_us_per_msg_c{c}", "agent_cpu_us_per_msg_c1"
    for num, den in (("product-python", "product-cython"), ("core-python", "core-cython"),
                     ("product-cython", "core-cython")):
        if num in v and den in v:
            ratios[f"{num} / {den} agent CPU per msg, c={c}"] = v[num]["summary"][key_c] / v[den]["summary"][key_c]
            ratios[f"{num} / {den} agent CPU per msg, c=1"] = v[num]["summary"][key_1] / v[den]["summary"][key_1]
    report["ratios"] = ratios
    if ratios:
        print()
        for k, r in ratios.items():
            print(f"{k:<58} {r:6.2f}x")
    for name, var in v.items():
        if var["codec"] != "cython":
            continue
        sm = var["summary"]
        print(f"targets ({name}): agent CPU <= 10 us/msg: {sm[key_c]:.1f} us at c={c}, {sm[key_1]:.1f} us at c=1 -> "
              f"{'MET' if sm[key_c] <= 10 else 'MISSED'}; added latency at 1 connection <= 50 us: "
              f"p50 +{sm['p50_added_us_c1']} us -> {'MET' if sm['p50_added_us_c1'] <= 50 else 'MISSED'}"
              + (f" (all on one CPU: +{sm['pinned_p50_added_us_c1']} us)" if "pinned_p50_added_us_c1" in sm else ""))
    report["elapsed_s"] = time.monotonic() - t_start
    print(f"elapsed {report['elapsed_s']:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
