"""Lease policies (spoa.lbnode.lease_policy): known answers and bounds.

* VolumePolicy (the specification's formula): volume / threshold, clamped;
  NaN/inf/negative -> FALLBACK with the standard lease;
* ActivityPolicy: lease from a high quantile of inter-activity gaps;
* a constant-rate connection gets a stable lease under both;
* an idle keep-alive connection talking every 20 s: ActivityPolicy leases it
  for more than 20 s (never expired while alive), VolumePolicy gives it MIN
  and would expire it before every keep-alive;
* bounds always hold (hypothesis).
"""

from __future__ import annotations

import pytest

np = pytest.importorskip("numpy")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from spoa.lbnode.forecast import ARIMA, SES, TSB, Croston, Naive  # noqa: E402
from spoa.lbnode.lease_policy import (  # noqa: E402
    FALLBACK,
    PREDICTED,
    ActivityPolicy,
    EndBound,
    LeaseBounds,
    VolumePolicy,
)
from spoa.wire.records import LeaseSource  # noqa: E402

BOUNDS = LeaseBounds(min_ms=5_000, max_ms=600_000, standard_ms=30_000)
ONE = np.array([0])


def test_sources_are_the_wire_values():
    assert PREDICTED == LeaseSource.PREDICTED == 1
    assert FALLBACK == LeaseSource.FALLBACK == 2


def test_bounds_validation():
    with pytest.raises(ValueError):
        LeaseBounds(min_ms=0, max_ms=10, standard_ms=5)
    with pytest.raises(ValueError):
        LeaseBounds(min_ms=10, max_ms=5, standard_ms=7)
    with pytest.raises(ValueError):
        LeaseBounds(min_ms=10, max_ms=20, standard_ms=30)
    with pytest.raises(TypeError):
        LeaseBounds(min_ms=1.5, max_ms=20, standard_ms=10)
    with pytest.raises(ValueError):
        VolumePolicy(BOUNDS, 0.0)
    with pytest.raises(ValueError):
        VolumePolicy(BOUNDS, 1.0, out_of_bounds="ignore")


# ---------------------------------------------------------------- VolumePolicy


def test_volume_policy_known_answers():
    pol = VolumePolicy(BOUNDS, resource_utilization_threshold=0.05)  # bytes per ms of lease
    vol = np.array([1000.0, 0.0, 1e12, 250.0001, np.nan, np.inf, -np.inf, -5.0, 249.0])
    lease, src = pol.leases(None, vol)
    assert lease.dtype == np.int64 and src.dtype == np.uint8
    np.testing.assert_array_equal(
        lease, [20_000, 5_000, 600_000, 5_001, 30_000, 30_000, 30_000, 30_000, 5_000])
    np.testing.assert_array_equal(src, [1, 1, 1, 1, 2, 2, 2, 2, 1])


def test_volume_policy_fallback_reading_of_out_of_bounds():
    pol = VolumePolicy(BOUNDS, 0.05, out_of_bounds="fallback")
    lease, src = pol.leases(None, np.array([1000.0, 0.0, 1e12, np.nan]))
    np.testing.assert_array_equal(lease, [20_000, 30_000, 30_000, 30_000])
    np.testing.assert_array_equal(src, [1, 2, 2, 2])


def test_nan_prediction_falls_back_to_standard():
    pol = VolumePolicy(BOUNDS, 0.05)
    lease, src = pol.leases(None, np.full(4, np.nan))
    assert (lease == BOUNDS.standard_ms).all() and (src == FALLBACK).all()
    # ActivityPolicy: a slot with no activity yet and no prior.
    act = ActivityPolicy(BOUNDS, capacity=3)
    lease, src = act.leases(np.arange(3))
    assert (lease == BOUNDS.standard_ms).all() and (src == FALLBACK).all()
    lease, src = act.leases(np.arange(3), prior=np.array([12_345.2, np.nan, 1e9]))
    np.testing.assert_array_equal(lease, [12_346, 30_000, 600_000])
    np.testing.assert_array_equal(src, [PREDICTED, FALLBACK, PREDICTED])


# ------------------------------------------------------------ constant rate


@pytest.mark.parametrize("forecaster", [SES(1, alpha=0.3), Croston(1, alpha=0.2, variant="classic"),
                                        TSB(1, alpha=0.2, beta=0.2)])
