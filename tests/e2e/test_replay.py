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

import numpy as np

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
    with _Counters(lbnode, ("spoa_lbnode_records_total", "spoa_lbnode_hint_datagrams_total"), 0.002) as counters:
        time.sleep(seconds)
    return {n: [t for t, _increase in moves] for n, moves in counters.moves.items()}


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


class _Counters:
    """LB node counters sampled every ``period`` s from another thread: when each moved, by how much."""

    def __init__(self, lbnode: LbNodeProcess, names: tuple[str, ...], period: float = 0.005) -> None:
        self.lbnode = lbnode
        self.names = names
        self.period = period
        self.moves: dict[str, list[tuple[float, float]]] = {n: [] for n in names}  # (wall time, increase)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = self.lbnode.metrics()
        prev_t = time.time()
        while not self._stop.wait(self.period):
            m = self.lbnode.metrics()
            t = time.time()
            for n in self.names:
                if m[n] != last[n]:
                    self.moves[n].append(((prev_t + t) / 2, m[n] - last[n]))
            last, prev_t = m, t

    def __enter__(self) -> _Counters:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _replay_through_stack(app_server, tmp_path, trace, relay_drop=None):
    """HAProxy 3.2 + agent + LB node (through a LossyRelay when ``relay_drop`` is given,
    called with (wall time, trace origin)), phases aligned, the trace replayed.

    Returns (replay stats, LB tick phase, origin, LB node and agent metric deltas, counter moves, relay)."""
    from spoa.testing.udp_relay import LossyRelay

    binary = provision.ensure("3.2")
    (tmp_path / "lease.key").write_bytes(KEY)
    lbnode = _lbnode(tmp_path)
    origin_box: dict = {}
    relay = None
    target = f"127.0.0.1:{lbnode.port}"
    if relay_drop is not None:
        relay = LossyRelay(target, drop=lambda t: "origin" in origin_box and relay_drop(t, origin_box["origin"]))
        relay.start()
        target = relay.address
    stack = Stack(binary, tmp_path, app_server, agent_config={
        "publish": {"lb_nodes": [target], "key_file": str(tmp_path / "lease.key"), "interval_ms": INTERVAL_MS},
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
        origin_box["origin"] = origin
        expiries = ("spoa_lbnode_expired_total", "spoa_lbnode_premature_expiries_total")
        with _Counters(stack.lbnode, expiries) as counters:
            stats = replay(trace, stack.haproxy.http_port, origin=origin)
            assert not stats.errors, stats.errors[:5]
            assert stats.late == 0, stats
            # the last final records, and (lost ones) the leases they leave to run out
            live = wait_until(lambda: _settled(stack.lbnode), timeout=30, interval=0.2,
                              what="every state released")
        agent = stack.agent.metrics()
    finally:
        stack.stop()
        stack.lbnode.stop()
        if relay is not None:
            relay.close()
    deltas = {n: int(live[n] - base[n]) for n in live if n.startswith("spoa_lbnode_") and n.endswith("_total")}
    deltas["agent_published"] = int(agent["spoa_lease_records_published_total"]
                                    - agent_base["spoa_lease_records_published_total"])
    return stats, lb_phase, origin, deltas, counters.moves, relay


def _sim_config(lb_phase: float, **kw) -> SimConfig:
    return SimConfig(lease=dict(cfg.defaults(cfg.LBNODE_SCHEMA)["lease"], **LEASE), server=LeaseSettings(**SERVER),
                     lb_phase=round(lb_phase, 3), **kw)


def test_live_replay_matches_simulation(app_server, tmp_path):
    trace = seeded_trace(n=30, seed=SEED, interval_ms=INTERVAL_MS)
    stats, lb_phase, _origin, d, _moves, _relay = _replay_through_stack(app_server, tmp_path, trace)
    sim = simulate(trace, "activity", cfg.defaults(cfg.LBNODE_SCHEMA)["forecast"]["method"], _sim_config(lb_phase))
    got = {"entries": d["spoa_lbnode_records_total"], "agent_published": d["agent_published"],
           "premature": d["spoa_lbnode_premature_expiries_total"], "expired": d["spoa_lbnode_expired_total"],
           "closed": d["spoa_lbnode_closed_total"], "new": d["spoa_lbnode_new_connections_total"]}
    want = {"entries": sim.publishing_entries, "premature": sim.lb_detected_premature,
            "premature_true": sim.premature_expiries, "expired": sim.expired, "closed": sim.closed,
            "new": sim.allocations, "fixed_entries": trace.connection_intervals}
    print(f"\nreplay: {stats}\nlb_phase={lb_phase:.3f}\nlive={got}\nsim={want}")
    assert got["new"] == want["new"] == len(trace)
    assert got["closed"] == want["closed"]
    assert abs(got["entries"] - want["entries"]) <= 0.05 * want["entries"], (got, want)
    assert got["premature"] == want["premature"], (got, want)
    assert got["premature"] == want["premature_true"]  # every connection here closes: the node sees them all


LOSS, BURST, LOSS_SEED = 0.25, 4.0, 5


def test_live_replay_under_loss_matches_simulation(app_server, tmp_path):
    """A relay between the agent and the LB node drops every publishing datagram of a seeded
    set of intervals (Gilbert-Elliott bursts: 25 % of intervals, 4 on average in a row); the
    simulation of the same run, told which intervals were lost, gives the same premature
    expiries, the same expiries, and the same state-seconds held after the connections ended
    (final records lost with the rest: those states wait for their lease)."""
    from spoa.tools.backtest.faults import Channel

    trace = seeded_trace(n=30, seed=SEED, interval_ms=INTERVAL_MS)
    chain = Channel(LOSS, BURST, np.random.default_rng(LOSS_SEED))
    lost = frozenset(k for k in range(trace.n_intervals + 1) if chain.keep(1, k) is not None)
    interval_s = INTERVAL_MS / 1000

    def relay_drop(t: float, origin: float) -> bool:
        # interval k's records leave on the agent's tick that ends it, at origin + (k + 1) * I
        return round((t - origin) / interval_s) - 1 in lost

    stats, lb_phase, origin, d, moves, relay = _replay_through_stack(app_server, tmp_path, trace, relay_drop)
    sim = simulate(trace, "activity", cfg.defaults(cfg.LBNODE_SCHEMA)["forecast"]["method"],
                   _sim_config(lb_phase, lost_intervals=lost))
    # expiry times: the LB tick each expiry happened on, as the simulator counts them (ms after origin)
    phase_ms = round(lb_phase * INTERVAL_MS)
    live_expired_at = sum(n * (round(((t - origin) * 1000 - phase_ms) / INTERVAL_MS) * INTERVAL_MS + phase_ms)
                          for t, n in moves["spoa_lbnode_expired_total"])
    # state held after the end, live: the simulation's, moved by how much later (earlier) the live expiries were
    live_after_end_s = (sim.state_ms_after_end + live_expired_at - sim.expired_at_ms) / 1000
    got = {"premature": d["spoa_lbnode_premature_expiries_total"], "expired": d["spoa_lbnode_expired_total"],
           "closed": d["spoa_lbnode_closed_total"], "entries": d["spoa_lbnode_records_total"],
           "after_end_s": live_after_end_s}
    want = {"premature": sim.lb_detected_premature, "expired": sim.expired, "closed": sim.closed,
            "received": sim.refreshes, "after_end_s": sim.state_seconds_after_end}
    print(f"\nreplay: {stats}\nlb_phase={lb_phase:.3f} lost intervals={sorted(lost)}\n"
          f"relay: forwarded {relay.forwarded}, dropped {relay.dropped}\nlive={got}\nsim={want}")
    assert relay.dropped > 0 and sim.expired > 0 and sim.lb_detected_premature > 0  # the faults bit
    assert got["premature"] == want["premature"], (got, want)
    assert got["expired"] == want["expired"], (got, want)
    assert got["closed"] == want["closed"], (got, want)
    assert abs(got["entries"] - want["received"]) <= 0.05 * want["received"], (got, want)
    # each expiry within an interval of the simulated one, on average
    assert abs(live_expired_at - sim.expired_at_ms) <= INTERVAL_MS * max(1, sim.expired) / 2, (got, want)
    assert abs(got["after_end_s"] - want["after_end_s"]) <= 0.1 * want["after_end_s"] + INTERVAL_MS / 1000
