"""The LB-node tier through real HAProxy (2.6 and 3.2): faults while 200 clients keep talking.

Real processes only, on loopback: a 3-primary/3-replica Valkey Cluster (cluster-node-timeout
1 s), three `python -m spoa lbnode` of one tier (`cluster:`, membership 900 ms), the agent
behind HAProxy with the three in `publish.lb_nodes` (its bootstrap list: every record to each
until an LB node's tier map comes, then each record to its owner only), and 200 keep-alive
client connections held open for the whole test, each sending one request every ROUND_S.

Faults, one test each: SIGKILL of one LB node; SIGKILL of one LB node together with the store
primary serving the membership keys' slot (every node's renewals and the live-set reads fail
until its replica is promoted, the victim's lease lapses on the promoted one); SIGSTOP of one
LB node past its membership, then SIGCONT (it comes back fenced, then rejoins and loads its
share back from the store).

Across all nodes: 0 premature expiries; connections adopted > 0 and none counted as new again
(spoa_lbnode_new_connections_total summed over the tier stays the client count: each adopted
connection kept its cumulative totals); the survivors own every slot and hold every connection
within RESUME_BOUND_INTERVALS intervals of the fault; every response after warm-up carries a
`predicted` lease (sess.lease.source in X-Lease) although the agent's hint_ttl_ms is
HINT_TTL_INTERVALS intervals: no connection, the dead node's included, went that long without
a hint; and every request answers 200.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from spoa.lbnode.cluster.membership import members_prefix
from spoa.tools import provision
from spoa.tools.demo.loadgen import HttpConn

from .conftest import Stack
from .harness import LbNodeProcess, request_round, wait_until

KEY = b"tier-e2e-shared-key-0123456789abc"
CLIENTS = 200
INTERVAL_MS = 300  # cluster.membership_ms must be at least 3 intervals
MEMBERSHIP_MS = 900
SLOTS = 1024
# The agent's lease.hint_ttl_ms: a connection without a hint that long goes fallback. Longer than
# the slowest bound below, as an operator sets it to keep predicted leases through a failover
# (docs/sizing.md): the tests then assert that no client saw a fallback.
HINT_TTL_INTERVALS = 20
# Fault -> the survivors own every slot and hold every connection, in intervals: the membership
# lease (3 intervals) + the next live-set read + the load; with the store primary of the
# membership keys killed too, + its replica's promotion (cluster-node-timeout 1 s, ~2.4 s in
# all) + the settling period after the outage (2 intervals: the survivors re-assert their
# membership keys, which the promoted replica lost, and keep every member for two renewal
# periods before they believe anyone gone; spoa/lbnode/cluster/membership.py).
RESUME_BOUND_INTERVALS = 8
RESUME_BOUND_WITH_STORE_INTERVALS = 18
ROUND_S = 0.5  # each client sends one request per round
WARM_UP_S = 40.0  # bound on the tier forming and every client seeing a predicted lease
AFTER_S = 4.0  # rounds still driven after the tier settled again


def _metric(node: LbNodeProcess, name: str) -> float:
    return node.metrics().get(name, 0.0)


def _sum(nodes, name: str) -> float:
    return sum(_metric(n, name) for n in nodes)


@dataclass
class Round:
    started: float
    sources: Counter
    statuses: Counter


@dataclass
class Clients:
    """CLIENTS keep-alive connections through HAProxy, one request each per round, in a thread of their own."""

    port: int
    rounds: list[Round] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    opened: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Clients:
        self.thread = threading.Thread(target=lambda: asyncio.run(self._drive()), daemon=True)
        self.thread.start()
        assert self.opened.wait(30), f"{CLIENTS} client connections not opened in 30 s: {self.errors}"
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the clients did not stop within 30 s"

    async def _drive(self) -> None:
        conns = []
        try:
            for _ in range(CLIENTS):  # one by one: a burst of SYNs would only measure the accept queue
                conns.append(await HttpConn.open("127.0.0.1", self.port))
            self.opened.set()
            while not self.stopping.is_set():
                started = time.monotonic()
                self.rounds.append(Round(started, *await request_round(conns)))
                await asyncio.sleep(max(0.0, ROUND_S - (time.monotonic() - started)))
        except Exception as exc:  # noqa: BLE001 - reported by the test, which fails on any
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            await asyncio.gather(*(conn.close() for conn in conns), return_exceptions=True)

    def since(self, moment: float) -> list[Round]:
        return [r for r in self.rounds if r.started >= moment]


@dataclass
class Tier:
    store: object  # StoreCluster
    namespace: str
    nodes: list[LbNodeProcess]
    stack: Stack
    clients: Clients | None = None

    def figures(self) -> list[dict]:
        """Each node's ownership figures (for failure messages)."""
        names = ("slots_owned", "tier_members", "connections", "fences_total", "fenced", "answering",
                 "premature_expiries_total", "connections_adopted_total", "new_connections_total")
        return [{name: _metric(n, f"spoa_lbnode_{name}") for name in names} if n.proc.poll() is None else "dead"
                for n in self.nodes]

    def owns_everything(self, nodes) -> bool:
        return (_sum(nodes, "spoa_lbnode_slots_owned") == SLOTS
                and all(_metric(n, "spoa_lbnode_tier_members") == len(nodes) for n in nodes)
                and _sum(nodes, "spoa_lbnode_connections") == CLIENTS)


