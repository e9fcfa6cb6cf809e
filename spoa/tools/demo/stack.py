"""Starts, watches and stops everything the demo runs, on loopback, in a temp dir.

Processes (each `subprocess.Popen` in its own process group, with a
parent-death signal so that even a SIGKILLed demo takes them down):

    lbnode   python -m spoa lbnode --config lbnode.yaml   (policy activity|volume); with
             --lbnodes N > 1: lbnode1 ... lbnodeN, one tier (`cluster:`) on a local
             3-primary/3-replica Valkey Cluster (spoa.tools.demo.tier), the agent
             publishing to all of them
    agent    python -m spoa agent  --config agent.yaml    (publishes every 500 ms to
             the LB node and to the tap)
    haproxy  the provisioned binary (spoa.tools.provision, line 3.2 by default) with the
             project's haproxy/example.cfg + agents.cfg, as the tests run it

In the demo's own event loop: the backend (spoa.tools.demo.backend), the traffic
generator (spoa.tools.demo.loadgen) and the tap (spoa.tools.demo.tap).

Cleanup runs on every exit path: the normal end, Ctrl-C / SIGTERM / SIGHUP
(signal handlers set the stop event), an exception (finally), interpreter
exit (atexit kills any group still alive) and the demo being killed
(PR_SET_PDEATHSIG in each child).
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from ... import __file__ as _spoa_init
from .. import provision
from ..haproxy_include import include_dir
from . import tier

PACKAGE_PARENT = Path(_spoa_init).resolve().parents[1]  # the checkout (or site-packages)
INTERVAL_MS = 500
STANDARD_MS = 30000
POLICIES = ("activity", "volume")
TICK_S = 0.5
PLAIN_EVERY_S = 2.0
LIVE_EVERY_S = 1.0
START_TIMEOUT = 15.0
MAX_LBNODES = 16
# The tier's membership lease: 3 demo intervals, renewed every 500 ms, so a node the 2-core box
# starves for one interval is not fenced; a dead node's slots move within about 2 s.
TIER_MEMBERSHIP_MS = 1500
TIER_NAMESPACE = "spoa-demo"


def haproxy_dir() -> Path:
    """The HAProxy include (spoe-lease.conf, agents.cfg, example.cfg): SPOA_LEASE_DIR,
    else the one installed with the package."""
    configured = os.environ.get("SPOA_LEASE_DIR")
    return Path(configured) if configured else include_dir()


# -- configuration shared with docker/ (tests/tools/test_docker.py checks they agree) -----------------


def agent_config(listen: str, metrics: str, lb_nodes: list[str], key_file: str) -> dict:
    return {
        "agent": {"listen": [listen], "shutdown_grace": 2.0},
        "publish": {"lb_nodes": lb_nodes, "key_file": key_file, "interval_ms": INTERVAL_MS, "node_id": 1},
        "lease": {"standard_ms": STANDARD_MS, "min_ms": 1000, "max_ms": 600_000},
        "sampler": {"source": "auto"},
        "metrics": {"listen": metrics},
        "log": {"level": "info"},
    }


def cluster_config(store: list[str]) -> dict:
    """An LB node's `cluster:` section in the demo's tier (the same for every node of it)."""
    return {"store": store, "namespace": TIER_NAMESPACE, "membership_ms": TIER_MEMBERSHIP_MS,
            "grace_ms": 3000, "timeout_ms": 300}


def lbnode_config(listen: str, metrics: str, key_file: str, policy: str, node_id: int | None = None,
                  cluster: dict | None = None) -> dict:
    """`node_id` and `cluster` for a node of the tier (--lbnodes N > 1); neither for the single node."""
    lbnode = {"listen": listen, "key_file": key_file, "interval_ms": INTERVAL_MS}
    if node_id is not None:
        lbnode["node_id"] = node_id
    config = {
        "lbnode": lbnode,
        # a demo runs for seconds at 500 ms intervals: a 3 s floor lets leases move within it (the
        # product's 12 s floor is chosen for 1 s intervals under loss: benchmarks/RESULTS.md)
        "lease": {"policy": policy, "standard_ms": STANDARD_MS, "min_ms": 3000, "max_ms": 600_000},
        "forecast": {"method": "ses", "alpha": 0.3},
        # few connections in a demo: let the detector speak after 50 samples, not 1000
        "anomaly": {"min_samples": 50},
        "metrics": {"listen": metrics},
        "log": {"level": "info"},
    }
    if cluster is not None:
        config["cluster"] = cluster
    return config


# -- processes ---------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports free for both TCP and UDP (all held until all are picked)."""
    held, ports = [], []
    try:
        while len(ports) < n:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(tcp)
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            held.append(udp)
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def _die_with_parent(parent: int):
    """preexec_fn: SIGTERM this child when the demo dies, even by SIGKILL (Linux)."""

    def setup() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:  # the demo died before prctl: do not run orphaned
            os._exit(1)

    return setup


