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

``ActivityPolicy`` answers that question: it keeps per slot a high quantile of
the gaps between intervals with traffic (a connection that talked every 20 s
will most likely talk again within 20 s) and leases::

    lease_ms = clamp(gap_quantile * safety + interval_ms, MIN, MAX)

This follows the adaptive flow-timeout literature (MBET's persistency of
inter-arrival times; PGAT's per-class conditional gap distribution, whose
"flow intact ratio" is the premature-expiry rate to score this by).

Estimator: each slot keeps a ring (``History``) of its last ``window`` silences
(gaps longer than 1.5 intervals, i.e. with at least one empty interval in
between). Back-to-back active intervals are not stored: a 30 s burst would
otherwise flush the ring of the keep-alive gaps that matter; they only make a
slot warm (gap quantile = the gap, about one interval) until its first
silence. The quantile is recomputed only for the slots whose silence just
ended (rare events), so ``observe`` is O(1) per slot and interval and
``leases`` is a gather. With a window of 8 and q = 0.99 the quantile is
close to the maximum of the recent silences; ``safety`` covers the rest.
Cold slots (no gap yet) take the class prior passed to ``leases`` (PREDICTED)
or the standard lease (FALLBACK).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..wire.records import LeaseSource
from .forecast import History, _index

__all__ = ["FALLBACK", "PREDICTED", "ActivityPolicy", "LeaseBounds", "VolumePolicy"]

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


class VolumePolicy:
    """The specification's formula: lease ∝ predicted volume (see module docstring)."""

    def __init__(self, bounds: LeaseBounds, resource_utilization_threshold: float,
                 out_of_bounds: str = "clamp") -> None:
        thr = float(resource_utilization_threshold)
        if not (np.isfinite(thr) and thr > 0.0):
            raise ValueError("resource_utilization_threshold must be a finite number > 0 (bytes per ms)")
        if out_of_bounds not in ("clamp", "fallback"):
            raise ValueError("out_of_bounds must be 'clamp' or 'fallback'")
        self.bounds = bounds
        self.threshold = thr
        self.out_of_bounds = out_of_bounds

    def leases(self, predicted_volume) -> tuple[np.ndarray, np.ndarray]:
        v = np.asarray(predicted_volume, dtype=np.float64)
        good = np.isfinite(v) & (v >= 0.0)
        raw = np.where(good, v, 0.0) / self.threshold  # finite everywhere (may be +inf for huge v)
        if self.out_of_bounds == "fallback":
            good &= (raw >= self.bounds.min_ms) & (raw <= self.bounds.max_ms)
        return _finish(raw, good, self.bounds)


class ActivityPolicy:
    """Lease from a high quantile of each slot's inter-activity gaps (see module docstring)."""

    def __init__(self, bounds: LeaseBounds, quantile: float = 0.99, safety: float = 1.5,
                 interval_ms: int = 1000, capacity: int = 0, window: int = 8) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError("quantile must be in (0, 1]")
        if not safety >= 1.0:
            raise ValueError("safety must be >= 1")
        if interval_ms <= 0:
            raise ValueError("interval_ms must be > 0")
        self.bounds = bounds
        self.quantile = float(quantile)
        self.safety = float(safety)
        self.interval_ms = float(interval_ms)
        self.silence_ms = 1.5 * self.interval_ms  # a gap longer than this had an empty interval
        self.capacity = 0
        self.last_ms = np.empty(0)    # time of the last active interval (NaN: never)
        self.gap_q = np.empty(0)      # current gap quantile estimate (NaN: cold)
        self.silences = History(0, window, dtype=np.float32)
        self.resize(capacity)

    def resize(self, capacity: int) -> None:
        capacity = int(capacity)
        keep = min(capacity, self.capacity)
        for attr in ("last_ms", "gap_q"):
            new = np.full(capacity, np.nan)
            new[:keep] = getattr(self, attr)[:keep]
            setattr(self, attr, new)
        self.silences.resize(capacity)
        self.capacity = capacity

    def reset(self, slots) -> None:
        idx = _index(slots)
        self.last_ms[idx] = np.nan
        self.gap_q[idx] = np.nan
        self.silences.reset(slots)

    def observe(self, slots, active, now_ms) -> None:
        """Record one interval ending at ``now_ms``: ``active[i]`` = slot had traffic."""
        active = np.asarray(active, dtype=bool)
        if slots is None:
            act = np.flatnonzero(active)
        else:
            act = np.asarray(slots, dtype=np.intp)[active]
        if act.size == 0:
            return
        now = float(now_ms)
        gap = now - self.last_ms[act]  # NaN where never active before
        self.last_ms[act] = now
        with np.errstate(invalid="ignore"):
            silence = gap > self.silence_ms
            short = gap <= self.silence_ms
        if short.any():
            s = act[short]
            q = self.gap_q[s]
            self.gap_q[s] = np.where(np.isnan(q), gap[short], q)
        if silence.any():
            s = act[silence]
            self.silences.push(s, gap[silence])
            self.gap_q[s] = self.silences.quantile(s, self.quantile)

    def gap_quantile(self, slots) -> np.ndarray:
        return self.gap_q[_index(slots)].copy()

    def leases(self, slots, prior=None) -> tuple[np.ndarray, np.ndarray]:
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
        return _finish(raw, warm, self.bounds)