@pytest.fixture(params=["2.6", "3.2"], ids=lambda line: f"haproxy-{line}")
def line(request):
    return request.param


def _start_tier(line: str, store, app_server, tmp_path) -> Tier:
    binary = provision.ensure(line)
    key_file = tmp_path / "lease.key"
    key_file.write_bytes(KEY)
    namespace = f"e2e-{time.time_ns()}"
    cluster = {"store": store.seeds, "namespace": namespace, "slots": SLOTS, "membership_ms": MEMBERSHIP_MS,
               "timeout_ms": 300, "grace_ms": 3000}
    nodes = [LbNodeProcess(tmp_path, config={
        "lbnode": {"key_file": str(key_file), "node_id": 201 + i, "interval_ms": INTERVAL_MS},
        "lease": {"min_ms": 1000}, "cluster": cluster}) for i in range(3)]
    for node in nodes:
        node.start()
    stack = Stack(binary, tmp_path, app_server, agent_config={
        "publish": {"lb_nodes": [f"127.0.0.1:{n.port}" for n in nodes], "key_file": str(key_file),
                    "interval_ms": INTERVAL_MS},
        "lease": {"min_ms": 1000, "hint_ttl_ms": HINT_TTL_INTERVALS * INTERVAL_MS},
    })
    return Tier(store, namespace, nodes, stack)


def _stop_tier(tier: Tier) -> None:
    if tier.clients is not None and not tier.clients.stopping.is_set():
        tier.clients.stop()
    tier.stack.stop()
    for node in tier.nodes:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGCONT)  # a frozen one must take its SIGKILL
        node.kill()


@pytest.fixture
def tier(line, store_cluster, app_server, tmp_path):
    """The tier on the session's store cluster (its nodes are not harmed; the tier's own namespace)."""
    t = _start_tier(line, store_cluster, app_server, tmp_path)
    yield t
    _stop_tier(t)


@pytest.fixture
def tier_own_store(line, new_store_cluster, app_server, tmp_path):
    """The tier on a store cluster of its own (the test kills one of its primaries)."""
    t = _start_tier(line, new_store_cluster(primaries=3, replicas=1), app_server, tmp_path)
    yield t
    _stop_tier(t)


def _warm_up(tier: Tier) -> tuple[float, dict]:
    """Clients connected, the tier sharing every slot and connection, every client on a predicted
    lease; then a few intervals so that every connection's state is in the store. Returns the
    moment warm-up ended and the tier's figures then."""
    # Formed before any client: the faults are what is tested, not the tier's first join.
    wait_until(lambda: all(_metric(n, "spoa_lbnode_tier_members") == 3 for n in tier.nodes)
               and _sum(tier.nodes, "spoa_lbnode_slots_owned") == SLOTS, timeout=WARM_UP_S, interval=0.25,
               what=f"the three LB nodes to form one tier ({tier.figures()})")
    tier.clients = Clients(tier.stack.haproxy.http_port).start()
    wait_until(lambda: tier.owns_everything(tier.nodes), timeout=WARM_UP_S, interval=0.25,
               what="the three LB nodes to share every slot and hold every client connection")
    wait_until(lambda: (rounds := tier.clients.rounds) and rounds[-1].sources["predicted"] == CLIENTS,
               timeout=WARM_UP_S, interval=0.25, what="every client to see a predicted lease")
    time.sleep(3 * INTERVAL_MS / 1000)
    held = [_metric(n, "spoa_lbnode_connections") for n in tier.nodes]
    assert all(0.15 * CLIENTS < h < 0.55 * CLIENTS for h in held), held  # each node its share
    new = _sum(tier.nodes, "spoa_lbnode_new_connections_total")
    assert new == CLIENTS, (new, tier.figures())  # each client connection new once, at its owner
    return time.monotonic(), {"held": held, "new": new}


def _until_survivors_own_everything(tier: Tier, survivors, fault_at: float) -> float:
    """Seconds from the fault until the survivors own every slot and hold every connection (bounded)."""
    wait_until(lambda: tier.owns_everything(survivors), timeout=RESUME_BOUND_WITH_STORE_INTERVALS * INTERVAL_MS / 1000 + 10,
               interval=0.05, what="the survivors to own every slot and hold every connection")
    return time.monotonic() - fault_at


