"""Seeded synthetic traffic with known shapes, for tests and benchmarks.

Kinds (one interval = ``interval_ms``; sizes are bytes per interval):

* ``onoff``: heavy-tailed ON/OFF source (Pareto ON periods, alpha 1.5, and OFF
  periods, alpha 1.2), lognormal bytes while ON; closes after a Pareto
  lifetime.
* ``bulk``: a transfer at a constant rate, active every interval, then closes.
* ``keepalive``: keep-alive only: a ~100-byte ping every ``P`` s
  (``P`` uniform in 10..60 s per connection), long-lived.
* ``chatty``: websocket-like: small messages with exponential inter-arrival
  times (mean 0.3..5 s per connection), long-lived.
* ``http_keepalive``: the shape most common on the real traces
  (shared/data/traces/SOURCES.md): a short burst, then silence until the
  keep-alive timeout (15, 30, 45 or 60 s), then close.

Connections arrive uniformly over ``duration_s`` (they may outlive it). Each
ends with a close (final record) or, with probability ``vanish_share``,
vanishes without one. The traffic class (frontend) is the kind, as if each
kind were served on its own port.

Everything is vectorized: 100k connections take about a second.
:func:`from_series` builds connections from explicit per-interval byte counts
(known-answer tests).
"""

from __future__ import annotations

import numpy as np

from .traces import END_CLOSE, END_VANISH, Connections

__all__ = ["DEFAULT_MIX", "KINDS", "from_series", "generate"]

KINDS = ("onoff", "bulk", "keepalive", "chatty", "http_keepalive")
DEFAULT_MIX = {"onoff": 0.3, "bulk": 0.1, "keepalive": 0.15, "chatty": 0.15, "http_keepalive": 0.3}
MSS = 1448


def _pareto(rng, alpha: float, xm: float, size, cap: float) -> np.ndarray:
    return np.minimum(xm * (1.0 + rng.pareto(alpha, size)), cap)


