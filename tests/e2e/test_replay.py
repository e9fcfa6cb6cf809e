"""Live replay of a seeded trace through HAProxy 3.2 vs the offline simulation of the same trace.

HAProxy + agent + LB node run with the lease configuration of test_leases
(activity policy, 200 ms interval, hint TTL 1 s); ``spoa.tools.backtest.replay``
drives one real keep-alive connection per trace connection through HAProxy's
HTTP frontend; the LB node's counters are compared with
``simulate(trace, "activity", ...)`` under the same configuration.

What is aligned, and why agreement can be exact:

* interval phase: a probe connection on the TCP frontend (another traffic
  class on the LB node, so the HTTP class's lease prior stays untouched)
  shows when the agent ticks (the LB node's record counter moves) and when
  the LB node ticks (its hint counter moves); the replay's interval 0 starts
  on an agent tick, each request 30 ms after it, and the simulation gets the
  measured LB tick offset as ``lb_phase``. An LB tick within 10 % of an agent
  tick would make the order "record arrives, then LB tick" a race, so the LB
  node is restarted until its phase is clear of that.
* bytes: the request line and response headers add bytes and bodies are
  capped (``replay`` docstring). The activity policy only looks at whether an
  interval carried traffic, and the server node's cadence only at quiet or
  not, so these do not change what is published. (The volume policy would.)
* registration: HAProxy registers a connection at its first request; every
  trace connection starts with an active interval (``seeded_trace``).
* setup/teardown: the connection opens in its first interval and closes at
  55 % of its last, so its final record leaves on the same tick as in the
  simulation.

What remains is timing noise (ticks are asyncio timers; a lease computed from
gaps measured at live LB tick times can fall on the other side of an interval
boundary in the server's ``lease * refresh_fraction`` test), so entries are
asserted within 5 %, premature expiries exactly.
"""

from __future__ import annotations

import socket
import threading
import time

from spoa import config as cfg
from spoa.servernode.lease_module import LeaseSettings
from spoa.tools import provision
from spoa.tools.backtest.replay import aligned_origin, replay, seeded_trace
from spoa.tools.backtest.simulate import SimConfig, simulate

from .conftest import Stack
from .harness import LbNodeProcess, wait_until

KEY = b"replay-e2e-shared-key-0123456789ab"
INTERVAL_MS = 200
LEASE = {"policy": "activity", "min_ms": 1000, "max_ms": 600_000, "standard_ms": 30000,
         "resource_utilization_threshold": 20.0}
SERVER = {"standard_ms": 30000, "min_ms": 1000, "max_ms": 600_000, "hint_ttl_ms": 1000}
SEED = 3


def _lbnode(tmp, port=None) -> LbNodeProcess:
    return LbNodeProcess(tmp, port=port, config={
        "lbnode": {"key_file": str(tmp / "lease.key"), "interval_ms": INTERVAL_MS, "max_connections": 10000},
        "lease": LEASE,
        "anomaly": {"enabled": False},
    }).start()


def _changes(lbnode: LbNodeProcess, seconds: float) -> dict[str, list[float]]:
    """Wall times at which the LB node's record and hint counters moved."""
    names = ("spoa_lbnode_records_total", "spoa_lbnode_hint_datagrams_total")
    out = {n: [] for n in names}
    last = lbnode.metrics()
    prev_t = time.time()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        m = lbnode.metrics()
        t = time.time()
        for n in names:
            if m[n] != last[n]:
                out[n].append((prev_t + t) / 2)
        last, prev_t = m, t
        time.sleep(0.002)
    return out