def _check_clients_and_nodes(tier: Tier, warm_end: float) -> None:
    """After AFTER_S more rounds: every request 200, every lease since warm-up predicted, no premature expiry."""
    time.sleep(AFTER_S)
    tier.clients.stop()
    assert not tier.clients.errors, tier.clients.errors
    rounds = tier.clients.since(warm_end)
    assert len(rounds) >= 8, len(rounds)
    for r in rounds:
        assert r.statuses == Counter({200: CLIENTS}), r.statuses  # 0 failed client requests
    not_predicted = [(round(r.started - warm_end, 1), dict(r.sources)) for r in rounds
                     if r.sources["predicted"] != CLIENTS]
    assert not not_predicted, not_predicted
    for node in tier.nodes:
        if node.proc.poll() is None:
            m = node.metrics()
            assert m["spoa_lbnode_premature_expiries_total"] == 0, (tier.nodes.index(node), tier.figures())
            assert m["spoa_lbnode_fenced"] == 0


def _report(what: str, seconds: float) -> None:
    print(f"\n{what}: {seconds:.2f} s = {seconds * 1000 / INTERVAL_MS:.1f} intervals")


def _sigkill_and_check(tier: Tier, bound_intervals: int, break_store=None) -> None:
    warm_end, before = _warm_up(tier)
    victim, survivors = tier.nodes[0], tier.nodes[1:]
    lost = before["held"][0]
    new_before = _sum(survivors, "spoa_lbnode_new_connections_total")
    adopted_before = _sum(survivors, "spoa_lbnode_connections_adopted_total")
    fault_at = time.monotonic()
    victim.kill()
    if break_store is not None:
        break_store()
    failover = _until_survivors_own_everything(tier, survivors, fault_at)
    _report("survivors own every slot and hold every connection after", failover)
    assert failover <= bound_intervals * INTERVAL_MS / 1000, failover
    adopted = _sum(survivors, "spoa_lbnode_connections_adopted_total") - adopted_before
    assert adopted >= lost > 0, (adopted, lost, tier.figures())
    _check_clients_and_nodes(tier, warm_end)
    # none of the victim's connections came back as new: each kept its cumulative totals
    assert _sum(survivors, "spoa_lbnode_new_connections_total") == new_before, (new_before, tier.figures())


def test_sigkill_of_one_lbnode(tier):
    _sigkill_and_check(tier, RESUME_BOUND_INTERVALS)


def test_sigkill_of_one_lbnode_with_the_store_primary_of_the_membership_keys(tier_own_store):
    from redis.crc import key_slot

    tier = tier_own_store
    store = tier.store
    membership_slot = key_slot(f"{members_prefix(tier.namespace)}:ids".encode())
    primary = store.primary_for_slot(membership_slot)

    def break_store() -> None:
        store.kill(primary)

    _sigkill_and_check(tier, RESUME_BOUND_WITH_STORE_INTERVALS, break_store)
    promoted = store.primary_for_slot(membership_slot)
    assert promoted is not primary and promoted.alive  # its replica took over


def test_sigstop_past_the_membership_then_sigcont_fences_and_rejoins(tier):
    warm_end, _ = _warm_up(tier)
    frozen, others = tier.nodes[0], tier.nodes[1:]
    adopted_before = _sum(tier.nodes, "spoa_lbnode_connections_adopted_total")
    fault_at = time.monotonic()
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        failover = _until_survivors_own_everything(tier, others, fault_at)
        _report("the others own every slot and hold every connection after", failover)
        time.sleep(2 * INTERVAL_MS / 1000)
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    woken_at = time.monotonic()
    wait_until(lambda: _metric(frozen, "spoa_lbnode_fences_total") >= 1 and _metric(frozen, "spoa_lbnode_slots_owned")
               and tier.owns_everything(tier.nodes), timeout=15, interval=0.05,
               what=f"the woken node fenced, rejoined and owning its share again ({tier.figures()})")
    _report("the woken node fenced and rejoined after", time.monotonic() - woken_at)
    assert failover <= RESUME_BOUND_INTERVALS * INTERVAL_MS / 1000, failover
    assert _sum(tier.nodes, "spoa_lbnode_connections_adopted_total") > adopted_before
    assert _metric(frozen, "spoa_lbnode_connections_adopted_total") > 0  # its share back, from the store
    _check_clients_and_nodes(tier, warm_end)
    # the frozen node's share moved out and back by adoption, never as new connections
    assert _sum(tier.nodes, "spoa_lbnode_new_connections_total") == CLIENTS, tier.figures()
