"""Next-interval forecasters, vectorized over many series at once.

The LB node predicts, for every tracked connection (or segment), the volume of
the next publishing interval. There can be a million such series, so each
forecaster keeps its state in flat numpy arrays with one *slot* per series and
updates all listed slots with a handful of whole-array operations: O(1) work
per series per interval (O(p+q) for ARIMA), no Python loop over series.

    f = SES(capacity=1024, alpha=0.3)
    f.reset(new_slots)                  # new connections start fresh
    f.update(slots, bytes_this_interval)  # one observation per listed slot
    pred = f.forecast(slots)            # >= 0; NaN only from ARIMA's fallback

Common rules (all forecasters):

* ``slots`` is an integer array of distinct slot numbers in ``[0, capacity)``
  (a repeated slot within one call is undefined: the last write wins). ``None``
  means every slot, which skips the gather/scatter of fancy indexing.
* ``update`` ignores non-finite observations (NaN, inf): that slot's state is
  left as it was, as if the interval had not been reported.
* ``forecast`` returns ``max(model forecast, 0)``: volumes cannot be negative,
  and damped trends or AR terms can undershoot after a burst. A series that has
  not been observed yet forecasts ``cold_value`` (default 0.0);
  ``observations(slots)`` tells the caller how many observations each slot has
  had, so it can treat cold series differently (a class prior, the standard
  lease).
* ``resize`` keeps the state of the slots that survive; new slots start fresh.
* Initialisation: unless a known initial state is passed (``initial_level``
  ...), the first observation seeds the state, which is what statsmodels
  computes with ``initialization_method="known"`` and ``initial_level=y[0]``
  (and ``initial_trend=0``). tests/lbnode/test_forecast.py checks each recursion
  against statsmodels or a textbook reference.

Forecasters: ``Naive`` (the last observation: the baseline every other one
must beat), ``SES`` (simple exponential smoothing), ``DampedHolt`` (additive
damped trend), ``Croston`` (classic or SBA), ``TSB`` (Teunter-Syntetos-Babai),
``ARIMA`` (parameters fitted with statsmodels off the hot path, fixed-parameter
recursion on it). ``History`` is a bounded per-slot ring of recent
observations, for refits and quantiles.

Real traces (shared/data/traces/SOURCES.md): 93-99 % of a long connection's 1 s
intervals are empty and the lag-1 autocorrelation of bytes per interval is
about 0. On such series ARIMA has little to find (its forecast is close to the
mean) and intermittent-demand methods (Croston/SBA, TSB) describe the shape
better; ARIMA is here because the specification names it.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = [
    "ARIMA",
    "FORECASTERS",
    "SES",
    "Naive",
    "TSB",
    "Croston",
    "DampedHolt",
    "Forecaster",
    "History",
    "arma_gains",
    "make_forecaster",
]

_F64 = np.float64


@runtime_checkable
class Forecaster(Protocol):
    name: str
    capacity: int

    def resize(self, capacity: int) -> None: ...

    def reset(self, slots: np.ndarray) -> None: ...

    def update(self, slots: np.ndarray, y: np.ndarray) -> None: ...

    def forecast(self, slots: np.ndarray) -> np.ndarray: ...


def _index(slots):
    """Indexer for the state arrays: a slice for 'all', else an intp array."""
    if slots is None:
        return slice(None)
    return np.asarray(slots, dtype=np.intp)


def _clean(idx, y, capacity: int):
    """Drop non-finite observations. Returns (idx, y) with y as float64."""
    y = np.asarray(y, dtype=_F64)
    ok = np.isfinite(y)
    if ok.all():
        return idx, y
    if isinstance(idx, slice):
        idx = np.arange(capacity, dtype=np.intp)
    return idx[ok], y[ok]


def _check_unit(name: str, value: float, *, closed_low: bool = False) -> float:
    value = float(value)
    low_ok = value >= 0.0 if closed_low else value > 0.0
    if not (low_ok and value <= 1.0):
        raise ValueError(f"{name} must be in {'[' if closed_low else '('}0, 1], got {value!r}")
    return value


class _Vectorized:
    """Shared slot bookkeeping: per-slot 1-D (or 2-D) state arrays.

    Subclasses list their state in ``_spec()`` as (attribute, dtype, fresh
    value, trailing shape); ``resize`` and ``reset`` are derived from it.
    """

    name = "base"
    cold_value: float = 0.0

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = 0
        for attr, dtype, _fresh, tail in self._spec():
            setattr(self, attr, np.empty((0, *tail), dtype=dtype))
        self.resize(capacity)

    def _spec(self) -> list[tuple[str, type, float, tuple[int, ...]]]:
        raise NotImplementedError

    def resize(self, capacity: int) -> None:
        capacity = int(capacity)
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        keep = min(capacity, self.capacity)
        for attr, dtype, fresh, tail in self._spec():
            old = getattr(self, attr)
            new = np.full((capacity, *tail), fresh, dtype=dtype)
            new[:keep] = old[:keep]
            setattr(self, attr, new)
        self.capacity = capacity

    def reset(self, slots) -> None:
        idx = _index(slots)
        for attr, _dtype, fresh, _tail in self._spec():
            getattr(self, attr)[idx] = fresh

    def observations(self, slots) -> np.ndarray:
        """How many (finite) observations each slot has had since its reset."""
        return self.nobs[_index(slots)].copy()


# ------------------------------------------------------------------------- Naive


class Naive(_Vectorized):
    """The last observation is the forecast (random-walk forecast, MASE's scale).

    The baseline of every backtest table: a forecaster that does not beat it
    on the lease frontier does not earn its cost.
    """

    name = "naive"

    def __init__(self, capacity: int, cold_value: float = 0.0) -> None:
        self.cold_value = float(cold_value)
        super().__init__(capacity)

    def _spec(self):
        return [("last", _F64, self.cold_value, ()), ("nobs", np.int64, 0, ())]

    def update(self, slots, y) -> None:
        idx, y = _clean(_index(slots), y, self.capacity)
        self.last[idx] = y
        self.nobs[idx] += 1

    def forecast(self, slots) -> np.ndarray:
        out = self.last[_index(slots)]
        return np.maximum(out, 0.0)


# --------------------------------------------------------------------------- SES


class SES(_Vectorized):
    """Simple exponential smoothing: ``l = l + alpha * (y - l)``, forecast ``l``.

    ``initial_level=None`` seeds the level with the first observation;
    a number is a known initial level (statsmodels ``initialization_method="known"``).
    """

    name = "ses"

    def __init__(self, capacity: int, alpha: float = 0.3, initial_level: float | None = None,
                 cold_value: float = 0.0) -> None:
        self.alpha = _check_unit("alpha", alpha)
        self.initial_level = None if initial_level is None else float(initial_level)
        self.cold_value = float(cold_value)
        super().__init__(capacity)

    def _spec(self):
        start = self.cold_value if self.initial_level is None else self.initial_level
        return [("level", _F64, start, ()), ("nobs", np.int64, 0, ())]

    def update(self, slots, y) -> None:
        idx, y = _clean(_index(slots), y, self.capacity)
        level = self.level[idx]
        new = level + self.alpha * (y - level)
        n = self.nobs[idx]
        if self.initial_level is None:
            new = np.where(n == 0, y, new)
        self.level[idx] = new
        self.nobs[idx] = n + 1

    def forecast(self, slots) -> np.ndarray:
        idx = _index(slots)
        if isinstance(idx, slice):
            return np.maximum(self.level, 0.0)
        out = self.level[idx]  # fancy indexing: already a copy, clip in place
        return np.maximum(out, 0.0, out=out)


# -------------------------------------------------------------------- Damped Holt


class DampedHolt(_Vectorized):
    """Holt's linear method with additive damped trend (Gardner & McKenzie).

        l_t = alpha * y_t + (1 - alpha) * (l_{t-1} + phi * b_{t-1})
        b_t = beta * (l_t - l_{t-1}) + (1 - beta) * phi * b_{t-1}
        forecast = l_t + phi * b_t

    ``beta`` is statsmodels' ``smoothing_trend`` and ``phi`` its
    ``damping_trend``. ``initial_level=None`` seeds the level with the first
    observation and the trend with ``initial_trend`` (default 0).
    """

    name = "damped_holt"

    def __init__(self, capacity: int, alpha: float = 0.3, beta: float = 0.1, phi: float = 0.9,
                 initial_level: float | None = None, initial_trend: float = 0.0,
                 cold_value: float = 0.0) -> None:
        self.alpha = _check_unit("alpha", alpha)
        self.beta = _check_unit("beta", beta, closed_low=True)
        self.phi = _check_unit("phi", phi, closed_low=True)
        self.initial_level = None if initial_level is None else float(initial_level)
        self.initial_trend = float(initial_trend)
        self.cold_value = float(cold_value)
        super().__init__(capacity)

    def _spec(self):
        seeded = self.initial_level is None
        return [("level", _F64, self.cold_value if seeded else self.initial_level, ()),
                ("trend", _F64, 0.0 if seeded else self.initial_trend, ()),
                ("nobs", np.int64, 0, ())]

    def update(self, slots, y) -> None:
        idx, y = _clean(_index(slots), y, self.capacity)
        a, b, phi = self.alpha, self.beta, self.phi
        level = self.level[idx]
        damped = phi * self.trend[idx]
        new_level = a * y + (1.0 - a) * (level + damped)
        new_trend = b * (new_level - level) + (1.0 - b) * damped
        n = self.nobs[idx]
        if self.initial_level is None:
            first = n == 0
            new_level = np.where(first, y, new_level)
            new_trend = np.where(first, self.initial_trend, new_trend)
        self.level[idx] = new_level
        self.trend[idx] = new_trend
        self.nobs[idx] = n + 1

    def forecast(self, slots) -> np.ndarray:
        idx = _index(slots)
        out = self.level[idx] + self.phi * self.trend[idx]
        return np.maximum(out, 0.0, out=out)


# ------------------------------------------------------------------------ Croston


class Croston(_Vectorized):
    """Croston's method for intermittent series, classic or SBA.

    Per slot: ``z`` smoothed non-zero size, ``p`` smoothed interval between
    non-zero observations (in intervals), ``q`` intervals since the last
    non-zero one. Every interval ``q += 1``; on a non-zero ``y``:
    ``z += alpha * (y - z)``, ``p += alpha_interval * (q - p)``, ``q = 0``;
    the first non-zero observation seeds ``z = y``, ``p = q`` (intervals since
    the series started, counting this one). Forecast: ``z / p`` (classic), or
    ``(1 - alpha_interval / 2) * z / p`` (SBA, Syntetos & Boylan 2005: removes
    classic Croston's upward bias). Zero until the first non-zero observation.
    Work on zero intervals is one counter increment; the size/interval update
    runs only for the (few) slots with traffic.
    """

    def __init__(self, capacity: int, alpha: float = 0.1, variant: str = "sba",
                 alpha_interval: float | None = None, cold_value: float = 0.0) -> None:
        if variant not in ("sba", "classic"):
            raise ValueError(f"variant must be 'sba' or 'classic', got {variant!r}")
        self.alpha = _check_unit("alpha", alpha)
        self.alpha_interval = self.alpha if alpha_interval is None else _check_unit(
            "alpha_interval", alpha_interval)
        self.variant = variant
        self.name = f"croston_{variant}"
        self.factor = 1.0 - self.alpha_interval / 2.0 if variant == "sba" else 1.0
        self.cold_value = float(cold_value)
        super().__init__(capacity)

    def _spec(self):
        return [("size", _F64, 0.0, ()), ("interval", _F64, 0.0, ()),
                ("since", _F64, 0.0, ()), ("nobs", np.int64, 0, ())]

    def update(self, slots, y) -> None:
        idx, y = _clean(_index(slots), y, self.capacity)
        since = self.since[idx] + 1.0
        self.nobs[idx] += 1
        demand = y > 0.0
        if demand.any():
            if isinstance(idx, slice):
                d_idx = np.flatnonzero(demand)
            else:
                d_idx = idx[demand]
            dy = y[demand]
            dq = since[demand]
            z = self.size[d_idx]
            p = self.interval[d_idx]
            first = p == 0.0
            self.size[d_idx] = np.where(first, dy, z + self.alpha * (dy - z))
            self.interval[d_idx] = np.where(first, dq, p + self.alpha_interval * (dq - p))
            since[demand] = 0.0
        self.since[idx] = since

    def forecast(self, slots) -> np.ndarray:
        idx = _index(slots)
        p = self.interval[idx]
        out = np.full(p.shape, self.cold_value, dtype=_F64)
        z = self.size[idx] * self.factor  # a new array even when idx is a slice
        np.divide(z, p, out=out, where=p > 0.0)
        return np.maximum(out, 0.0, out=out)


# ---------------------------------------------------------------------------- TSB


class TSB(_Vectorized):
    """Teunter-Syntetos-Babai (2011): demand probability updated every interval.

        every interval: prob += beta * (1{y > 0} - prob)
        on y > 0:       size += alpha * (y - size)
        forecast = prob * size

    The first observation seeds ``prob = 1{y0 > 0}``; the first non-zero
    observation seeds ``size = y``. During silence ``prob`` decays by
    ``(1 - beta)`` per interval, so an idle connection's forecast falls towards
    0 (Croston's stays at its last rate).
    """

    name = "tsb"

    def __init__(self, capacity: int, alpha: float = 0.1, beta: float = 0.1,
                 cold_value: float = 0.0) -> None:
        self.alpha = _check_unit("alpha", alpha)
        self.beta = _check_unit("beta", beta)
        self.cold_value = float(cold_value)
        super().__init__(capacity)

    def _spec(self):
        return [("size", _F64, 0.0, ()), ("prob", _F64, 0.0, ()),
                ("seen", np.bool_, False, ()), ("nobs", np.int64, 0, ())]

    def update(self, slots, y) -> None:
        idx, y = _clean(_index(slots), y, self.capacity)
        demand = y > 0.0
        n = self.nobs[idx]
        prob = self.prob[idx]
        new_prob = prob + self.beta * (demand - prob)
        self.prob[idx] = np.where(n == 0, demand.astype(_F64), new_prob)
        self.nobs[idx] = n + 1
        if demand.any():
            d_idx = np.flatnonzero(demand) if isinstance(idx, slice) else idx[demand]
            dy = y[demand]
            z = self.size[d_idx]
            self.size[d_idx] = np.where(self.seen[d_idx], z + self.alpha * (dy - z), dy)
            self.seen[d_idx] = True

    def forecast(self, slots) -> np.ndarray:
        idx = _index(slots)
        out = self.prob[idx] * self.size[idx]
        if self.cold_value != 0.0:
            out = np.where(self.nobs[idx] == 0, self.cold_value, out)
        return np.maximum(out, 0.0, out=out)


# -------------------------------------------------------------------------- ARIMA


@dataclass(frozen=True)
class _ArimaParams:
    """One parameter set per traffic class. Swapped as a whole (atomically)."""

    ar: np.ndarray    # (classes, p) statsmodels' arparams (phi: w_t = phi_1 w_{t-1} + ...)
    ma: np.ndarray    # (classes, q) statsmodels' maparams (theta: ... + e_t + theta_1 e_{t-1})
    mu: np.ndarray    # (classes,) mean of the differenced series (statsmodels 'const' when d == 0)
    ok: np.ndarray    # (classes,) bool: a usable parameter set exists
    phi: np.ndarray   # (classes, m) phi padded to the state size m = max(p, q + 1)
    gain: np.ndarray  # (classes, H, m) Kalman gain after t observations of w (t >= H: row H-1)


def _stationary(coefs: np.ndarray, sign: float) -> bool:
    """Roots of z^k - sign*(c1 z^{k-1} + ... + ck) all strictly inside the unit circle.

    sign=+1 checks AR stationarity (phi), sign=-1 MA invertibility (theta).
    """
    coefs = np.asarray(coefs, dtype=_F64)
    if coefs.size == 0:
        return True
    if not np.all(np.isfinite(coefs)):
        return False
    roots = np.roots(np.r_[1.0, -sign * coefs])
    return bool(np.all(np.abs(roots) < 1.0 - 1e-9))


def _single_threaded_blas():
    """Limit BLAS to one thread while fitting, when threadpoolctl is installed.

    statsmodels' fits call small BLAS/LAPACK routines thousands of times; with
    OpenBLAS's default threads on a busy 2-CPU machine they spin against the
    hot path and each other: fits measured 20-60 ms single-threaded and
    1-3 s with the default threads under load (same data). Without
    threadpoolctl, set OPENBLAS_NUM_THREADS=1 in the agent's environment.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def arma_gains(ar, ma, max_horizon: int = 4096, tol: float = 1e-13) -> tuple[np.ndarray, np.ndarray]:
    """Kalman gains of a stationary ARMA(p, q) in Harvey's state-space form.

    State (size m = max(p, q + 1)): ``alpha_{t+1} = T alpha_t + R e_{t+1}``,
    ``w_t = alpha_t[0]`` with T the companion matrix (phi in the first column,
    ones above the diagonal) and ``R = (1, theta_1, ..., theta_{m-1})``.
    Filter started from the exact stationary distribution (``a = 0``,
    ``P = T P T' + R R'``), as statsmodels does. The gains
    ``K_t = T P_t Z' / F_t`` do not depend on the data or on sigma^2, only on
    (phi, theta) and t, so they are computed once per parameter set; rows stop
    when they have converged (then the last row is the steady-state gain,
    which for an invertible MA is the textbook recursion's phi + theta).
    Returns (phi padded to m, gains (H, m)).
    """
    ar = np.asarray(ar, dtype=_F64).reshape(-1)
    ma = np.asarray(ma, dtype=_F64).reshape(-1)
    m = max(ar.size, ma.size + 1)
    phi = np.zeros(m)
    phi[: ar.size] = ar
    T = np.zeros((m, m))
    T[:, 0] = phi
    T[np.arange(m - 1), np.arange(1, m)] = 1.0
    R = np.zeros(m)
    R[0] = 1.0
    R[1 : ma.size + 1] = ma
    RR = np.outer(R, R)
    P = np.linalg.solve(np.eye(m * m) - np.kron(T, T), RR.reshape(-1)).reshape(m, m)
    P = (P + P.T) / 2.0
    gains = []
    for _t in range(max_horizon):
        F = P[0, 0]
        K = T @ P[:, 0] / F
        gains.append(K)
        if len(gains) > 1 and np.max(np.abs(K - gains[-2])) < tol:
            break
        P = T @ P @ T.T + RR - np.outer(K, K) * F
        P = (P + P.T) / 2.0
    return phi, np.array(gains)


class ARIMA(_Vectorized):
    """ARIMA(p, d, q) with parameters fitted off the hot path, applied vectorized.

    Hot path (``update``/``forecast``): the one-step predictor of the fitted
    model with FIXED parameters, as an exact Kalman filter whose gains were
    precomputed per parameter set (``arma_gains``). Per slot the state is the
    ARMA state vector of the d-times differenced series ``w`` (size
    m = max(p, q + 1)) plus the last value of each difference order below d;
    one interval costs O(m + d) = O(p + q + d) per series:

        v       = (w_t - mu) - a[0]                  innovation
        a[i]   <- phi_{i+1} * a[0] + a[i+1] + K_t[i] * v   (companion T, gain K_t)
        w_hat   = mu + a[0]
        y_hat   = sum_{k<d} Delta^k y_t + w_hat       (undo the differencing)

    The gain K_t depends on how many ``w`` the slot has seen (t), not on the
    data, and converges to the textbook recursion's (phi + theta) gain. Using
    the exact time-varying gains instead of the conditional recursion (errors
    started at 0) matters here: most connections are short, and the
    conditional recursion's start-up error decays only like |theta|^t, e.g.
    never within 300 intervals for the theta ~ -0.99 that IMA(1,1) fits get on
    intermittent traffic. tests/lbnode/test_forecast.py checks the result against
    statsmodels' one-step predictions (``fittedvalues``) for the same
    parameters on the same data, from the first differenced value on.
    Forecasts are NaN (the caller's fallback) while a slot has fewer than
    ``min_obs`` observations (default d + 1) or its class has no parameters.

    Fitting (``refit``) is slow (statsmodels ``ARIMA(...).fit()``, 20-50 ms per
    series here) and runs from a worker thread or executor: the caller passes a
    snapshot of histories (``History.snapshot``), ``refit`` builds a new
    parameter table and swaps it in with one attribute assignment, which the
    hot path reads once per call. ``refit`` never raises: failures are
    reported in its return value and the previous parameters stay in force.
    BLAS is held to one thread during fits if threadpoolctl is installed (see
    ``_single_threaded_blas``: default OpenBLAS threads made fits 20-50x
    slower on the busy 2-CPU machine).

    Parameters are fitted PER TRAFFIC CLASS, not per connection, because:

    * cost: a million per-connection fits at 20-50 ms each is hours of CPU per
      refresh; per class it is ``max_series_per_class`` fits (default 8);
    * data: most connections are short and 93-99 % of a long connection's
      intervals are empty, so one connection rarely has enough informative
      data for a stable maximum-likelihood fit; the dynamics (phi, theta) of
      connections of one class (frontend, port, application) are shared.

    Per class, the longest histories (at least ``min_fit_length`` finite
    values, not constant) are fitted one by one on ``y / scale`` (scale = the
    std of the differenced series; ARIMA is scale-equivariant, the optimizer
    is not) and the parameter vectors are combined by element-wise median; if
    the median is not stationary/invertible, the longest series' fit is used.
    The class mean ``mu`` only suits connections of similar volume, so
    ``local_mean=alpha`` replaces it with an exponentially weighted mean of each
    series' own ``w`` (O(1) per update). Assigning each long-lived series its
    own class (``assign``) gives per-series fitting with the same machinery.
    A slot whose class gets parameters only after it has been observed for a
    while starts from a zero state with the gain of its age: a short transient.

    Slot classes: ``assign(slots, classes)``; ``reset`` puts slots back into
    class 0. ``set_params`` installs known parameters (tests, offline fits).
    """

    def __init__(self, capacity: int, order: tuple[int, int, int] = (1, 0, 0), n_classes: int = 1,
                 min_obs: int | None = None, min_fit_length: int = 30, max_series_per_class: int = 8,
                 local_mean: float | None = None, max_gain_horizon: int = 4096,
                 cold_value: float = float("nan")) -> None:
        p, d, q = (int(v) for v in order)
        if p < 0 or d < 0 or q < 0 or d > 2 or p > 24 or q > 24:
            raise ValueError(f"order must be (0 <= p <= 24, 0 <= d <= 2, 0 <= q <= 24), got {order!r}")
        self.order = (p, d, q)
        self.p, self.d, self.q = p, d, q
        self.m = max(p, q + 1)
        self.name = f"arima_{p}{d}{q}"
        self.n_classes = int(n_classes)
        if self.n_classes < 1:
            raise ValueError("n_classes must be >= 1")
        self.min_obs = d + 1 if min_obs is None else max(int(min_obs), d + 1)
        self.min_fit_length = max(int(min_fit_length), d + p + q + 3)
        self.max_series_per_class = max(1, int(max_series_per_class))
        self.local_mean = None if local_mean is None else _check_unit("local_mean", local_mean)
        self.max_gain_horizon = max(1, int(max_gain_horizon))
        self.cold_value = cold_value
        C, m = self.n_classes, self.m
        self._params = _ArimaParams(ar=np.zeros((C, p)), ma=np.zeros((C, q)), mu=np.zeros(C),
                                    ok=np.zeros(C, dtype=bool), phi=np.zeros((C, m)),
                                    gain=np.zeros((C, 1, m)))
        self._refit_lock = threading.Lock()
        self.last_refit: dict[int, dict] = {}
        super().__init__(capacity)

    def _spec(self):
        # Component-major: one 1-D array per state component and difference
        # order, so the hot path does 1-D gathers (much cheaper than 2-D rows).
        return ([(f"_a{i}", _F64, 0.0, ()) for i in range(self.m)]      # ARMA state of w - mu
                + [(f"_d{k}", _F64, 0.0, ()) for k in range(self.d)]    # Delta^k y_t, k < d
                + [("wmean", _F64, 0.0, ()),                           # local mean of w
                   ("cls", np.int32, 0, ()),
                   ("nobs", np.int64, 0, ())])

    # -- parameters -------------------------------------------------------

    @property
    def params(self) -> _ArimaParams:
        return self._params

    def assign(self, slots, classes) -> None:
        classes = np.asarray(classes, dtype=np.int32)
        if classes.size and (classes.min() < 0 or classes.max() >= self.n_classes):
            raise ValueError(f"class ids must be in [0, {self.n_classes})")
        self.cls[_index(slots)] = classes

    def set_params(self, cls: int, ar=(), ma=(), const: float = 0.0) -> None:
        """Install a known parameter set for class ``cls`` (statsmodels conventions)."""
        ar = np.asarray(ar, dtype=_F64).reshape(-1)
        ma = np.asarray(ma, dtype=_F64).reshape(-1)
        if ar.size != self.p or ma.size != self.q:
            raise ValueError(f"need {self.p} AR and {self.q} MA coefficients")
        if not (_stationary(ar, 1.0) and _stationary(ma, -1.0) and math.isfinite(const)):
            raise ValueError("parameters are not stationary/invertible/finite")
        if not 0 <= int(cls) < self.n_classes:
            raise ValueError(f"class must be in [0, {self.n_classes})")
        self._install({int(cls): (ar, ma, float(const))})

    def _install(self, new: dict[int, tuple[np.ndarray, np.ndarray, float]]) -> None:
        old = self._params
        ar, ma, mu, ok, phi = old.ar.copy(), old.ma.copy(), old.mu.copy(), old.ok.copy(), old.phi.copy()
        gains = {c: old.gain[c] for c in range(self.n_classes)}
        for c, (a, m, k) in new.items():
            ar[c], ma[c], mu[c], ok[c] = a, m, k, True
            phi[c], gains[c] = arma_gains(a, m, self.max_gain_horizon)
        horizon = max(g.shape[0] for g in gains.values())
        gain = np.empty((self.n_classes, horizon, self.m))
        for c, g in gains.items():  # pad with the converged (last) row
            gain[c, : g.shape[0]] = g
            gain[c, g.shape[0]:] = g[-1]
        self._params = _ArimaParams(ar=ar, ma=ma, mu=mu, ok=ok, phi=phi, gain=gain)  # atomic swap

    def refit(self, histories: dict[int, np.ndarray], classes: dict[int, int] | None = None) -> dict[int, dict]:
        """Fit parameters per class from ``{slot: history}``; never raises.

        ``classes`` overrides the slot -> class map (default: the current
        ``assign``-ed classes). Returns ``{class: report}`` where report has
        ``status`` ('fitted'; 'kept' = no usable series, the previous
        parameters stay; 'failed' = every fit failed, previous parameters
        stay) and, when fitted, ``n_fitted`` and the parameters.
        """
        try:
            with self._refit_lock, _single_threaded_blas():
                report = self._refit(histories, classes)
        except Exception as exc:  # noqa: BLE001 - must never reach the hot path
            report = {-1: {"status": "failed", "errors": [repr(exc)]}}
        self.last_refit = report
        return report

    def _refit(self, histories, classes) -> dict[int, dict]:
        cls_now = self.cls
        groups: dict[int, list[np.ndarray]] = {}
        for slot, hist in histories.items():
            try:
                slot = int(slot)
                h = np.asarray(hist, dtype=_F64).reshape(-1)
            except (TypeError, ValueError):
                continue
            if classes is not None:
                c = int(classes.get(slot, 0))
            elif 0 <= slot < len(cls_now):
                c = int(cls_now[slot])
            else:
                continue
            if not 0 <= c < self.n_classes:
                continue
            h = h[np.isfinite(h)]
            if h.size >= self.min_fit_length:
                groups.setdefault(c, []).append(h)
        report: dict[int, dict] = {}
        new: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
        for c in range(self.n_classes):
            series = sorted(groups.get(c, []), key=len, reverse=True)
            fits, errors = [], []
            for h in series:
                if len(fits) >= self.max_series_per_class:
                    break
                try:
                    fit = self._fit_one(h)
                except Exception as exc:  # noqa: BLE001
                    fit, err = None, repr(exc)
                else:
                    err = "constant series, or fit not stationary/invertible/finite"
                if fit is None:
                    errors.append(err)
                else:
                    fits.append(fit)
            if not fits:
                report[c] = {"status": "failed" if errors else "kept", "n_series": len(series),
                             "errors": errors[:3]}
                continue
            ar = np.median(np.array([f[0] for f in fits]).reshape(len(fits), self.p), axis=0)
            ma = np.median(np.array([f[1] for f in fits]).reshape(len(fits), self.q), axis=0)
            mu = float(np.median([f[2] for f in fits]))
            if not (_stationary(ar, 1.0) and _stationary(ma, -1.0)):
                ar, ma, mu = fits[0]
            new[c] = (ar, ma, mu)
            report[c] = {"status": "fitted", "n_series": len(series), "n_fitted": len(fits),
                         "ar": ar.tolist(), "ma": ma.tolist(), "mu": mu}
        if new:
            self._install(new)
        return report

    def _fit_one(self, h: np.ndarray):
        """statsmodels fit of one series; None when unusable. May raise."""
        from statsmodels.tsa.arima.model import ARIMA as _SmARIMA  # lazy: heavy import

        w = np.diff(h, n=self.d) if self.d else h
        scale = float(np.std(w))
        if not math.isfinite(scale) or scale <= 0.0:
            return None
        trend = "c" if self.d == 0 else "n"
        res = _SmARIMA(h / scale, order=self.order, trend=trend).fit()
        ar = np.asarray(res.arparams, dtype=_F64).reshape(-1)
        ma = np.asarray(res.maparams, dtype=_F64).reshape(-1)
        mu = float(res.params[0]) * scale if self.d == 0 else 0.0
        if not (math.isfinite(mu) and _stationary(ar, 1.0) and _stationary(ma, -1.0)):
            return None
        return ar, ma, mu

    # -- hot path -----------------------------------------------------------

    def _class_terms(self, params: _ArimaParams, idx):
        """(class ids or None, mu) for the slots; one class -> scalars, no gathers."""
        if self.n_classes == 1:
            c = None
            mu = params.mu[0]
        else:
            c = self.cls[idx]
            mu = params.mu[c]
        if self.local_mean is not None:
            mu = self.wmean[idx]
        return c, mu

    def update(self, slots, y) -> None:
        idx, y = _clean(_index(slots), y, self.capacity)
        if isinstance(idx, slice):
            idx = np.arange(self.capacity, dtype=np.intp)
        params = self._params
        n = self.nobs[idx]
        self.nobs[idx] = n + 1
        # Differences: Delta^{k+1} y_t = Delta^k y_t - Delta^k y_{t-1}.
        w = y
        if self.d:
            for k in range(self.d):
                arr = getattr(self, f"_d{k}")
                prev = arr[idx]
                arr[idx] = w
                w = w - prev
            has_w = n >= self.d  # w = Delta^d y_t needs d earlier values
            if not has_w.all():
                idx, w, n = idx[has_w], w[has_w], n[has_w]
        if self.local_mean is not None:
            first = n == self.d
            m = self.wmean[idx]
            mu = np.where(first, w, m)  # the first w seeds the local mean
            self.wmean[idx] = np.where(first, w, m + self.local_mean * (w - m))
            c = None if self.n_classes == 1 else self.cls[idx]
        else:
            c, mu = self._class_terms(params, idx)
        horizon = params.gain.shape[1]
        t = n - self.d  # w's seen before this one
        steady = horizon == 1 or (t.size and int(t.min()) >= horizon - 1)
        if not steady:
            np.minimum(t, horizon - 1, out=t)
        a0 = self._a0[idx]
        v = w - mu
        v -= a0
        # a[i] <- phi_{i+1} * a[0] + a[i+1] + K_t[i] * v   (T companion, K_t gain)
        for i in range(self.m):
            if c is None:
                phi_i = params.phi[0, i]
                k_i = params.gain[0, -1, i] if steady else params.gain[0, :, i][t]
            else:
                phi_i = params.phi[:, i][c]
                k_i = params.gain[:, -1, i][c] if steady else params.gain[:, :, i][c, t]
            new = k_i * v
            new += phi_i * a0
            if i + 1 < self.m:
                new += getattr(self, f"_a{i + 1}")[idx]
            getattr(self, f"_a{i}")[idx] = new

    def forecast(self, slots) -> np.ndarray:
        idx = _index(slots)
        params = self._params
        c, mu = self._class_terms(params, idx)
        y_hat = self._a0[idx] + mu
        for k in range(self.d):
            y_hat += getattr(self, f"_d{k}")[idx]
        ok = self.nobs[idx] >= self.min_obs
        if c is None:
            if not params.ok[0]:
                return np.full(y_hat.shape, self.cold_value)
        else:
            ok &= params.ok[c]
        np.maximum(y_hat, 0.0, out=y_hat)
        if ok.all():
            return y_hat
        return np.where(ok, y_hat, self.cold_value)


# ------------------------------------------------------------------------ History


class History:
    """Bounded ring of the last ``length`` observations per slot (numpy 2-D).

    ``push`` is O(1) per slot (one column write); unfilled cells hold NaN.
    ``snapshot`` copies histories (chronological) for a refit in a worker
    thread; ``quantile`` computes a per-slot quantile over what is stored.
    """

    def __init__(self, capacity: int, length: int, dtype=np.float64) -> None:
        if length < 1:
            raise ValueError("length must be >= 1")
        if not np.issubdtype(np.dtype(dtype), np.floating):
            raise ValueError("History needs a floating dtype (NaN marks empty cells)")
        self.length = int(length)
        self.dtype = np.dtype(dtype)
        self.capacity = 0
        self.buf = np.empty((0, self.length), dtype=self.dtype)
        self.pos = np.empty(0, dtype=np.int32)    # next cell to write
        self.count = np.empty(0, dtype=np.int32)  # filled cells (<= length)
        self.resize(capacity)

    def resize(self, capacity: int) -> None:
        capacity = int(capacity)
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        keep = min(capacity, self.capacity)
        buf = np.full((capacity, self.length), np.nan, dtype=self.dtype)
        buf[:keep] = self.buf[:keep]
        pos = np.zeros(capacity, dtype=np.int32)
        pos[:keep] = self.pos[:keep]
        count = np.zeros(capacity, dtype=np.int32)
        count[:keep] = self.count[:keep]
        self.buf, self.pos, self.count, self.capacity = buf, pos, count, capacity

    def reset(self, slots) -> None:
        idx = _index(slots)
        self.buf[idx] = np.nan
        self.pos[idx] = 0
        self.count[idx] = 0

    def push(self, slots, y) -> None:
        idx = _index(slots)
        if isinstance(idx, slice):
            idx = np.arange(self.capacity, dtype=np.intp)
        pos = self.pos[idx]
        self.buf[idx, pos] = y
        pos += 1
        pos[pos == self.length] = 0
        self.pos[idx] = pos
        count = self.count[idx]
        self.count[idx] = np.minimum(count + 1, self.length)

    def series(self, slot: int) -> np.ndarray:
        """The stored observations of one slot, oldest first (a copy)."""
        n, pos = int(self.count[slot]), int(self.pos[slot])
        row = self.buf[slot]
        if n < self.length:
            return row[:n].copy()
        return np.concatenate([row[pos:], row[:pos]])

    def snapshot(self, slots=None, min_len: int = 1) -> dict[int, np.ndarray]:
        """``{slot: series}`` for slots with at least ``min_len`` stored values."""
        cand = np.arange(self.capacity) if slots is None else np.asarray(slots, dtype=np.intp)
        cand = cand[self.count[cand] >= min_len]
        return {int(s): self.series(int(s)) for s in cand}

    def quantile(self, slots, q: float) -> np.ndarray:
        """Per-slot quantile (linear interpolation) of the stored values; NaN if empty."""
        idx = _index(slots)
        rows = np.sort(self.buf[idx], axis=1)  # NaN (empty cells) sort last
        n = self.count[idx].astype(np.float64)
        pos = np.maximum(n - 1.0, 0.0) * float(q)
        lo = np.floor(pos).astype(np.intp)
        hi = np.minimum(lo + 1, np.maximum(n.astype(np.intp) - 1, 0))
        frac = pos - lo
        vlo = np.take_along_axis(rows, lo[:, None], axis=1)[:, 0].astype(np.float64)
        vhi = np.take_along_axis(rows, hi[:, None], axis=1)[:, 0].astype(np.float64)
        out = vlo + frac * (vhi - vlo)
        out[n == 0] = np.nan
        return out


# ------------------------------------------------------------------------ registry

FORECASTERS = {
    "naive": Naive,
    "ses": SES,
    "damped_holt": DampedHolt,
    "croston": Croston,
    "tsb": TSB,
    "arima": ARIMA,
}


def make_forecaster(name: str, capacity: int, **params) -> _Vectorized:
    """Build a forecaster by name (``naive``, ``ses``, ``damped_holt``, ``croston``, ``tsb``, ``arima``)."""
    try:
        cls = FORECASTERS[name]
    except KeyError:
        raise ValueError(f"unknown forecaster {name!r}; known: {sorted(FORECASTERS)}") from None
    return cls(capacity, **params)