def _phase(times: list[float], ref: float, interval_s: float) -> float:
    """Median offset of ``times`` after ``ref`` on the interval circle, in intervals."""
    offs = sorted(((t - ref) / interval_s) % 1.0 for t in times)
    return offs[len(offs) // 2]


def _probe(stack) -> tuple[float, float]:
    """(one agent tick wall time, LB tick phase in intervals) via a TCP-frontend connection."""
    interval_s = INTERVAL_MS / 1000
    with socket.create_connection(("127.0.0.1", stack.haproxy.tcp_port), timeout=5) as s:
        s.sendall(b"probe")
        s.recv(16)
        stop = threading.Event()

        def chatter():  # active every interval: published (and hinted) at every tick
            while not stop.wait(0.04):
                try:
                    s.sendall(b"p")
                    s.recv(16)
                except OSError:
                    return

        th = threading.Thread(target=chatter, daemon=True)
        th.start()
        time.sleep(0.5)
        ch = _changes(stack.lbnode, 2.0)
        stop.set()
        th.join()
    rec, hint = ch["spoa_lbnode_records_total"], ch["spoa_lbnode_hint_datagrams_total"]
    assert len(rec) >= 5 and len(hint) >= 5, ch
    # agent ticks: the record counter moves ~1 ms after them
    ref = rec[0]
    agent_tick = ref + _phase(rec, ref, interval_s) * interval_s - 0.001
    return agent_tick, _phase(hint, agent_tick, interval_s)


def _settled(lbnode):
    m = lbnode.metrics()
    return m if m["spoa_lbnode_connections"] == 0 else None


def test_live_replay_matches_simulation(app_server, tmp_path):
    binary = provision.ensure("3.2")
    (tmp_path / "lease.key").write_bytes(KEY)
    trace = seeded_trace(n=30, seed=SEED, interval_ms=INTERVAL_MS)
    lbnode = _lbnode(tmp_path)
    stack = Stack(binary, tmp_path, app_server, agent_config={
        "publish": {"lb_nodes": [f"127.0.0.1:{lbnode.port}"], "key_file": str(tmp_path / "lease.key"),
                    "interval_ms": INTERVAL_MS},
        "lease": SERVER,
    })
    stack.lbnode = lbnode
    try:
        for _ in range(5):
            tick, lb_phase = _probe(stack)
            if 0.1 <= lb_phase <= 0.9:
                break
            stack.lbnode.stop()  # LB tick too close to the agent's: the order of the two is a race
            stack.lbnode = _lbnode(tmp_path, port=stack.lbnode.port)
        assert 0.1 <= lb_phase <= 0.9, lb_phase
        base = wait_until(lambda: _settled(stack.lbnode), timeout=5, interval=0.2, what="probe released")
        agent_base = stack.agent.metrics()

        origin = aligned_origin(tick, INTERVAL_MS, lead_s=0.5)
        stats = replay(trace, stack.haproxy.http_port, origin=origin)
        assert not stats.errors, stats.errors[:5]
        assert stats.late == 0, stats

        time.sleep(3 * INTERVAL_MS / 1000)  # the last final records
        live = wait_until(lambda: _settled(stack.lbnode), timeout=5, interval=0.2, what="every state released")
        agent = stack.agent.metrics()
    finally:
        stack.stop()
        stack.lbnode.stop()

    conf = SimConfig(lease=dict(cfg.defaults(cfg.LBNODE_SCHEMA)["lease"], **LEASE),
                     server=LeaseSettings(**SERVER), lb_phase=round(lb_phase, 3))
    sim = simulate(trace, "activity", cfg.defaults(cfg.LBNODE_SCHEMA)["forecast"]["method"], conf)

    def delta(name, m=live, b=base):
        return int(m[name] - b[name])

    got = {"entries": delta("spoa_lbnode_records_total"),
           "agent_published": delta("spoa_lease_records_published_total", agent, agent_base),
           "premature": delta("spoa_lbnode_premature_expiries_total"),
           "expired": delta("spoa_lbnode_expired_total"),
           "closed": delta("spoa_lbnode_closed_total"),
           "new": delta("spoa_lbnode_new_connections_total")}
    want = {"entries": sim.publishing_entries, "premature": sim.lb_detected_premature,
            "premature_true": sim.premature_expiries, "expired": sim.expired, "closed": sim.closed,
            "new": sim.allocations, "fixed_entries": trace.connection_intervals}
    print(f"\nreplay: {stats}\nlb_phase={lb_phase:.3f}\nlive={got}\nsim={want}")
    assert got["new"] == want["new"] == len(trace)
    assert got["closed"] == want["closed"]
    assert abs(got["entries"] - want["entries"]) <= 0.05 * want["entries"], (got, want)
    assert got["premature"] == want["premature"], (got, want)
    assert got["premature"] == want["premature_true"]  # every connection here closes: the node sees them all