def test_constant_rate_gives_stable_lease(forecaster):
    vol = VolumePolicy(BOUNDS, 0.05)
    act = ActivityPolicy(BOUNDS, capacity=1)
    vol_leases, act_leases = [], []
    for t in range(60):
        forecaster.update(ONE, np.array([1000.0]))  # 1000 bytes every 1 s interval
        act.observe(ONE, np.array([True]), now_ms=1000 * (t + 1))
        vol_leases.append(vol.leases(None, forecaster.forecast(ONE))[0][0])
        act_leases.append(act.leases(ONE)[0][0])
    assert set(vol_leases) == {20_000}  # 1000 B / 0.05 B/ms, from the first interval on
    # Active every interval: gap quantile 1000 ms -> 1000 * 1.5 + 1000 = 2500 -> MIN.
    assert act.gap_quantile(ONE)[0] == 1000.0
    assert set(act_leases[1:]) == {5_000}
    wide = ActivityPolicy(LeaseBounds(min_ms=1_000, max_ms=600_000, standard_ms=30_000), capacity=1)
    for t in range(10):
        wide.observe(ONE, np.array([True]), now_ms=1000 * t)
    assert wide.leases(ONE)[0][0] == 2_500


# -------------------------------------------------------- idle keep-alive


def keepalive_run(period_s: int = 20, seconds: int = 200, burst_s: int = 0):
    """One connection: optional burst, then 100 bytes every ``period_s`` s (1 s intervals).

    Returns per interval: bytes, the VolumePolicy lease (TSB forecast) and the
    ActivityPolicy lease computed at the end of that interval.
    """
    tsb = TSB(1, alpha=0.2, beta=0.1)
    vol = VolumePolicy(BOUNDS, 0.05)
    act = ActivityPolicy(BOUNDS, quantile=0.99, safety=1.5, interval_ms=1000, capacity=1)
    ys, vl, al = [], [], []
    for t in range(seconds):
        if t < burst_s:
            y = 50_000.0
        else:
            y = 100.0 if (t - burst_s) % period_s == 0 else 0.0
        tsb.update(ONE, np.array([y]))
        act.observe(ONE, np.array([y > 0]), now_ms=1000 * t)
        ys.append(y)
        vl.append(vol.leases(None, tsb.forecast(ONE))[0][0])
        al.append(act.leases(ONE)[0][0])
    return np.array(ys), np.array(vl), np.array(al)


def premature_expiries(ys: np.ndarray, leases: np.ndarray, start: int) -> int:
    """Intervals after ``start`` whose lease ends before the next activity."""
    active = np.flatnonzero(ys > 0)
    count = 0
    for t in range(start, len(ys)):
        nxt = active[active > t]
        if nxt.size and leases[t] < (nxt[0] - t) * 1000:
            count += 1
    return count


def test_idle_keepalive_activity_lease_exceeds_period_volume_gives_minimum():
    ys, vol_leases, act_leases = keepalive_run(period_s=20)
    warm = 21  # after the first complete 20 s gap
    # ActivityPolicy: gap quantile 20 s -> 20000 * 1.5 + 1000 = 31000 ms > 20 s.
    assert set(act_leases[warm:]) == {31_000}
    assert premature_expiries(ys, act_leases, warm) == 0
    # VolumePolicy: ~0 predicted bytes -> MIN (5 s), far below the 20 s period.
    assert set(vol_leases[warm:]) == {BOUNDS.min_ms}
    assert premature_expiries(ys, vol_leases, warm) > 100


def test_burst_does_not_flush_keepalive_gaps():
    # Keep-alive first, then a 40 s burst, then keep-alive again: the burst's
    # back-to-back intervals are not silences and do not push the 20 s gaps out.
    act = ActivityPolicy(BOUNDS, capacity=1, window=4)
    t = 0
    for _ in range(5):   # five 20 s gaps
        act.observe(ONE, np.array([True]), now_ms=t)
        t += 20_000
    for _ in range(40):  # burst: active every second
        act.observe(ONE, np.array([True]), now_ms=t)
        t += 1000
    assert act.gap_quantile(ONE)[0] == 20_000.0
    assert act.leases(ONE)[0][0] == 31_000