class ManagedProcess:
    """A child in its own process group; stdout and stderr to a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.expected_exit = False
        self.died = False  # exited on its own while the demo ran (reported then)
        self.returncode: int | None = None

    def start(self) -> ManagedProcess:
        # Popen from the main thread only: PR_SET_PDEATHSIG fires when the *thread* that forked exits.
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True,
                                         preexec_fn=_die_with_parent(os.getpid()))
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def group_alive(self) -> bool:
        """Anything left in the process group (the child or what it forked)."""
        if self.proc is None:
            return False
        self.proc.poll()
        try:
            os.killpg(self.proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 8.0) -> tuple[int | None, bool]:
        """Signal, wait, then SIGKILL the group. Returns (exit code, had to be killed)."""
        if self.proc is None:
            return None, False
        self.expected_exit = True
        killed = False
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.proc.poll() is None:
                killed = True
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self.group_alive():  # a straggler the child left behind
            killed = True
            self._signal_group(signal.SIGKILL)
        self.returncode = self.proc.returncode
        return self.returncode, killed

    def kill(self) -> None:
        """Last resort (atexit): SIGKILL the whole group, no questions."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 8) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


async def wait_port(port: int, proc: ManagedProcess, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            proc.died = True
            raise StartError(f"{proc.name} exited with code {proc.proc.returncode} before listening on "
                             f"{port}:\n{proc.log_tail()}")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.5)
            writer.close()
            return
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.05)
    raise StartError(f"{proc.name}: nothing listens on 127.0.0.1:{port} after {timeout:.0f} s:\n{proc.log_tail()}")


class StartError(RuntimeError):
    pass


