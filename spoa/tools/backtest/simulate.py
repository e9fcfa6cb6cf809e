"""Offline simulation of connection publishing under leases, vectorized per interval.

What is simulated is the protocol the product runs, with the product's own
forecasters and lease policies (built by ``spoa.lbnode.service.forecaster_from_config``
/ ``policy_from_config`` from the LB node's configuration, defaults from
``spoa.config``), one server node and one LB node:

Server node, at the end of every interval ``k`` (time ``T = (k + 1) * I``), as
``spoa.servernode.lease_module.SegmentTracker.set_hint``: every tracked connection has a record; a
closed connection's final record always goes out; a connection whose lease in
force is a *predicted* hint (fresh: received at most ``hint_ttl_ms`` ago, and
inside the server's [min_ms, max_ms]) and that was quiet in the interval is
published only when ``max(I, lease * refresh_fraction)`` has passed since it
was last published; every other record goes out every interval. A connection
ending without a close (``vanish``) simply stops being published. Faults
(``spoa.tools.backtest.faults``) first rewrite the trace: closes that are never
announced (``silent_end``), server-node crashes (``crash_rate``); records and
hints may be lost on the way (``loss``/``hint_loss``, independent per entry or
in bursts of ``faults.loss_burst`` intervals).

LB node, as ``spoa.lbnode.node.LeaseTable``: the records arrive at ``T``
(``ingest``): an unknown connection gets a slot with its class's lease (EWMA
of the leases recently granted to its class) or the standard lease; a
connection the node had let expire and that is refreshed again is counted by
the node as a premature expiry; volume accrues from cumulative totals;
``expires = T + lease in force``; a final record tells the policy's end bound
how idle the connection was and releases the state. At the node's own tick,
``lb_phase`` of an interval later (``end_interval``): for the refreshed
connections, volume per elapsed interval feeds the forecaster, the policy
observes it and grants leases, ``expires = refreshed_at + lease``, the class EWMA
learns, hints go back to the server (lost with ``hint_loss``); then every
state with ``expires < now`` is dropped. ARIMA is refitted every
``forecast.arima_refit_intervals`` on the histories of the 256 most recently
allocated connections, as the LB node service does.

Policies: ``fixed`` is today's mechanism (every live connection published
every interval, the standard lease, no prediction, no hints); ``volume`` the
specification's formula driven by one forecaster; ``activity`` the
inter-activity-gap policy, whose next-silence estimate comes from the same
forecaster (``lease.gap_estimate: forecast``). One pass per policy and
forecaster.

Ground truth the LB node cannot see is scored too:

* premature expiry: state dropped at an LB tick while the connection still
  exists (its last interval is later). The node's own counter
  (``lb_detected_premature``: a refresh after expiry) is reported beside it.
* state-seconds after end: for connections that closed or vanished, time
  from the end of their last interval until the LB node released the state.
  Censored connections (the trace stopped seeing them) count neither. The
  part of it held for silently ended connections (``vanish``: no final record
  ever) is the *stale state*: reported per silently ended connection, it is
  what a long lease costs. State-seconds held in total (every state, every
  interval) is the memory a policy costs.
* forecast error per connection-interval: the forecast in force at the start of
  the interval (the last one the LB made for that connection) against the
  bytes the interval carried, separately for idle (0 bytes) and active
  intervals. MASE divides by the trace's pooled in-sample naive error
  (``Connections.naive_scale``); the pinball loss is at ``pinball_q``, also
  scaled. A forecaster that always says 0 is perfect on idle intervals and
  poor on active ones at a high quantile; the "zero" reference shows that.

Cost: O(live connections) numpy work per interval; intervals with no live
connection are skipped.

The replay boundary: :func:`simulate` takes a :class:`Connections` (see
``traces``) and returns a :class:`Result`; a live replay through HAProxy can
feed the same ``Connections`` and compare its counters with the Result.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ... import config as cfg
from ...lbnode.forecast import ARIMA, History
from ...lbnode.service import ARIMA_REFIT_SAMPLE, forecaster_from_config, policy_from_config
from ...servernode.lease_module import LeaseSettings
from ...wire.packet import CONN_SIZE, DEFAULT_MTU, OVERHEAD, SEG_SIZE
from ...wire.records import LeaseSource
from .faults import Channel, Faults, inject
from .traces import END_CENSORED, END_CLOSE, END_VANISH, Connections

__all__ = [
    "DEFAULT_POLICY",
    "FORECASTERS",
    "POLICIES",
    "Result",
    "SimConfig",
    "run_name",
    "simulate",
    "simulate_all",
]

POLICIES = ("fixed", "volume", "activity")
FORECASTERS = cfg.FORECASTERS  # ("naive", "ses", "damped_holt", "croston", "tsb", "arima")
# Chosen by the frontier on the real traces under faults (benchmarks/RESULTS.md,
# "Leases under faults"): with lease.min_ms 12 s and safety 1 the activity policy driven by
# SES over silences cuts entries >= 70 % against the fixed 30 s lease with no
# premature expiry and half its stale state; SES needs fewer entries than naive
# at equal stale state, and TSB, identical on silences, costs more.
DEFAULT_POLICY = "activity-ses"

_PREDICTED = np.uint8(LeaseSource.PREDICTED)
_STANDARD = np.uint8(LeaseSource.STANDARD)


def run_name(policy: str, forecaster: str | None) -> str:
    return "fixed" if policy == "fixed" else f"{policy}-{forecaster}"


def _lbnode_defaults() -> dict:
    return cfg.defaults(cfg.LBNODE_SCHEMA)


def _server_defaults() -> LeaseSettings:
    names = {f.name for f in dataclasses.fields(LeaseSettings)}
    return LeaseSettings(**{k: v for k, v in cfg.defaults(cfg.AGENT_SCHEMA)["lease"].items() if k in names})


@dataclass
class SimConfig:
    """Everything but the trace. Defaults: the product's configuration defaults."""

    lease: dict = field(default_factory=lambda: _lbnode_defaults()["lease"])  # the LB node's lease section
    forecast: dict = field(default_factory=lambda: _lbnode_defaults()["forecast"])  # its forecast section
    server: LeaseSettings = field(default_factory=_server_defaults)  # the agent's lease section
    loss: float = 0.0  # probability a published record is lost
    hint_loss: float = 0.0  # probability a hint is lost
    lb_phase: float = 0.5  # LB tick, in intervals after the server node's
    seed: int = 0
    pinball_q: float = 0.99
    segments_per_record: int = 2  # one per direction: the usual record on the wire
    mtu: int = DEFAULT_MTU
    refit_sample: int = ARIMA_REFIT_SAMPLE
    faults: Faults = field(default_factory=Faults)
    # records of these intervals are all lost and no other (instead of ``loss``): what a live
    # run's lossy relay dropped, so that the simulation is of that very run
    lost_intervals: frozenset[int] | None = None

    def __post_init__(self) -> None:
        for name in ("loss", "hint_loss"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")
        if not 0.0 <= self.lb_phase < 1.0:
            raise ValueError("lb_phase must be in [0, 1)")
        if not 0.5 <= self.pinball_q < 1.0:
            raise ValueError("pinball_q must be in [0.5, 1)")

    @property
    def record_bytes(self) -> int:
        return CONN_SIZE + self.segments_per_record * SEG_SIZE

    def describe(self) -> dict:
        return {"lease": dict(self.lease), "forecast": dict(self.forecast),
                "server": dataclasses.asdict(self.server), "loss": self.loss, "hint_loss": self.hint_loss,
                "lb_phase": self.lb_phase, "seed": self.seed, "pinball_q": self.pinball_q,
                "record_bytes": self.record_bytes, "mtu": self.mtu, "faults": dataclasses.asdict(self.faults)}


_SUBSETS = ("idle", "active")


def _nan_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


@dataclass
class Result:
    """Metrics of one (trace, policy, forecaster) run. Counts add up across traces."""

    name: str
    policy: str
    forecaster: str | None
    trace: str
    interval_ms: int
    connections: int = 0
    connection_intervals: int = 0
    active_intervals: int = 0
    idle_intervals: int = 0
    busy_intervals: int = 0  # intervals with at least one live connection (the duration)
    publishing_entries: int = 0
    entries_idle: int = 0  # records published for an interval the connection was idle in
    entries_active: int = 0
    publishing_bytes: int = 0
    datagrams: int = 0
    hints: int = 0
    refreshes: int = 0  # records the LB node received
    allocations: int = 0
    premature_expiries: int = 0
    lb_detected_premature: int = 0
    expired: int = 0
    expired_at_ms: int = 0  # sum over expiries of the LB tick time that dropped them (a live run's compares)
    closed: int = 0
    ended_connections: int = 0  # closed or vanished (not censored)
    silent_ends: int = 0  # vanished: no final record ever
    state_ms_after_end: int = 0
    stale_ms_silent: int = 0  # the part of state_ms_after_end held for silent ends
    state_ms_held: int = 0  # every held state, every interval
    leases_predicted: int = 0
    leases_fallback: int = 0
    lease_ms_sum: float = 0.0
    forecast: dict = field(default_factory=dict)  # subset -> {"n", "abs", "pinball", "abs_scaled", ...}
    samples: dict = field(default_factory=dict)  # conn index -> per-interval arrays (plots)
    seconds: float = 0.0  # wall time of the pass that produced this

    # -- derived ----------------------------------------------------------------------------
    @property
    def duration_s(self) -> float:
        return self.busy_intervals * self.interval_ms / 1000.0

    @property
    def premature_share(self) -> float:
        return self.premature_expiries / self.connection_intervals if self.connection_intervals else 0.0

    @property
    def state_seconds_after_end(self) -> float:
        return self.state_ms_after_end / 1000.0

    def forecast_metrics(self) -> dict | None:
        if not self.forecast:
            return None
        out = {}
        total = {k: 0.0 for k in self.forecast["idle"]}
        for subset in _SUBSETS:
            s = self.forecast[subset]
            for key, v in s.items():
                total[key] += v
            out[subset] = _forecast_summary(s)
        out["all"] = _forecast_summary(total)
        return out

    def as_dict(self, reference: Result | None = None) -> dict:
        d = {
            "policy": self.policy, "forecaster": self.forecaster, "connections": self.connections,
            "connection_intervals": self.connection_intervals, "active_intervals": self.active_intervals,
            "idle_intervals": self.idle_intervals, "duration_s": self.duration_s,
            "publishing_entries": self.publishing_entries, "entries_idle_intervals": self.entries_idle,
            "entries_active_intervals": self.entries_active,
            "publishing_entries_per_s": self.publishing_entries / self.duration_s if self.duration_s else 0.0,
            "publishing_bytes": self.publishing_bytes,
            "publishing_bytes_per_s": self.publishing_bytes / self.duration_s if self.duration_s else 0.0,
            "datagrams": self.datagrams, "hints": self.hints, "refreshes": self.refreshes,
            "premature_expiries": self.premature_expiries, "premature_share": self.premature_share,
            "premature_share_of_idle": self.premature_expiries / self.idle_intervals if self.idle_intervals else 0.0,
            "lb_detected_premature": self.lb_detected_premature, "expired": self.expired, "closed": self.closed,
            "ended_connections": self.ended_connections,
            "state_seconds_after_end": self.state_seconds_after_end,
            "state_seconds_after_end_per_ended": (self.state_seconds_after_end / self.ended_connections
                                                  if self.ended_connections else 0.0),
            "silent_ends": self.silent_ends, "stale_state_seconds": self.stale_ms_silent / 1000.0,
            "stale_state_seconds_per_silent_end": (self.stale_ms_silent / 1000.0 / self.silent_ends
                                                   if self.silent_ends else 0.0),
            "state_seconds_held": self.state_ms_held / 1000.0,
            "leases_predicted": self.leases_predicted, "leases_fallback": self.leases_fallback,
            "mean_lease_ms": (self.lease_ms_sum / (self.leases_predicted + self.leases_fallback)
                              if self.leases_predicted + self.leases_fallback else None),
            "forecast_error": self.forecast_metrics(),
            "sim_seconds": self.seconds,
        }
        if reference is not None and reference.publishing_entries:
            d["entries_vs_fixed"] = self.publishing_entries / reference.publishing_entries
            d["entries_cut"] = 1.0 - d["entries_vs_fixed"]
        return _clean(d)

    def merge(self, other: Result) -> Result:
        """Sum of two results of the same run on different traces."""
        out = dataclasses.replace(self, trace=f"{self.trace}+{other.trace}", samples={},
                                  forecast=_merge_forecast(self.forecast, other.forecast))
        for f in dataclasses.fields(Result):
            if f.type in ("int", "float") and f.name not in ("interval_ms",):
                setattr(out, f.name, getattr(self, f.name) + getattr(other, f.name))
        return out


def _clean(d):
    if isinstance(d, dict):
        return {k: _clean(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_clean(v) for v in d]
    if isinstance(d, (np.floating, float)):
        return _nan_none(float(d))
    if isinstance(d, np.integer):
        return int(d)
    return d


def _merge_forecast(a: dict, b: dict) -> dict:
    if not a or not b:
        return a or b
    return {s: {k: a[s][k] + b[s][k] for k in a[s]} for s in a}


def _forecast_summary(s: dict) -> dict:
    n = s["n"]
    if not n:
        return {"n": 0, "mae": None, "mase": None, "pinball": None, "scaled_pinball": None}
    return _clean({"n": int(n), "mae": s["abs"] / n, "mase": s["abs_scaled"] / n if s["n_scaled"] else None,
                   "pinball": s["pinball"] / n,
                   "scaled_pinball": s["pinball_scaled"] / n if s["n_scaled"] else None})


def zero_forecast_reference(conns: Connections, q: float = 0.99) -> dict:
    """Forecast error of "always 0" on the trace: perfect when idle, blind when active."""
    y = conns.ev_total.astype(np.float64)
    y = y[y > 0]
    scale = conns.naive_scale()
    idle_n = conns.connection_intervals - y.size
    out = {"idle": {"n": idle_n, "abs": 0.0, "pinball": 0.0, "abs_scaled": 0.0, "pinball_scaled": 0.0,
                    "n_scaled": idle_n if scale > 0 else 0},
           "active": {"n": y.size, "abs": y.sum(), "pinball": q * y.sum(),
                      "abs_scaled": y.sum() / scale if scale > 0 else 0.0,
                      "pinball_scaled": q * y.sum() / scale if scale > 0 else 0.0,
                      "n_scaled": y.size if scale > 0 else 0}}
    return out


# ------------------------------------------------------------------------------ the pass


def _learn_classes(class_lease: np.ndarray, cls: np.ndarray, leases: np.ndarray) -> None:
    """LeaseTable._learn_classes: each class's prior is an EWMA (0.1) of the
    mean lease granted to it in the interval (the mean itself the first time)."""
    counts = np.bincount(cls, minlength=class_lease.size)
    sums = np.bincount(cls, weights=leases, minlength=class_lease.size)
    seen = counts > 0
    mean = sums[seen] / counts[seen]
    prior = class_lease[seen]
    class_lease[seen] = np.where(np.isnan(prior), mean, 0.9 * prior + 0.1 * mean)


class _Scores:
    """Forecast error of one forecaster, accumulated per connection-interval.

    Idle intervals (0 bytes) are scored through a running sum of the forecasts
    in force over live connections (error = forecast there), so the per-interval
    work is proportional to the refreshed and active connections only; the sum
    is recomputed exactly every few hundred intervals against drift.
    """

    def __init__(self, cap: int, q: float, inv_scale: float) -> None:
        self.fc = np.full(cap, np.nan)
        self.q = q
        self.inv_scale = inv_scale
        self.live_sum = 0.0  # sum of finite forecasts in force over live connections
        self.live_n = 0
        self.sums = {s: dict.fromkeys(("n", "abs", "pinball", "abs_scaled", "pinball_scaled", "n_scaled"), 0.0)
                     for s in _SUBSETS}

    def _adjust(self, old: np.ndarray, new: np.ndarray | None) -> None:
        ok = ~np.isnan(old)
        self.live_sum -= float(old[ok].sum())
        self.live_n -= int(np.count_nonzero(ok))
        if new is not None:
            ok = ~np.isnan(new)
            self.live_sum += float(new[ok].sum())
            self.live_n += int(np.count_nonzero(ok))

    def set(self, slots: np.ndarray, values: np.ndarray) -> None:
        """New forecasts for live slots."""
        self._adjust(self.fc[slots], values)
        self.fc[slots] = values

    def clear(self, slots: np.ndarray) -> None:
        """Live slots whose forecast state was reset (new allocation)."""
        self._adjust(self.fc[slots], None)
        self.fc[slots] = np.nan

    def leave(self, slots: np.ndarray) -> None:
        """Slots that stop being live (their forecast no longer scored)."""
        self._adjust(self.fc[slots], None)

    def resync(self, live: np.ndarray) -> None:
        f = self.fc[live]
        ok = ~np.isnan(f)
        self.live_sum = float(f[ok].sum())
        self.live_n = int(np.count_nonzero(ok))

    def score(self, active: np.ndarray, y: np.ndarray) -> None:
        """One interval: ``active`` slots carried ``y`` bytes, every other live slot 0."""
        q, inv = self.q, self.inv_scale
        f = self.fc[active]
        ok = ~np.isnan(f)
        f, ya = f[ok], y[ok]
        err = ya - f
        a_sum = float(np.abs(err).sum())
        p_sum = float(np.where(err >= 0, q * err, (q - 1.0) * err).sum())
        n_act = int(f.size)
        idle_n = self.live_n - n_act
        idle_sum = self.live_sum - float(f.sum())
        for subset, n, ab, pin in (("active", n_act, a_sum, p_sum),
                                   ("idle", idle_n, max(idle_sum, 0.0), (1.0 - q) * max(idle_sum, 0.0))):
            if n <= 0:
                continue
            s = self.sums[subset]
            s["n"] += n
            s["abs"] += ab
            s["pinball"] += pin
            if inv > 0:
                s["n_scaled"] += n
                s["abs_scaled"] += ab * inv
                s["pinball_scaled"] += pin * inv


_NEVER = np.iinfo(np.int64).max


def _pass(conns: Connections, policy: str, fnames: tuple[str, ...], conf: SimConfig,
          samples=(), progress: Callable[[int], None] | None = None) -> list[Result]:
    import time
    import warnings

    t_start = time.perf_counter()
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; known: {POLICIES}")
    conns = inject(conns, conf.faults, conf.seed)
    N = len(conns)
    I = int(conns.interval_ms)
    fixed = policy == "fixed"
    activity = policy == "activity"
    lease_cfg = dict(conf.lease, policy="activity" if activity else "volume")
    standard = int(lease_cfg["standard_ms"])
    srv = conf.server
    ttl, rf, smin, smax = srv.hint_ttl_ms, srv.refresh_fraction, srv.min_ms, srv.max_ms
    phase = int(round(conf.lb_phase * I))
    rng = np.random.default_rng(conf.seed)
    records_channel = Channel(conf.loss, conf.faults.loss_burst, rng, conf.lost_intervals)
    hints_channel = Channel(conf.hint_loss, conf.faults.loss_burst, rng)
    cap = max(N, 1)
    forecasters = [] if fixed else [forecaster_from_config({**conf.forecast, "method": f}, cap) for f in fnames]
    lb_policy = None if fixed else policy_from_config(lease_cfg, I, cap, {**conf.forecast, "method": fnames[0]})
    arimas = [f for f in forecasters if isinstance(f, ARIMA)]
    history = History(cap, conf.forecast["history"], np.float32) if arimas else None
    refit_every = int(conf.forecast["arima_refit_intervals"])
    last_refit = None

    start, end, kind, klass = conns.start, conns.end, conns.end_kind, conns.klass
    by_end = np.argsort(end, kind="stable")
    end_sorted = end[by_end]
    ev_k, ev_conn = conns.ev_k, conns.ev_conn
    ev_tot = conns.ev_total
    ev_has_zero = bool((ev_tot == 0).any())
    scale = conns.naive_scale()
    scores = [_Scores(cap, conf.pinball_q, 1.0 / scale if scale > 0 else 0.0) for _ in forecasters]

    # LB node state (LeaseTable), by slot = connection index
    held = np.zeros(cap, bool)
    expires = np.zeros(cap, np.int64)
    lapse_tick = np.full(cap, _NEVER, np.int64)  # first step whose LB tick sees expires < now
    refreshed_at = np.zeros(cap, np.int64)
    last_total = np.zeros(cap, np.int64)
    volume = np.zeros(cap, np.float64)
    elapsed = np.ones(cap, np.int64)
    lease = np.zeros(cap, np.int64)
    lapsed = np.zeros(cap, bool)  # recently_expired
    alloc_seq = np.zeros(cap, np.int64)
    class_lease = np.full(max(len(conns.classes), 1), np.nan)
    # server node state (LeaseModule)
    cum_total = np.zeros(cap, np.int64)
    hint_lease = np.zeros(cap, np.int64)
    hint_src = np.zeros(cap, np.uint8)
    hint_recv = np.zeros(cap, np.int64)
    due_at = np.full(cap, -np.inf)  # a quiet record goes out at a tick T >= due_at
    closing = np.zeros(cap, bool)  # scratch: closes this interval
    ybuf = np.zeros(cap, np.int64)  # scratch: bytes this interval

    def due_from_hint(slots: np.ndarray, now: int) -> np.ndarray:
        """SegmentTracker.set_hint as a time: published at T >= this while quiet (-inf: every interval)."""
        hl = hint_lease[slots]
        usable = (hint_src[slots] == _PREDICTED) & (hl >= smin) & (hl <= smax)
        due = np.minimum((hint_recv[slots] + ttl + 1).astype(np.float64), now + np.maximum(float(I), hl * rf))
        return np.where(usable, due, -np.inf)

    res = Result(run_name(policy, None if fixed else fnames[0]), policy, None if fixed else fnames[0],
                 conns.name, I, connections=N, connection_intervals=conns.connection_intervals,
                 active_intervals=conns.active_intervals)
    res.idle_intervals = res.connection_intervals - res.active_intervals
    res.ended_connections = int(np.count_nonzero(kind != END_CENSORED))
    res.silent_ends = int(np.count_nonzero(kind == END_VANISH))
    n_held = 0
    rec_bytes = conf.record_bytes
    per_dgram = max(1, (conf.mtu - OVERHEAD) // rec_bytes)

    sample_idx = np.array(sorted(set(int(s) for s in samples if 0 <= int(s) < N)), np.int64)
    n_fc = max(len(forecasters), 1)
    sample_rec = {int(c): {"k": np.arange(start[c], end[c] + 1), "actual": np.zeros(end[c] - start[c] + 1),
                           "forecast": np.full((n_fc, end[c] - start[c] + 1), np.nan),
                           "lease_ms": np.zeros(end[c] - start[c] + 1),
                           "published": np.zeros(end[c] - start[c] + 1, bool),
                           "held": np.zeros(end[c] - start[c] + 1, bool)} for c in sample_idx.tolist()}
    pub_scratch = np.zeros(cap, bool) if sample_idx.size else None

    alive = np.zeros(0, np.int64)
    lingering = np.zeros(0, np.int64)  # ended, state still held
    nxt = 0
    seq = 0
    steps = 0
    k = int(start[0]) if N else 0
    reported = k
    while True:
        j = int(np.searchsorted(start, k, side="right"))
        if j > nxt:
            alive = np.concatenate([alive, np.arange(nxt, j, dtype=np.int64)])
            nxt = j
        if alive.size == 0:
            if lingering.size == 0 and nxt >= N:
                break
            # jump to the next arrival or the next lapse of a lingering state
            cand = [int(start[nxt])] if nxt < N else []
            if lingering.size:
                cand.append(int(lapse_tick[lingering].min()))
            k2 = max(min(cand), k)
            if k2 > k:
                res.state_ms_held += n_held * (k2 - k) * I  # lingering states held through the gap
                k = k2
                continue
        T = (k + 1) * I
        t_lb = T + phase
        A = alive
        lo, hi = np.searchsorted(ev_k, (k, k + 1))
        ec, et = ev_conn[lo:hi], ev_tot[lo:hi]
        if ev_has_zero:  # packets without payload (pure ACKs): no data segments, the record stays quiet
            nz = et > 0
            ec, et = ec[nz], et[nz]
        lo, hi = np.searchsorted(end_sorted, (k, k + 1))
        enders = by_end[lo:hi]
        closers = enders[kind[enders] == END_CLOSE]
        if A.size:
            res.busy_intervals += 1
        if ec.size:
            cum_total[ec] += et
        steps += 1
        if steps % 512 == 0:
            for sc in scores:
                sc.resync(A)

        # -- forecast error of what was in force for this interval ---------------------------
        for sc in scores:
            sc.score(ec, et.astype(np.float64))

        # -- server node: which records go out (SegmentTracker.set_hint) ------------------
        if fixed:
            P = A
        else:
            due_at[ec] = -np.inf  # active: published this interval
            due_at[closers] = -np.inf  # final record: always
            P = A[due_at[A] <= T]
        n_pub = int(P.size)
        res.publishing_entries += n_pub
        res.entries_active += int(ec.size)
        res.entries_idle += n_pub - int(ec.size)
        if n_pub:
            dg = -(-n_pub // per_dgram)
            res.datagrams += dg
            res.publishing_bytes += n_pub * rec_bytes + dg * OVERHEAD
        arrive = records_channel.keep(n_pub, k)
        D = P if arrive is None else P[arrive]

        # -- LB node: ingest at T (LeaseTable.ingest) ---------------------------
        closing[closers] = True
        closD = closing[D]
        heldD = held[D]
        ignored = ~heldD & closD  # final report of a connection no longer held
        if ignored.any():
            lapsed[D[ignored]] = False
        newm = ~heldD & ~closD
        if newm.any():
            newc = D[newm]
            resumed = lapsed[newc]
            res.lb_detected_premature += int(np.count_nonzero(resumed))
            lapsed[newc] = False
            prior = class_lease[klass[newc]]
            lease[newc] = np.where(np.isnan(prior), float(standard), prior).astype(np.int64)
            # back from a premature expiry: resumed at its last total (as LeaseTable does)
            last_total[newc] = np.where(resumed, last_total[newc], 0)
            volume[newc] = 0.0
            elapsed[newc] = 1
            refreshed_at[newc] = T
            held[newc] = True
            alloc_seq[newc] = np.arange(seq, seq + newc.size)
            seq += newc.size
            for f in forecasters:
                f.reset(newc)
            for sc in scores:
                sc.clear(newc)
            if not fixed:
                lb_policy.reset(newc, T)
            if history is not None:
                history.reset(newc)
            res.allocations += newc.size
            n_held += newc.size
        if ignored.any():
            keep = ~ignored
            U, closU = D[keep], closD[keep]
        else:
            U, closU = D, closD
        closing[closers] = False
        if U.size:
            if not fixed:  # (the fixed lease needs no volumes)
                tot = cum_total[U]
                volume[U] += tot - last_total[U]
                last_total[U] = tot
                # round((now - refreshed_at) / I), at least 1; ingest times are whole intervals
                elapsed[U] = np.maximum(1, (T - refreshed_at[U] + I // 2) // I)
            refreshed_at[U] = T
            expires[U] = T + lease[U]
            res.refreshes += U.size
        if closU.any():
            gone = U[closU]
            if not fixed:
                lb_policy.closed(gone, klass[gone], T)
            held[gone] = False
            n_held -= gone.size
            lapse_tick[gone] = _NEVER
            res.closed += gone.size
            res.state_ms_after_end += int((T - (end[gone] + 1) * I).sum())
            R = U[~closU]
        else:
            R = U

        # -- LB node: its tick at t_lb (LeaseTable.end_interval) ---------------------------
        if R.size and not fixed:
            per = volume[R] / elapsed[R]
            for f, sc in zip(forecasters, scores):
                f.update(R, per)
                sc.set(R, f.forecast(R))
            if history is not None:
                history.push(R, per)
            cls = klass[R]
            lb_policy.observe(R, per, t_lb, cls)
            L, S = lb_policy.leases(R, scores[0].fc[R], class_lease[cls], cls, t_lb)
            lease[R] = L
            expires[R] = refreshed_at[R] + L
            volume[R] = 0.0
            _learn_classes(class_lease, klass[R], L)
            hm = hints_channel.keep(R.size, k)
            Rh, Lh, Sh = (R, L, S) if hm is None else (R[hm], L[hm], S[hm])
            hint_lease[Rh] = Lh
            hint_src[Rh] = Sh
            hint_recv[Rh] = t_lb
            res.hints += R.size
            n_pred = int(np.count_nonzero(S == _PREDICTED))
            res.leases_predicted += n_pred
            res.leases_fallback += R.size - n_pred
            res.lease_ms_sum += float(L.sum())
        elif R.size:
            volume[R] = 0.0
        if R.size:
            lapse_tick[R] = (expires[R] - phase) // I
        if not fixed and n_pub:
            due_at[P] = due_from_hint(P, T)  # after the hints: they arrive before the next tick
        if arimas and (last_refit is None or k - last_refit >= refit_every):
            if last_refit is not None:
                live = np.flatnonzero(held)
                if live.size:
                    live = live[np.argsort(alloc_seq[live])[-conf.refit_sample:]]
                    histories = {int(s): history.series(int(s)) for s in live}
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        for f in arimas:
                            f.refit(histories)
            last_refit = k

        # -- expiry (LeaseTable._expire) ---------------------------
        lap = A[lapse_tick[A] <= k]
        if lingering.size:
            lap = np.concatenate([lap, lingering[lapse_tick[lingering] <= k]])
        if lap.size:
            held[lap] = False
            lapse_tick[lap] = _NEVER
            lapsed[lap] = True
            res.expired += lap.size
            res.expired_at_ms += lap.size * t_lb
            n_held -= lap.size
            e = end[lap]
            alive_after = k < e
            res.premature_expiries += int(np.count_nonzero(alive_after))
            after = ~alive_after & (kind[lap] != END_CENSORED)
            if after.any():
                held_after = t_lb - (e[after] + 1) * I
                res.state_ms_after_end += int(held_after.sum())
                res.stale_ms_silent += int(held_after[kind[lap][after] == END_VANISH].sum())

        if sample_rec:
            pub_scratch[P] = True
            ybuf[ec] = et
            for c, r in sample_rec.items():
                if start[c] <= k <= end[c]:
                    i = k - int(start[c])
                    r["actual"][i] = ybuf[c]
                    r["published"][i] = pub_scratch[c]
                    r["held"][i] = held[c]
                    r["lease_ms"][i] = lease[c] if held[c] else 0
                    for fi, sc in enumerate(scores):
                        r["forecast"][fi, i] = sc.fc[c]
            pub_scratch[P] = False
            ybuf[ec] = 0

        # connections whose last interval this was leave; held ones linger
        if enders.size:
            for sc in scores:
                sc.leave(enders)
            alive = A[end[A] > k]
            lingering = np.concatenate([lingering[held[lingering]], enders[held[enders]]])
        elif lingering.size:
            lingering = lingering[held[lingering]]
        res.state_ms_held += n_held * I
        if progress is not None and k - reported >= 256:
            progress(k - reported)
            reported = k
        k += 1
    if progress is not None and k > reported:
        progress(k - reported)

    seconds = time.perf_counter() - t_start
    out = []
    for i, name in enumerate(fnames if not fixed else (None,)):
        r = dataclasses.replace(res, name=run_name(policy, name), forecaster=name,
                                forecast=scores[i].sums if scores else {}, seconds=seconds)
        r.samples = {c: {**rec, "forecast": rec["forecast"][i]} for c, rec in sample_rec.items()}
        out.append(r)
    return out


def simulate(connections: Connections, policy: str = "activity", forecaster: str = "ses",
             config: SimConfig | None = None, *, samples=(), progress=None) -> Result:
    """One run: ``policy`` (fixed, volume, activity) with ``forecaster``."""
    return _pass(connections, policy, (forecaster,), config or SimConfig(), samples, progress)[0]


def passes(policies=POLICIES, forecasters=FORECASTERS) -> list[tuple[str, tuple[str, ...]]]:
    """The passes a policy x forecaster matrix needs: fixed once, every other policy once per forecaster."""
    out = []
    for p in policies:
        if p == "fixed":
            out.append(("fixed", ()))
        elif p in ("volume", "activity"):
            out.extend((p, (f,)) for f in forecasters)
        else:
            raise ValueError(f"unknown policy {p!r}; known: {POLICIES}")
    return out


def _cost(task: tuple[str, tuple[str, ...]]) -> float:
    policy, fnames = task
    return (1.0 if policy == "fixed" else 2.0 + len(fnames)) + 5.0 * ("arima" in fnames)


_FORK_STATE: dict = {}


def _fork_worker(task: tuple[str, tuple[str, ...]]) -> list[Result]:
    st = _FORK_STATE
    counter = st["counter"]

    def progress(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    return _pass(st["conns"], task[0], task[1], st["conf"], st["samples"], progress)


def simulate_all(connections: Connections, config: SimConfig | None = None, policies=POLICIES,
                 forecasters=FORECASTERS, *, samples=(), progress=None, jobs: int = 1) -> dict[str, Result]:
    """Every policy with every forecaster (fixed once): ``{run name: Result}``.

    ``jobs > 1`` runs the passes in forked worker processes (Linux); results
    are the same as with one job. ``progress(n)`` is called with intervals done.
    """
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    conf = config or SimConfig()
    tasks = sorted(passes(policies, forecasters), key=_cost, reverse=True)
    results: dict[str, Result] = {}
    jobs = max(1, min(int(jobs), len(tasks)))
    if jobs == 1 or "fork" not in mp.get_all_start_methods():
        for policy, fnames in tasks:
            for r in _pass(connections, policy, fnames, conf, samples, progress):
                results[r.name] = r
    else:
        if "arima" in forecasters:
            import statsmodels.tsa.arima.model  # noqa: F401 - once here, not in every worker
        ctx = mp.get_context("fork")
        counter = ctx.Value("q", 0)
        _FORK_STATE.update(conns=connections, conf=conf, samples=tuple(samples), counter=counter)
        try:
            with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
                pending = {pool.submit(_fork_worker, t) for t in tasks}
                seen = 0
                while pending:
                    done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    if progress is not None:
                        value = counter.value
                        if value > seen:
                            progress(value - seen)
                            seen = value
                    for fut in done:
                        for r in fut.result():
                            results[r.name] = r
        finally:
            _FORK_STATE.clear()
    order = [run_name(p, f) for p, fs in passes(policies, forecasters) for f in (fs or (None,))]
    return {name: results[name] for name in order}