def test_activity_quantile_tracks_recent_gaps():
    act = ActivityPolicy(BOUNDS, quantile=0.5, safety=1.0, capacity=2, window=4)
    slots = np.arange(2)
    # Slot 0 gaps 10, 20, 30, 40, 50 s (window 4 keeps 20..50); slot 1 never active.
    t = 0
    for gap in (10, 20, 30, 40, 50):
        act.observe(slots, np.array([True, False]), now_ms=t)
        t += gap * 1000
    act.observe(slots, np.array([True, False]), now_ms=t)
    assert act.gap_quantile(slots)[0] == 35_000.0  # median of 20, 30, 40, 50
    lease, src = act.leases(slots)
    np.testing.assert_array_equal(lease, [36_000, 30_000])
    np.testing.assert_array_equal(src, [PREDICTED, FALLBACK])
    act.reset(np.array([0]))
    assert np.isnan(act.gap_quantile(slots)).all()
    act.resize(5)
    assert act.leases(np.arange(5))[1].tolist() == [FALLBACK] * 5
    act.observe(None, np.array([True] * 5), now_ms=t + 1000)
    act.observe(None, np.array([True] * 5), now_ms=t + 4000)
    assert (act.gap_quantile(None) == 3000.0).all()


# ------------------------------------------------------------- properties

finite_or_not = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=1e15),
)


@st.composite
def bounds(draw):
    lo = draw(st.integers(1, 10**6))
    hi = draw(st.integers(lo, 10**9))
    std = draw(st.integers(lo, hi))
    return LeaseBounds(min_ms=lo, max_ms=hi, standard_ms=std)


@settings(max_examples=150, deadline=None)
@given(b=bounds(), thr=st.floats(min_value=1e-9, max_value=1e9),
       vols=st.lists(finite_or_not, min_size=1, max_size=30),
       mode=st.sampled_from(["clamp", "fallback"]))
def test_volume_policy_bounds_always_hold(b, thr, vols, mode):
    lease, src = VolumePolicy(b, thr, out_of_bounds=mode).leases(None, np.array(vols))
    assert ((lease >= b.min_ms) & (lease <= b.max_ms)).all()
    assert set(src.tolist()) <= {1, 2}
    assert (lease[src == FALLBACK] == b.standard_ms).all()
    bad = ~np.isfinite(vols) | (np.array(vols) < 0)
    assert (src[bad] == FALLBACK).all()


@settings(max_examples=80, deadline=None)
@given(b=bounds(), q=st.floats(0.5, 1.0), safety=st.floats(1.0, 5.0),
       interval=st.integers(10, 10_000),
       pattern=st.lists(st.lists(st.booleans(), min_size=6, max_size=6), min_size=1, max_size=40),
       prior=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)))
def test_activity_policy_bounds_always_hold(b, q, safety, interval, pattern, prior):
    act = ActivityPolicy(b, quantile=q, safety=safety, interval_ms=interval, capacity=6, window=4)
    slots = np.arange(6)
    for t, active in enumerate(pattern):
        act.observe(slots, np.array(active), now_ms=t * interval)
        lease, src = act.leases(slots, prior=prior)
        assert ((lease >= b.min_ms) & (lease <= b.max_ms)).all()
        assert set(src.tolist()) <= {1, 2}
        assert (lease[src == FALLBACK] == b.standard_ms).all()
        gq = act.gap_quantile(slots)
        warm = ~np.isnan(gq)
        assert (gq[warm] >= interval * 0.999).all()  # a gap is at least one interval


# ------------------------------------------------------------- forecasts that steer the lease


def _silences(policy, slots, gaps_s, t=0):
    """Activity at t, then after each gap (s): one silence per gap."""
    ones = np.ones(len(slots), bool)
    policy.observe(slots, ones, now_ms=t)
    for g in gaps_s:
        t += g * 1000
        policy.observe(slots, ones, now_ms=t)
    return t


def test_the_gap_forecaster_changes_the_activity_lease():
    gaps = (20, 5, 20, 5, 20, 5)
    bounds = LeaseBounds(min_ms=1_000, max_ms=600_000, standard_ms=30_000)
    naive = ActivityPolicy(bounds, safety=1.0, capacity=1, gap_forecaster=Naive(1))
    ses = ActivityPolicy(bounds, safety=1.0, capacity=1, gap_forecaster=SES(1, alpha=0.3))
    quantile = ActivityPolicy(bounds, safety=1.0, capacity=1)
    for p in (naive, ses, quantile):
        _silences(p, ONE, gaps)
    assert naive.leases(ONE)[0][0] == 5_000 + 1_000  # the last silence
    level = 20.0
    for g in gaps[1:]:
        level += 0.3 * (g - level)
    assert ses.leases(ONE)[0][0] == int(np.ceil(level * 1000)) + 1_000  # smoothed silences
    assert quantile.leases(ONE)[0][0] == 20_000 + 1_000  # the 0.99 quantile of the last eight


