"""Faults a lease exists for, injected into a backtest: ends nobody announces, crashes, loss.

Two kinds, applied the same way by the simulator and by the reference run of
the product's own code that tests it:

* **Ground truth** (:func:`inject`), a transform of the trace before it is
  simulated: ``silent_end`` is the share of closed connections whose end is
  never announced (no final record: the LB node learns of it only when the
  lease runs out); ``crash_rate`` is server-node crashes per hour (Poisson):
  at a crash every live connection ends silently at once, and after
  ``restart_intervals`` the restarted node publishes what was left of them
  as new connections (their clients reconnect and carry on).
* **The channel** (:class:`Channel`): which publishing records, or hints,
  arrive. Independent loss per record (``--loss``), or Gilbert-Elliott
  bursts (``--loss-burst N``): the path is good or bad for whole intervals,
  bad ones lose everything, the mean bad run is N intervals and the share of
  bad intervals is the loss rate. Bursts are what a flapping link, a full
  receive buffer or a restarting LB node do to a whole interval's datagrams.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .traces import END_CLOSE, END_VANISH, Connections

__all__ = ["Channel", "Faults", "inject"]


@dataclass(frozen=True)
class Faults:
    silent_end: float = 0.0  # share of closes never announced
    crash_rate: float = 0.0  # server-node crashes per hour
    restart_intervals: int = 1  # intervals a crashed node takes to publish again
    loss_burst: float = 0.0  # mean burst (intervals) of the Gilbert-Elliott channel; 0: independent loss

    def __post_init__(self) -> None:
        if not 0.0 <= self.silent_end <= 1.0:
            raise ValueError("silent_end must be in [0, 1]")
        if not (np.isfinite(self.crash_rate) and self.crash_rate >= 0.0):
            raise ValueError("crash_rate must be a finite number >= 0 (crashes per hour)")
        if self.restart_intervals < 1:
            raise ValueError("restart_intervals must be >= 1")
        if not (self.loss_burst == 0.0 or self.loss_burst >= 1.0):
            raise ValueError("loss_burst must be 0 (independent loss) or >= 1 interval")

    @property
    def active(self) -> bool:
        return self.silent_end > 0.0 or self.crash_rate > 0.0


def _crash_intervals(conns: Connections, rate_per_hour: float, rng: np.random.Generator) -> np.ndarray:
    """Crash times as a Poisson process over the intervals the trace spans."""
    if rate_per_hour <= 0.0 or not len(conns):
        return np.zeros(0, np.int64)
    first, last = int(conns.start.min()), int(conns.end.max())
    span_h = (last - first + 1) * conns.interval_ms / 3_600_000.0
    n = int(rng.poisson(rate_per_hour * span_h))
    return np.sort(rng.integers(first, last + 1, size=n)).astype(np.int64)


def inject(conns: Connections, faults: Faults, seed: int = 0) -> Connections:
    """The trace as the faults make it happen (a new Connections; ``conns`` is untouched).

    Silent ends are drawn first, per closed connection; then each crash, in
    time order, ends every connection live in its interval without a final
    record and starts the rest of each (its events after the restart) as a
    new connection of the same class, named ``<id>#crash<n>``.
    """
    if not faults.active:
        return conns
    rng = np.random.default_rng([seed, 0x5E1E])  # a stream of its own: the channel's draws stay as they were
    start, end = conns.start.copy(), conns.end.copy()
    kind, klass = conns.end_kind.copy(), conns.klass.copy()
    ids = list(conns.ids)
    ev_k, ev_conn = conns.ev_k.copy(), conns.ev_conn.copy()
    ev_bytes, ev_packets = conns.ev_bytes.copy(), conns.ev_packets.copy()
    if faults.silent_end > 0.0:
        silent = (kind == END_CLOSE) & (rng.random(kind.size) < faults.silent_end)
        kind[silent] = END_VANISH
    crashes = _crash_intervals(conns, faults.crash_rate, rng)
    for n, c in enumerate(crashes.tolist()):
        hit = np.flatnonzero((start <= c) & (end >= c))
        if not hit.size:
            continue
        resume = c + faults.restart_intervals
        rest = hit[end[hit] >= resume]
        new = np.arange(start.size, start.size + rest.size)
        # the remainder: from the restart to the old end, with the old end's kind
        start = np.r_[start, np.full(rest.size, resume, np.int64)]
        end = np.r_[end, end[rest]]
        kind = np.r_[kind, kind[rest]]
        klass = np.r_[klass, klass[rest]]
        ids += [f"{ids[i]}#crash{n}" for i in rest.tolist()]
        owner = np.full(start.size, -1, np.int64)
        owner[rest] = new
        moved = (owner[ev_conn] >= 0) & (ev_k >= resume)
        ev_conn = np.where(moved, owner[ev_conn], ev_conn)
        # the crashed part: ends in the crash interval, silently; events after it die with it
        end[hit] = c
        kind[hit] = END_VANISH
        keep = ev_k <= end[ev_conn]
        ev_k, ev_conn, ev_bytes, ev_packets = ev_k[keep], ev_conn[keep], ev_bytes[keep], ev_packets[keep]
    order = np.lexsort((np.arange(start.size), start))  # Connections are ordered by first interval
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    ev_conn = rank[ev_conn]
    ev_order = np.lexsort((ev_conn, ev_k))  # events by (interval, connection)
    info = dict(conns.info, silent_end=faults.silent_end, crash_rate=faults.crash_rate, crashes=int(crashes.size))
    return Connections(conns.name, conns.interval_ms, conns.origin, start[order], end[order], kind[order],
                       klass[order], conns.classes, [ids[i] for i in order.tolist()], ev_k[ev_order],
                       ev_conn[ev_order], ev_bytes[ev_order], ev_packets[ev_order], info)


class Channel:
    """Which of ``n`` datagram entries sent in interval ``k`` arrive.

    ``burst == 0``: each is lost independently with probability ``loss`` (one
    draw per entry, in the order given). Otherwise a two-state Gilbert-Elliott
    chain over intervals, stepped to ``k`` in closed form (skipped intervals
    need no draws): P(bad -> good) = 1 / burst, P(good -> bad) chosen so that
    the stationary share of bad intervals is ``loss``; in a bad interval every
    entry is lost, in a good one none. ``lost_intervals``: every entry of
    those intervals is lost, no other (a schedule recorded by a live run).
    """

    def __init__(self, loss: float, burst: float, rng: np.random.Generator,
                 lost_intervals: frozenset[int] | None = None) -> None:
        if not 0.0 <= loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        self.loss = float(loss)
        self.burst = float(burst)
        self.rng = rng
        # a schedule instead of draws: what a live run's relay dropped, to simulate that very run
        self.lost_intervals = lost_intervals
        self.bad = False
        self.k = None  # interval the state is for
        if self.burst:
            self.recover = 1.0 / self.burst
            self.fail = self.loss * self.recover / (1.0 - self.loss)
            self.memory = 1.0 - self.fail - self.recover  # how much of the state survives one step

    def keep(self, n: int, k: int) -> np.ndarray | None:
        """A mask of the entries that arrive, or None when all do."""
        if self.lost_intervals is not None:
            return np.zeros(n, bool) if n and k in self.lost_intervals else None
        if self.loss <= 0.0 or n == 0:
            return None
        if not self.burst:
            return self.rng.random(n) >= self.loss
        if self.k is None:
            p_bad = self.loss  # stationary
        else:
            p_bad = self.loss + (float(self.bad) - self.loss) * self.memory ** (k - self.k)
        if self.k != k:
            self.bad = bool(self.rng.random() < p_bad)
            self.k = k
        return np.zeros(n, bool) if self.bad else None
