"""Lease policies: from per-connection predictions to lease durations (ms).

Two policies, both vectorized over slots (one per tracked connection or
segment), both returning ``(lease_ms: int64, source: uint8)`` where ``source``
is a ``spoa.wire.records.LeaseSource`` value: PREDICTED (1) or FALLBACK (2, the
standard lease because no usable prediction exists).

``VolumePolicy`` is the specification's formula (spec §2, pseudocode
``predictLeaseDuration``)::

    lease_ms = clamp(predicted_volume_bytes / resource_utilization_threshold, MIN, MAX)

with the threshold in bytes per ms of lease. Out-of-bounds handling, decided
here: the pseudocode clamps, and the spec's "if prediction fails or lease
request is out of bounds, revert to the standard lease" is read as

* prediction failed = NaN, +-inf or negative volume -> FALLBACK, standard lease;
* a finite, non-negative volume whose raw lease is outside [MIN, MAX] is
  clamped (PREDICTED), as the pseudocode does. "Out of bounds" then applies to
  the server module's own check of a *requested* lease against its bounds,
  which after this clamp only fires when the two sides' bounds differ.
  ``out_of_bounds="fallback"`` gives the other reading (raw value outside
  [MIN, MAX] -> FALLBACK, standard) for comparison.

Why the volume formula gives idle-but-alive connections the SHORTEST lease:
the lease is proportional to predicted volume. An idle keep-alive connection
(a burst, then silence until the keep-alive timeout; on the real traces 93-99 %
of a long connection's 1 s intervals are empty, and e.g. netflix idles
30-32 s, espn ~45 s, tls2 ~58-60 s before FIN) has a next-interval volume
forecast at or near 0 (TSB's demand probability decays, SES decays towards
0, SBA's rate is tiny), so ``volume / threshold`` is ~0 ms and the clamp gives
MIN. Yet such a connection is alive, and its next packet may come tens of
seconds later, after a MIN lease has expired: the LB node drops the state of
a live connection (an NLB-style balancer then answers the next packet with a
RST). Meanwhile a bulk transfer, which proves it is alive every interval, gets
MAX. Volume also carries little information about the *next* interval on
real traffic (lag-1 autocorrelation ~0). The lease answers "how long may this
state go unrefreshed before we may assume the connection is gone", which is a
question about time, not bytes.

``ActivityPolicy`` answers that question: it predicts per slot the next
silence between intervals with traffic (a connection that talked every 20 s
will most likely talk again within 20 s) and leases::

    lease_ms = clamp(predicted_silence * safety + interval_ms, MIN, MAX)

(the prediction: a forecaster over the slot's silences, or their quantile;
see below).

This follows the adaptive flow-timeout literature (MBET's persistency of
inter-arrival times; PGAT's per-class conditional gap distribution, whose
"flow intact ratio" is the premature-expiry rate to score this by).

Estimator: each slot keeps a ring (``History``) of its last ``window`` silences
(gaps longer than 1.5 intervals, i.e. with at least one empty interval in
between). Back-to-back active intervals are not stored: a 30 s burst would
otherwise flush the ring of the keep-alive gaps that matter; they only make a
slot warm (gap quantile = the gap, about one interval) until its first
silence; so does a slot's first active interval (it is refreshed every
interval while its traffic lasts: the floor covers it). The quantile is recomputed only for the slots whose silence just
ended (rare events), so ``observe`` is O(1) per slot and interval and
``leases`` is a gather. With a window of 8 and q = 0.99 the quantile is
close to the maximum of the recent silences; ``safety`` covers the rest.
Cold slots (never active yet) take the class prior passed to ``leases``
(PREDICTED) or the standard lease (FALLBACK).

Under the server node's cadence a quiet connection is republished every
max(interval, lease x refresh_fraction), at most every hint TTL, so a lease
lapses early only when refreshes are lost: ``MIN`` (``lease.min_ms``) is what
buys tolerance to loss, and what a connection that ends silently right after
its traffic costs in stale state (the backtest's frontier, benchmarks/RESULTS.md).

Both policies also take, optionally, an ``EndBound``: the lease of an idle
connection ends soon after the idle time at which connections of its class
have historically closed (HTTP keep-alive connections close at their server's
keep-alive timeout: netflix 30-32 s, espn ~45 s, tls2 ~58-60 s on the real
traces). A live connection is refreshed by its quiet records long before
that, so the bound costs it nothing; a connection whose end is never
announced (its server node crashed, its final record was lost) is dropped a
margin after its class would have closed it, instead of a whole lease later.
A connection idle for longer than its class's bound has outlived it and gets
the policy's lease again.

The activity policy's next-silence estimate comes from a forecaster when one
is given (``gap_forecaster``: the LB node's ``forecast.method`` applied to each
slot's series of silence lengths, so the forecaster choice changes the lease;
``naive`` is the last silence), else from the empirical quantile of the last
silences. The volume policy's threshold can be calibrated per class
(``calibrated_lease_ms``): a class's typical active interval (geometric mean of
its active volumes) buys that lease, instead of one fixed threshold that, on
real traffic, leaves every lease on the minimum clamp.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..wire.records import LeaseSource
from .forecast import History, _index

__all__ = ["FALLBACK", "PREDICTED", "ActivityPolicy", "EndBound", "LeaseBounds", "VolumePolicy"]

PREDICTED = np.uint8(LeaseSource.PREDICTED)
FALLBACK = np.uint8(LeaseSource.FALLBACK)


@dataclass(frozen=True)
class LeaseBounds:
    min_ms: int
    max_ms: int
    standard_ms: int

    def __post_init__(self) -> None:
        for name in ("min_ms", "max_ms", "standard_ms"):
            if not isinstance(getattr(self, name), (int, np.integer)) or isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be an int")
        if not 0 < self.min_ms <= self.max_ms:
            raise ValueError(f"need 0 < min_ms <= max_ms, got {self.min_ms}, {self.max_ms}")
        if not self.min_ms <= self.standard_ms <= self.max_ms:
            raise ValueError(f"standard_ms {self.standard_ms} outside [{self.min_ms}, {self.max_ms}]")


def _finish(raw: np.ndarray, good: np.ndarray, bounds: LeaseBounds) -> tuple[np.ndarray, np.ndarray]:
    """Clamp, round up to whole ms, standard where not good."""
    lease = np.clip(raw, bounds.min_ms, bounds.max_ms)
    np.ceil(lease, out=lease)
    lease = np.where(good, lease, float(bounds.standard_ms)).astype(np.int64)
    source = np.where(good, PREDICTED, FALLBACK).astype(np.uint8)
    return lease, source


def per_class(array: np.ndarray, classes: np.ndarray, fresh: float) -> np.ndarray:
    """`array` grown (with `fresh`) to cover every class id in `classes`: ids are handed out as classes appear."""
    need = int(classes.max()) + 1 if classes.size else 0
    if need <= array.size:
        return array
    return np.concatenate([array, np.full(max(need, 2 * array.size) - array.size, fresh, array.dtype)])


class EndBound:
    """Per traffic class, the idle time after which its connections have closed.

    ``learn`` takes the idle time (ms since the connection's last active
    interval) of every announced close; each class keeps its last ``window``
    in a ring and, once it has ``min_closes``, its ``quantile`` is the class's
    bound. ``cap`` shortens the lease of a connection idle for ``idle`` ms to
    end ``margin_ms`` after the bound (a margin for the close record's own
    trip: up to an interval plus the LB node's phase), unless the connection
    has already outlived the bound.
    """

    def __init__(self, quantile: float = 0.95, margin_ms: float = 2000.0, min_closes: int = 8,
                 window: int = 64) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError("end quantile must be in (0, 1]")
        if not margin_ms >= 0.0:
            raise ValueError("end margin must be >= 0 ms")
        if min_closes < 1 or window < min_closes:
            raise ValueError("need 1 <= min_closes <= window")
        self.quantile = float(quantile)
        self.margin_ms = float(margin_ms)
        self.min_closes = int(min_closes)
        self.idle_at_close = History(0, window, dtype=np.float32)  # one ring per class
        self.bound_ms = np.full(0, np.nan)  # per class; NaN: too few closes yet

    def cover(self, classes: np.ndarray) -> None:
        """Room for every class id in `classes` (bound and ring), as ids are handed out."""
        if classes.size and int(classes.max()) >= self.bound_ms.size:
            self.bound_ms = per_class(self.bound_ms, classes, np.nan)
            self.idle_at_close.resize(self.bound_ms.size)

    def learn(self, classes: np.ndarray, idle_ms: np.ndarray) -> None:
        classes = np.asarray(classes, dtype=np.intp)
        idle_ms = np.asarray(idle_ms, dtype=np.float64)
        ok = np.isfinite(idle_ms)
        classes, idle_ms = classes[ok], idle_ms[ok]
        if not classes.size:
            return
        self.cover(classes)
        # one ring write per close, in order (a class may close several at once)
        order = np.argsort(classes, kind="stable")
        classes, idle_ms = classes[order], idle_ms[order]
        first = np.r_[True, classes[1:] != classes[:-1]]
        rank = np.arange(classes.size) - np.maximum.accumulate(np.where(first, np.arange(classes.size), 0))
        for r in range(int(rank.max()) + 1):
            at = rank == r
            self.idle_at_close.push(classes[at], idle_ms[at])
        touched = classes[first]
        enough = self.idle_at_close.count[touched] >= self.min_closes
        self.bound_ms[touched] = np.where(enough, self.idle_at_close.quantile(touched, self.quantile), np.nan)

    def cap(self, raw: np.ndarray, classes: np.ndarray, idle_ms: np.ndarray) -> np.ndarray:
        if not self.bound_ms.size:
            return raw
        classes = np.asarray(classes, dtype=np.intp)
        bound = np.full(raw.shape, np.nan)
        known = classes < self.bound_ms.size
        bound[known] = self.bound_ms[classes[known]]
        with np.errstate(invalid="ignore"):
            applies = idle_ms <= bound  # False where either is NaN: no bound known, or never active
        return np.where(applies, np.minimum(raw, bound + self.margin_ms - idle_ms), raw)


class _Policy:
    """What both policies keep per slot: when it last carried traffic, and since when it has been
    idle (its last traffic, or its first record if it never carried any: what the end bound reads)."""

    def __init__(self, bounds: LeaseBounds, interval_ms: int, capacity: int, end_bound: EndBound | None) -> None:
        if interval_ms <= 0:
            raise ValueError("interval_ms must be > 0")
        self.bounds = bounds
        self.interval_ms = float(interval_ms)
        self.end_bound = end_bound
        self.capacity = 0
        self.last_ms = np.empty(0)  # time of the last active interval (NaN: never)
        self.since_ms = np.empty(0)  # idle since (NaN: unknown)
        self.resize(capacity)

    _slot_arrays: tuple[str, ...] = ("last_ms", "since_ms")

    def resize(self, capacity: int) -> None:
        capacity = int(capacity)
        keep = min(capacity, self.capacity)
        for attr in self._slot_arrays:
            new = np.full(capacity, np.nan)
            new[:keep] = getattr(self, attr)[:keep]
            setattr(self, attr, new)
        self.capacity = capacity

    def reset(self, slots, now_ms: float = np.nan) -> None:
        """New connections, first seen at ``now_ms``."""
        idx = _index(slots)
        for attr in self._slot_arrays:
            getattr(self, attr)[idx] = np.nan
        self.since_ms[idx] = now_ms

    def _mark_active(self, slots, per_interval, now_ms) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which entries carried traffic, their slots, and their gap since their previous active
        interval (NaN: first)."""
        per = np.asarray(per_interval, dtype=np.float64)
        active = per > 0.0
        act = np.flatnonzero(active) if slots is None else np.asarray(slots, dtype=np.intp)[active]
        now = float(now_ms)
        gap = now - self.last_ms[act]
        self.last_ms[act] = now
        self.since_ms[act] = now
        return active, act, gap

    def closed(self, slots, classes, now_ms) -> None:
        """Close records of these slots arrived at ``now_ms``: the end bound learns how idle they were."""
        if self.end_bound is not None:
            self.end_bound.learn(classes, float(now_ms) - self.since_ms[_index(slots)])

    def _bounded(self, raw: np.ndarray, slots, classes, now_ms) -> np.ndarray:
        if self.end_bound is None or classes is None:
            return raw
        return self.end_bound.cap(raw, classes, float(now_ms) - self.since_ms[_index(slots)])


class VolumePolicy(_Policy):
    """The specification's formula: lease ∝ predicted volume (see module docstring)."""

    def __init__(self, bounds: LeaseBounds, resource_utilization_threshold: float,
                 out_of_bounds: str = "clamp", interval_ms: int = 1000, capacity: int = 0,
                 calibrated_lease_ms: float | None = None, end_bound: EndBound | None = None,
                 calibration_alpha: float = 0.05) -> None:
        thr = float(resource_utilization_threshold)
        if not (np.isfinite(thr) and thr > 0.0):
            raise ValueError("resource_utilization_threshold must be a finite number > 0 (bytes per ms)")
        if out_of_bounds not in ("clamp", "fallback"):
            raise ValueError("out_of_bounds must be 'clamp' or 'fallback'")
        if calibrated_lease_ms is not None and not calibrated_lease_ms > 0:
            raise ValueError("calibrated_lease_ms must be > 0")
        super().__init__(bounds, interval_ms, capacity, end_bound)
        self.threshold = thr
        self.out_of_bounds = out_of_bounds
        self.calibrated_lease_ms = None if calibrated_lease_ms is None else float(calibrated_lease_ms)
        self.calibration_alpha = float(calibration_alpha)
        self.class_log_volume = np.full(0, np.nan)  # per class: EWMA of log(bytes) of active intervals

    def observe(self, slots, per_interval, now_ms, classes=None) -> None:
        """One interval's volumes of the refreshed ``slots`` (their ``classes``) at ``now_ms``."""
        active, act, _gap = self._mark_active(slots, per_interval, now_ms)
        if self.calibrated_lease_ms is None or classes is None or not act.size:
            return
        cls = np.asarray(classes, dtype=np.intp)[active]
        self.class_log_volume = per_class(self.class_log_volume, cls, np.nan)
        counts = np.bincount(cls, minlength=self.class_log_volume.size)
        sums = np.bincount(cls, weights=np.log(np.asarray(per_interval, dtype=np.float64)[active]),
                           minlength=self.class_log_volume.size)
        seen = counts > 0
        mean = sums[seen] / counts[seen]
        old = self.class_log_volume[seen]
        a = self.calibration_alpha
        self.class_log_volume[seen] = np.where(np.isnan(old), mean, (1.0 - a) * old + a * mean)

    def thresholds(self, classes) -> np.ndarray | float:
        """Bytes per ms of lease for each class: calibrated where its volumes are known."""
        if self.calibrated_lease_ms is None or classes is None:
            return self.threshold
        cls = np.asarray(classes, dtype=np.intp)
        logv = np.full(cls.shape, np.nan)
        known = cls < self.class_log_volume.size
        logv[known] = self.class_log_volume[cls[known]]
        return np.where(np.isnan(logv), self.threshold, np.exp(logv) / self.calibrated_lease_ms)

    def leases(self, slots, predicted_volume, prior=None, classes=None, now_ms=0) -> tuple[np.ndarray, np.ndarray]:
        v = np.asarray(predicted_volume, dtype=np.float64)
        good = np.isfinite(v) & (v >= 0.0)
        raw = np.where(good, v, 0.0) / self.thresholds(classes)  # finite everywhere (may be +inf for huge v)
        if self.out_of_bounds == "fallback":
            good &= (raw >= self.bounds.min_ms) & (raw <= self.bounds.max_ms)
        return _finish(self._bounded(raw, slots, classes, now_ms), good, self.bounds)


class ActivityPolicy(_Policy):
    """Lease from each slot's predicted next silence (see module docstring)."""

    _slot_arrays = ("last_ms", "since_ms", "gap_q")

    def __init__(self, bounds: LeaseBounds, quantile: float = 0.99, safety: float = 1.5,
                 interval_ms: int = 1000, capacity: int = 0, window: int = 8, gap_forecaster=None,
                 end_bound: EndBound | None = None) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError("quantile must be in (0, 1]")
        if not safety >= 1.0:
            raise ValueError("safety must be >= 1")
        self.quantile = float(quantile)
        self.safety = float(safety)
        self.silences = History(0, window, dtype=np.float32)
        self.gap_forecaster = gap_forecaster  # over each slot's silence lengths (ms); None: the quantile
        self.gap_q = np.empty(0)  # current next-silence estimate (NaN: cold)
        super().__init__(bounds, interval_ms, capacity, end_bound)
        self.silence_ms = 1.5 * self.interval_ms  # a gap longer than this had an empty interval

    def resize(self, capacity: int) -> None:
        self.silences.resize(capacity)
        if self.gap_forecaster is not None:
            self.gap_forecaster.resize(capacity)
        super().resize(capacity)

    def reset(self, slots, now_ms: float = np.nan) -> None:
        super().reset(slots, now_ms)
        self.silences.reset(slots)
        if self.gap_forecaster is not None:
            self.gap_forecaster.reset(slots)

    def observe(self, slots, per_interval, now_ms, classes=None) -> None:
        """One interval's volumes of the refreshed ``slots`` at ``now_ms`` (traffic or not is what counts)."""
        _active, act, gap = self._mark_active(slots, per_interval, now_ms)
        if act.size == 0:
            return
        with np.errstate(invalid="ignore"):
            silence = gap > self.silence_ms
            # a first activity counts as back-to-back: the slot is refreshed every interval while it lasts
            short = ~silence
        gap = np.where(np.isnan(gap), self.interval_ms, gap)
        if short.any():
            s = act[short]
            q = self.gap_q[s]
            self.gap_q[s] = np.where(np.isnan(q), gap[short], q)
        if silence.any():
            s = act[silence]
            self.silences.push(s, gap[silence])
            estimate = self.silences.quantile(s, self.quantile)
            if self.gap_forecaster is not None:
                self.gap_forecaster.update(s, gap[silence])
                predicted = self.gap_forecaster.forecast(s)
                # ARIMA has no forecast until its classes are fitted: the quantile stands in
                estimate = np.where(np.isfinite(predicted), predicted, estimate)
            self.gap_q[s] = estimate

    def gap_quantile(self, slots) -> np.ndarray:
        return self.gap_q[_index(slots)].copy()

    def leases(self, slots, predicted=None, prior=None, classes=None, now_ms=0) -> tuple[np.ndarray, np.ndarray]:
        """Leases for ``slots``; ``prior`` (ms, scalar or per slot, NaN = none) for cold slots."""
        gq = self.gap_q[_index(slots)]
        warm = ~np.isnan(gq)
        raw = gq * self.safety + self.interval_ms
        if prior is not None:
            p = np.broadcast_to(np.asarray(prior, dtype=np.float64), raw.shape)
            use_prior = ~warm & np.isfinite(p) & (p >= 0.0)
            raw = np.where(use_prior, p, raw)
            warm = warm | use_prior
        raw = np.where(warm, raw, 0.0)
        return _finish(self._bounded(raw, slots, classes, now_ms), warm, self.bounds)