def test_unfitted_arima_leaves_the_quantile_in_charge():
    arima = ActivityPolicy(BOUNDS, safety=1.0, capacity=1, gap_forecaster=ARIMA(1, order=(1, 0, 0)))
    plain = ActivityPolicy(BOUNDS, safety=1.0, capacity=1)
    for p in (arima, plain):
        _silences(p, ONE, (20, 30, 25))
    assert arima.leases(ONE)[0][0] == plain.leases(ONE)[0][0]


def test_a_first_activity_gives_a_short_lease_not_the_class_prior():
    # it is refreshed every interval while its traffic lasts: the floor is enough
    act = ActivityPolicy(BOUNDS, capacity=1)
    act.observe(ONE, np.array([True]), now_ms=0)
    lease, src = act.leases(ONE, prior=np.array([90_000.0]))
    assert (lease[0], src[0]) == (BOUNDS.min_ms, PREDICTED)


def test_end_bound_learns_per_class_and_caps_idle_leases():
    end = EndBound(quantile=0.5, margin_ms=2_000, min_closes=3, window=8)
    classes = np.array([0, 0, 1])
    end.learn(classes, np.array([30_000.0, 32_000.0, 10_000.0]))
    raw = np.full(3, 60_000.0)
    # too few closes yet: no bound
    np.testing.assert_array_equal(end.cap(raw, classes, np.zeros(3)), raw)
    end.learn(np.array([0, 1, 1, 7]), np.array([31_000.0, 10_000.0, np.nan, 5_000.0]))  # NaN: never seen active
    assert end.bound_ms[0] == 31_000.0 and np.isnan(end.bound_ms[1])  # class 1 has 2 closes
    assert end.idle_at_close.count[7] == 1 and end.bound_ms.size >= 8  # classes appear as they come
    idle = np.array([0.0, 25_000.0, 40_000.0])
    got = end.cap(np.full(3, 60_000.0), np.zeros(3, np.intp), idle)
    # ends 2 s after the class's median idle-at-close; a connection idle past it has outlived it
    np.testing.assert_array_equal(got, [33_000.0, 8_000.0, 60_000.0])
    np.testing.assert_array_equal(end.cap(raw, np.array([0, 0, 99]), np.full(3, np.nan)), raw)
    with pytest.raises(ValueError):
        EndBound(min_closes=10, window=8)


def test_activity_policy_with_end_bound_drops_a_silent_end_soon_after_its_class_closes():
    end = EndBound(quantile=0.9, margin_ms=2_000, min_closes=2)
    act = ActivityPolicy(BOUNDS, safety=1.0, capacity=3, end_bound=end)
    slots, classes = np.arange(3), np.zeros(3, np.intp)
    t = _silences(act, slots, (30, 30))
    act.closed(np.array([0, 1]), classes[:2], now_ms=t + 30_000)  # both closed 30 s after their traffic
    # slot 2 is still there, 20 s idle: its lease ends 2 s after the class's 30 s
    lease, src = act.leases(np.array([2]), classes=classes[2:], now_ms=t + 20_000)
    assert (lease[0], src[0]) == (12_000, PREDICTED)
    # without the bound it would hold its 31 s silence lease
    assert act.leases(np.array([2]))[0][0] == 31_000


def test_volume_threshold_calibrated_per_class():
    pol = VolumePolicy(BOUNDS, resource_utilization_threshold=1.0, calibrated_lease_ms=30_000,
                       calibration_alpha=1.0, capacity=4)
    slots, classes = np.arange(4), np.array([0, 0, 1, 1])
    pol.observe(slots, np.array([1e6, 4e6, 0.0, 0.0]), now_ms=0, classes=classes)
    # class 0: typical active interval = geometric mean 2 MB -> 30 s; class 1 has no traffic yet
    lease, src = pol.leases(slots, np.array([2e6, 1e6, 20_000.0, np.nan]), classes=classes)
    np.testing.assert_allclose(lease, [30_000, 15_000, 20_000, BOUNDS.standard_ms], atol=1)  # exp(log(x)) may round up
    np.testing.assert_array_equal(src, [PREDICTED, PREDICTED, PREDICTED, FALLBACK])
    fixed = VolumePolicy(BOUNDS, resource_utilization_threshold=1.0, capacity=4)
    fixed.observe(slots, np.array([1e6, 4e6, 0.0, 0.0]), now_ms=0, classes=classes)
    assert fixed.leases(slots, np.full(4, 20_000.0), classes=classes)[0].tolist() == [20_000] * 4
    with pytest.raises(ValueError):
        VolumePolicy(BOUNDS, 1.0, calibrated_lease_ms=0)