def _expand(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, offset) for ``lengths[i]`` consecutive items per owner i."""
    lengths = np.asarray(lengths, np.int64)
    owner = np.repeat(np.arange(lengths.size), lengths)
    first = np.cumsum(lengths) - lengths
    offset = np.arange(owner.size) - first[owner]
    return owner, offset


def _onoff(rng, n):
    life = np.ceil(_pareto(rng, 1.3, 20.0, n, 3600.0)).astype(np.int64)
    cycles = 48
    on = np.ceil(_pareto(rng, 1.5, 1.0, (n, cycles), 120.0)).astype(np.int64)
    off = np.ceil(_pareto(rng, 1.2, 2.0, (n, cycles), 600.0)).astype(np.int64)
    period_start = np.zeros((n, cycles), np.int64)
    period_start[:, 1:] = np.cumsum(on + off, axis=1)[:, :-1]
    on = np.minimum(on, np.maximum(life[:, None] - period_start, 0))  # truncate at the lifetime
    owner, offset = _expand(on.reshape(-1))
    conn, cycle = np.divmod(owner, cycles)
    k = period_start[conn, cycle] + offset
    life = np.maximum(life, 1)
    size = rng.lognormal(np.log(8000.0), 1.2, k.size)
    return life, conn, k, size, 0.3


def _bulk(rng, n):
    life = np.ceil(rng.lognormal(np.log(20.0), 0.8, n)).astype(np.int64)
    rate = rng.lognormal(np.log(1e6), 1.0, n)
    conn, k = _expand(life)
    return life, conn, k, rate[conn], 0.02


def _keepalive(rng, n):
    life = np.ceil(rng.uniform(120.0, 1800.0, n)).astype(np.int64)
    period = rng.integers(10, 61, n)
    pings = life // period + 1
    conn, j = _expand(pings)
    k = j * period[conn]
    ok = k < life[conn]
    return life, conn[ok], k[ok], np.full(int(ok.sum()), 100.0), 0.5


def _chatty(rng, n):
    life = np.ceil(rng.uniform(60.0, 900.0, n)).astype(np.int64)
    mean_gap = rng.uniform(0.3, 5.0, n)
    p_active = 1.0 - np.exp(-1.0 / mean_gap)  # >= 1 message in an interval (Poisson)
    conn, k = _expand(life)
    active = rng.random(k.size) < p_active[conn]
    conn, k = conn[active], k[active]
    size = rng.lognormal(np.log(300.0), 0.7, k.size) / p_active[conn]  # messages per active interval
    return life, conn, k, size, 0.5


def _http_keepalive(rng, n):
    burst = rng.integers(1, 4, n)
    timeout = rng.choice(np.array([15, 30, 45, 60]), n)
    life = burst + timeout
    conn, k = _expand(burst)
    size = rng.lognormal(np.log(50_000.0), 1.5, k.size)
    return life, conn, k, size, 0.05


_MAKERS = {"onoff": _onoff, "bulk": _bulk, "keepalive": _keepalive, "chatty": _chatty,
           "http_keepalive": _http_keepalive}


def generate(n: int = 1000, seed: int = 0, duration_s: float = 600.0, interval_ms: int = 1000,
             mix: dict[str, float] | None = None, vanish_share: float = 0.0,
             name: str | None = None) -> Connections:
    """``n`` connections of the mixed kinds (module docstring), reproducible by ``seed``."""
    mix = dict(DEFAULT_MIX if mix is None else mix)
    unknown = set(mix) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}; known: {KINDS}")
    if not 0.0 <= vanish_share <= 1.0:
        raise ValueError("vanish_share must be in [0, 1]")
    rng = np.random.default_rng(seed)
    kinds = [k for k in KINDS if mix.get(k, 0.0) > 0]
    weights = np.array([mix[k] for k in kinds], np.float64)
    counts = rng.multinomial(n, weights / weights.sum()) if kinds else np.zeros(0, np.int64)
    per_interval = max(1, round(duration_s * 1000.0 / interval_ms))
    starts, lives, klass, ids = [], [], [], []
    ev_c, ev_k, ev_in, ev_out = [], [], [], []
    base = 0
    for ci, (kind, count) in enumerate(zip(kinds, counts.tolist())):
        if count == 0:
            continue
        life, conn, k, size, in_share = _MAKERS[kind](rng, count)
        start = rng.integers(0, per_interval, count)
        total = np.maximum(np.rint(size), 1).astype(np.int64)
        bytes_in = np.rint(total * in_share).astype(np.int64)
        starts.append(start)
        lives.append(life)
        klass.append(np.full(count, ci, np.int32))
        ids.extend(f"{kind}-{base + i}" for i in range(count))
        ev_c.append(conn + base)
        ev_k.append(start[conn] + k)
        ev_in.append(bytes_in)
        ev_out.append(total - bytes_in)
        base += count
    if not starts:
        raise ValueError("no connections to generate")
    start = np.concatenate(starts)
    end = start + np.concatenate(lives) - 1
    end_kind = np.where(rng.random(start.size) < vanish_share, END_VANISH, END_CLOSE).astype(np.uint8)
    return _assemble(name or f"synthetic-n{n}-s{seed}", interval_ms, start, end, end_kind,
                     np.concatenate(klass), kinds, ids, np.concatenate(ev_c), np.concatenate(ev_k),
                     np.concatenate(ev_in), np.concatenate(ev_out),
                     {"generator": "spoa.tools.backtest.synthetic", "seed": seed, "mix": mix,
                      "vanish_share": vanish_share})


def from_series(series, interval_ms: int = 1000, starts=None, end_kinds=None, classes=None,
                name: str = "series") -> Connections:
    """Connections from explicit per-interval byte counts.

    ``series[i]`` is connection i's bytes (in + out, split half/half) in each
    interval of its life; ``starts[i]`` its first interval (default 0),
    ``end_kinds[i]`` END_* (default END_CLOSE), ``classes[i]`` a class name.
    """
    n = len(series)
    starts = np.zeros(n, np.int64) if starts is None else np.asarray(starts, np.int64)
    end_kinds = np.full(n, END_CLOSE, np.uint8) if end_kinds is None else np.asarray(end_kinds, np.uint8)
    names = ["fe"] * n if classes is None else [str(c) for c in classes]
    class_list = sorted(set(names))
    klass = np.array([class_list.index(c) for c in names], np.int32)
    lives = np.array([len(s) for s in series], np.int64)
    if (lives < 1).any():
        raise ValueError("every series needs at least one interval")
    ev_c, ev_k, ev_in, ev_out = [], [], [], []
    for i, s in enumerate(series):
        y = np.rint(np.asarray(s, np.float64)).astype(np.int64)
        nz = np.flatnonzero(y > 0)
        ev_c.append(np.full(nz.size, i, np.int64))
        ev_k.append(starts[i] + nz)
        ev_in.append(y[nz] // 2)
        ev_out.append(y[nz] - y[nz] // 2)
    return _assemble(name, interval_ms, starts, starts + lives - 1, end_kinds, klass, class_list,
                     [f"c{i}" for i in range(n)], np.concatenate(ev_c), np.concatenate(ev_k),
                     np.concatenate(ev_in), np.concatenate(ev_out), {"generator": "from_series"})


def _assemble(name, interval_ms, start, end, end_kind, klass, classes, ids, ev_c, ev_k, ev_in, ev_out,
              info) -> Connections:
    order = np.lexsort((np.arange(start.size), start))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    ev_c = rank[ev_c]
    ev_order = np.lexsort((ev_c, ev_k))
    ev_bytes = np.stack([ev_in, ev_out], axis=1)[ev_order].astype(np.int64)
    ev_packets = -(-ev_bytes // MSS)  # ceil: data segments
    return Connections(name=name, interval_ms=int(interval_ms), origin=0.0, start=start[order].astype(np.int64),
                       end=end[order].astype(np.int64), end_kind=np.asarray(end_kind, np.uint8)[order],
                       klass=np.asarray(klass, np.int32)[order], classes=list(classes),
                       ids=[ids[i] for i in order.tolist()], ev_k=ev_k[ev_order].astype(np.int64),
                       ev_conn=ev_c[ev_order].astype(np.int64), ev_bytes=ev_bytes, ev_packets=ev_packets,
                       info=info)