# -- reading the processes ------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[str, dict[tuple, float]]:
    """Prometheus text -> {name: {((label, value), ...): sample}}."""
    out: dict[str, dict[tuple, float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            labels = tuple(_LABEL.findall(m[2] or ""))
            out.setdefault(m[1], {})[labels] = float(m[3])
    return out


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as resp:
        return parse_metrics(resp.read().decode())


def metric(m: dict, name: str, default: float = 0.0) -> float:
    """Sum of a metric's samples (one for unlabelled ones)."""
    samples = m.get(name)
    return sum(samples.values()) if samples else default


def by_label(m: dict, name: str) -> dict[str, float]:
    return {labels[0][1] if labels else "": v for labels, v in m.get(name, {}).items()}


# "%ci:%cp %ft %b/%s %ST %B %Tt cid=... lease=... source=... err=... anomaly=..." (haproxy/example.cfg;
# anomaly= optional: older copies of the include end at err=)
_HAPROXY_LOG = re.compile(r"^(\S+):(\d+) (\S+) (\S+) (-?\d+) (\d+) (-?\d+) cid=(\S*) lease=(\S*) source=(\S*) "
                          r"err=(\S*)(?: anomaly=(\S*))?\s*$")


# What a soft stop logs, as a warning, on every version.
_STOPPING = re.compile(r"Proxy \S+ stopped|Stopping (frontend|backend|proxy)")


class HAProxyLog:
    """Follows HAProxy's log file (stdout, `log stdout format raw`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.requests = 0
        self.sources: Counter = Counter()
        self.statuses: Counter = Counter()
        self.spoe_errors = 0
        self.alerts: list[str] = []
        self.warnings: list[str] = []
        self.last_lines: list[str] = []

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for raw in lines:
            self._line(raw.decode(errors="replace"))

    def _line(self, line: str) -> None:
        m = _HAPROXY_LOG.match(line)
        if m is None:
            if "[ALERT]" in line:
                self.alerts.append(line.strip())
            elif "[WARNING]" in line and not _STOPPING.search(line):
                self.warnings.append(line.strip())
            return
        self.requests += 1
        self.statuses[m[5]] += 1
        self.sources[m[10] if m[10] not in ("", "-") else "none"] += 1
        if m[11] not in ("", "-"):
            self.spoe_errors += 1
        self.last_lines = (self.last_lines + [line])[-5:]


def haproxy_cli(sock_path: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(3)
        s.connect(str(sock_path))
        s.sendall(command.encode() + b"\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode(errors="replace")


# -- the demo ----------------------------------------------------------------------------------------


@dataclass
class DemoOptions:
    duration: float = 0.0  # 0: until Ctrl-C
    haproxy: str = "3.2"
    policy: str = "activity"
    plain: bool = False  # plain lines even on a terminal
    keep: bool = False  # keep the temp dir (logs, configs, key)
    seed: int | None = None
    lbnodes: int = 1  # > 1: a tier of that many LB nodes on a local store cluster

    @classmethod
    def from_args(cls, args) -> DemoOptions:
        return cls(duration=args.duration or 0.0, haproxy=args.haproxy, policy=args.policy,
                   plain=getattr(args, "plain", False), keep=getattr(args, "keep", False),
                   seed=getattr(args, "seed", None), lbnodes=getattr(args, "lbnodes", 1))

    @property
    def lbnode_names(self) -> list[str]:
        """Process names of the LB nodes: "lbnode" alone (today's demo), lbnode1 ... in a tier."""
        return ["lbnode"] if self.lbnodes == 1 else [f"lbnode{i}" for i in range(1, self.lbnodes + 1)]


class Stack:
    def __init__(self, opts: DemoOptions) -> None:
        self.opts = opts
        self.tmp = Path(tempfile.mkdtemp(prefix="spoa-demo-"))
        self.procs: dict[str, ManagedProcess] = {}
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.binary: provision.HAProxyBinary | None = None
        self.backend = None
        self.loadgen = None
        self.tap = None
        self.haproxy_log: HAProxyLog | None = None
        self.ports: dict[str, int] = {}
        self.agent_metrics: dict = {}
        self.lbnode_metrics: dict = {}  # every LB node's samples summed (the tier's totals)
        self.lbnode_metrics_by_node: dict[str, dict] = {}  # name -> that node's own
        self.store = None  # the tier's StoreCluster (--lbnodes N > 1)
        self.started_at = time.monotonic()
        self.running_since: float | None = None
        self.exit_codes: dict[str, int | None] = {}
        self.stopped = False
        self.stopped_at: float | None = None
        self.peak_segments = 0
        self.peak_tracked = 0
        atexit.register(self.kill_all)

    # -- start ---------------------------------------------------------------------------------
    def _child_env(self) -> dict:
        env = dict(os.environ)
        # The children import spoa from where this process did (checkout or install).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(self, name: str, argv: list[str], env: dict) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.tmp / f"{name}.log", env).start()
        self.procs[name] = proc
        return proc

    async def start(self, progress) -> None:
        from .backend import Backend
        from .loadgen import LoadGen
        from .tap import Tap

        opts = self.opts
        try:
            include = haproxy_dir()
        except FileNotFoundError as exc:
            raise StartError(str(exc)) from None
        for name in ("example.cfg", "agents.cfg", "spoe-lease.conf"):
            if not (include / name).is_file():
                raise StartError(f"{include / name} not found: SPOA_LEASE_DIR must name a folder holding "
                                 "the include (`spoa-lease haproxy-include DIR` writes one)")
        self.binary = provision.find(opts.haproxy)
        if self.binary is None:
            progress(f"HAProxy {opts.haproxy}: installing it (spoa.tools.provision, once; may take a few minutes)")
            self.binary = await asyncio.to_thread(provision.ensure, opts.haproxy)
        progress(f"HAProxy {self.binary.version}; work dir {self.tmp}")

        key_file = self.tmp / "lease.key"
        key_file.write_text(secrets.token_hex(32) + "\n")
        key_file.chmod(0o600)
        p = self.ports
        names = opts.lbnode_names
        picked = iter(free_ports(3 + 2 * len(names)))
        p["agent"], p["http"], p["agent_metrics"] = next(picked), next(picked), next(picked)
        for name in names:
            p[name], p[f"{name}_metrics"] = next(picked), next(picked)
        env = self._child_env()

        cluster = None
        if len(names) > 1:
            progress(f"store: starting a {tier.STORE_PRIMARIES}-primary/{tier.STORE_PRIMARIES * tier.STORE_REPLICAS}"
                     "-replica Valkey Cluster")
            try:  # from this (the main) thread: the servers' parent-death signal is tied to it
                self.store = tier.start_store(self.tmp / "store", _die_with_parent(os.getpid()))
            except (tier.TierUnavailable, TimeoutError, RuntimeError, OSError) as exc:
                raise StartError(f"store cluster: {exc}") from None
            cluster = cluster_config(self.store.seeds)
            progress(f"store cluster ready in {self.store.started_s:.1f} s ({', '.join(self.store.seeds)})")
        for index, name in enumerate(names, 1):
            config_yaml = self.tmp / f"{name}.yaml"
            config_yaml.write_text(yaml.safe_dump(lbnode_config(
                f"127.0.0.1:{p[name]}", f"127.0.0.1:{p[f'{name}_metrics']}", str(key_file), opts.policy,
                node_id=index if cluster else None, cluster=cluster)))
            lbnode = self._spawn(name, [sys.executable, "-m", "spoa", "lbnode", "--config", str(config_yaml)], env)
            await wait_port(p[f"{name}_metrics"], lbnode)
            progress(f"LB node {name} up (udp {p[name]}, policy {opts.policy}, pid {lbnode.pid})")

        self.tap = await Tap(key_file.read_bytes().strip(), INTERVAL_MS).open()
        p["tap"] = self.tap.port

        agent_yaml = self.tmp / "agent.yaml"
        agent_yaml.write_text(yaml.safe_dump(agent_config(
            f"127.0.0.1:{p['agent']}", f"127.0.0.1:{p['agent_metrics']}",
            [f"127.0.0.1:{p[name]}" for name in names] + [f"127.0.0.1:{p['tap']}"], str(key_file))))
        agent = self._spawn("agent", [sys.executable, "-m", "spoa", "agent", "--config", str(agent_yaml)], env)
        await wait_port(p["agent"], agent)
        await wait_port(p["agent_metrics"], agent)
        progress(f"agent up (spop {p['agent']}, publishing every {INTERVAL_MS} ms, pid {agent.pid})")

        self.backend = await Backend(seed=opts.seed).start()
        p["backend"] = self.backend.port

        hp_env = self.binary.run_env()
        hp_env.update(SPOA_LEASE_DIR=str(include), SPOA_LEASE_HTTP=f"127.0.0.1:{p['http']}",
                      SPOA_LEASE_APP=f"127.0.0.1:{p['backend']}", SPOA_LEASE_RUN=str(self.tmp),
                      SPOA_LEASE_AGENT=f"127.0.0.1:{p['agent']}")
        haproxy = self._spawn("haproxy", self.binary.command(
            "-db", "-f", str(include / "example.cfg"), "-f", str(include / "agents.cfg")), hp_env)
        self.haproxy_log = HAProxyLog(haproxy.log_path)
        # Not a TCP probe of the HTTP port: HAProxy would log it as a 400. Its stats
        # socket answers once the listeners are bound.
        await self._wait_stats_socket(haproxy)
        await self._wait_agent_up()
        progress(f"HAProxy up (http 127.0.0.1:{p['http']} -> backend {p['backend']}, pid {haproxy.pid})")

        self.loadgen = LoadGen("127.0.0.1", p["http"], seed=opts.seed).start()
        self.running_since = time.monotonic()
        progress("traffic: 2 streams, 3 WebSocket chats, 1 keep-alive poller, ~4 short requests/s")

    async def _wait_stats_socket(self, haproxy: ManagedProcess) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not haproxy.alive():
                haproxy.died = True
                raise StartError(f"haproxy exited with code {haproxy.proc.returncode} at start:\n"
                                 f"{haproxy.log_tail()}")
            try:
                if "Pid:" in await asyncio.to_thread(haproxy_cli, self.tmp / "haproxy.sock", "show info"):
                    return
            except OSError:
                pass
            await asyncio.sleep(0.05)
        raise StartError(f"haproxy: no stats socket after {START_TIMEOUT:.0f} s:\n{haproxy.log_tail()}")

    async def _wait_agent_up(self) -> None:
        """Until HAProxy's health check says the agent is UP (SPOE works from the first request)."""
        deadline = time.monotonic() + 10
        status = "?"
        while time.monotonic() < deadline:
            try:
                rows = (await asyncio.to_thread(haproxy_cli, self.tmp / "haproxy.sock", "show stat")).splitlines()
                header = rows[0].lstrip("# ").split(",")
                for row in rows[1:]:
                    cols = dict(zip(header, row.split(",")))
                    if cols.get("pxname") == "spoa-lease-agents" and cols.get("svname") == "agent1":
                        status = cols.get("status", "?")
                if status.startswith("UP"):
                    return
            except (OSError, IndexError):
                pass
            await asyncio.sleep(0.1)
        self.warnings.append(f"HAProxy still reports the agent {status} after 10 s")

    # -- run -------------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Scrape both /metrics endpoints, follow HAProxy's log, check every process."""
        for name, proc in self.procs.items():
            if not proc.alive() and not proc.expected_exit:
                proc.expected_exit = proc.died = True  # report once
                self.errors.append(f"{name} exited unexpectedly with code {proc.proc.returncode} "
                                   f"(log {proc.log_path}):\n{proc.log_tail()}")
        if self.haproxy_log is not None:
            self.haproxy_log.poll()
        for name in ["agent"] + self.opts.lbnode_names:
            if name in self.procs and self.procs[name].alive():
                try:
                    scraped = await asyncio.to_thread(scrape, self.ports[f"{name}_metrics"])
                except OSError:
                    continue  # next time; a dead process is reported above
                if name == "agent":
                    self.agent_metrics = scraped
                else:
                    self.lbnode_metrics_by_node[name] = scraped
        self.lbnode_metrics = tier.merge_metrics(list(self.lbnode_metrics_by_node.values()))
        if self.agent_metrics:
            self.peak_segments = max(self.peak_segments, int(metric(self.agent_metrics, "spoa_lease_segments")))
            self.peak_tracked = max(self.peak_tracked,
                                    int(metric(self.agent_metrics, "spoa_lease_tracked_connections")))
        if self.tap is not None:
            self.tap.prune()

    def elapsed(self) -> float:
        """Seconds of traffic (until the stop began)."""
        return (self.stopped_at or time.monotonic()) - (self.running_since or self.started_at)

    def failed(self) -> bool:
        return bool(self.errors)

    # -- stop ------------------------------------------------------------------------------------
    async def stop(self) -> None:
        """Stop everything, in order, each step bounded; safe to call twice."""
        if self.stopped:
            return
        self.stopped = True
        self.stopped_at = time.monotonic()
        if self.loadgen is not None:
            await self.loadgen.stop()
        haproxy = self.procs.get("haproxy")
        if haproxy is not None:
            if haproxy.alive():
                # Soft stop once no client connection is left: without this wait, HAProxy
                # 2.6.12 failed at SIGUSR1 in 4 runs of 24 here (SIGSEGV), none in 26 with it.
                await self._wait_haproxy_idle()
            code, killed = await haproxy.stop(signal.SIGUSR1, timeout=5)
            self._note_exit(haproxy, code, killed)
        if self.haproxy_log is not None:
            self.haproxy_log.poll()
        await asyncio.sleep(INTERVAL_MS / 1000 * 2)  # the closed records reach the LB node
        await self.refresh()
        for name in ["agent"] + self.opts.lbnode_names:
            proc = self.procs.get(name)
            if proc is not None:
                code, killed = await proc.stop(signal.SIGTERM, timeout=8)
                self._note_exit(proc, code, killed)
        if self.store is not None:  # after the LB nodes: their last writes and leaving reach it
            await asyncio.to_thread(self.store.stop)
        if self.backend is not None:
            await self.backend.stop()
        if self.tap is not None:
            self.tap.close()
        for name, proc in self.procs.items():
            if proc.group_alive():
                proc.kill()
                self.errors.append(f"{name}: processes left in its group after stop (killed)")
        self._scan_logs()

    async def _wait_haproxy_idle(self, timeout: float = 3.0) -> None:
        """Until HAProxy holds no client connection (the tunnels close in both directions)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                info = await asyncio.to_thread(haproxy_cli, self.tmp / "haproxy.sock", "show info")
            except OSError:
                return
            m = re.search(r"^CurrConns: (\d+)", info, re.M)
            if m is None or m[1] == "0":
                return
            await asyncio.sleep(0.05)

    def _note_exit(self, proc: ManagedProcess, code: int | None, killed: bool) -> None:
        self.exit_codes[proc.name] = code
        if killed:
            self.errors.append(f"{proc.name} did not stop in time and was killed (log {proc.log_path})")
        elif code not in (0, None) and not proc.died:
            self.errors.append(f"{proc.name} exited with code {code} (log {proc.log_path}):\n{proc.log_tail()}")

    def _scan_logs(self) -> None:
        for name in ["agent"] + self.opts.lbnode_names:
            proc = self.procs.get(name)
            if proc is None:
                continue
            bad = [line for line in proc.log_text().splitlines()
                   if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")]
            if bad:
                self.errors.append(f"{name} logged {len(bad)} error line(s), first: {bad[0]}")

    def kill_all(self) -> None:
        """atexit: nothing the demo started may outlive it."""
        for proc in self.procs.values():
            if proc.group_alive():
                proc.kill()
        if self.store is not None:
            for node in self.store.nodes:
                self.store.kill(node)

    def cleanup_dir(self, keep: bool) -> None:
        if not keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
