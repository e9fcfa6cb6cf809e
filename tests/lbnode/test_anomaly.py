"""spoa.lbnode.anomaly.AnomalyDetector: per-class streaming quantiles of segment rates."""

from __future__ import annotations

import pytest

np = pytest.importorskip("numpy", reason="numpy is not installed (a dependency of spoa.lbnode.anomaly)")
pytest.importorskip("fastdigest", reason="fastdigest is not installed (a dependency of spoa.lbnode.anomaly)")

from spoa.lbnode.anomaly import AnomalyDetector, segment_rates, traffic_class  # noqa: E402
from spoa.wire.records import DIR_IN, DIR_OUT, ConnectionRecord, SegmentRecord  # noqa: E402

# Median e^10 ~ 22 kB per interval. sigma 0.8 puts p99.9 x 4 at 4 e^(3.09 sigma)
# ~ 47x the median, so 100x the median is outside; at sigma 1.5 it would be
# ~412x and 100x the median an ordinary rate (docs/anomaly.md, "Rule").
MU, SIGMA = 10.0, 0.8
MEDIAN = float(np.exp(MU))


def lognormal(n: int, seed: int, mu: float = MU, sigma: float = SIGMA) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(mu, sigma, n)


def feed(det: AnomalyDetector, cls: str, n: int, seed: int, per_interval: int = 500, **kw) -> None:
    x = lognormal(n, seed, **kw)
    for i in range(0, n, per_interval):
        det.observe(cls, x[i : i + per_interval])


def test_flags_100x_median_not_median():
    det = AnomalyDetector()
    feed(det, "web", 20_000, seed=1)
    assert not det.is_anomalous("web", MEDIAN)
    assert det.is_anomalous("web", 100 * MEDIAN)
    assert det.stats["flagged"] == 1
    mask = det.flag("web", np.array([MEDIAN, 100 * MEDIAN, 0.5 * MEDIAN, np.nan]))
    assert mask.dtype == bool and mask.tolist() == [False, True, False, False]
    assert det.stats["flagged"] == 2
    # the threshold is p99.9 x 4 of what was fed, within t-digest's error at 100 centroids
    x = lognormal(20_000, seed=1)
    thr = det.threshold("web")
    assert thr == pytest.approx(4.0 * np.quantile(x, 0.999), rel=0.25)
    # on fresh data from the same distribution almost nothing is flagged
    assert det.flag("web", lognormal(100_000, seed=99)).mean() < 1e-3


def test_nothing_flagged_before_min_samples():
    det = AnomalyDetector(min_samples=1000)
    det.observe("web", lognormal(999, seed=2))
    assert det.samples("web") == 999
    assert det.threshold("web") is None
    assert not det.is_anomalous("web", 1e15)
    assert not det.flag("web", [1e15, 1e16]).any()
    assert det.stats["flagged"] == 0
    det.observe("web", [MEDIAN])
    assert det.threshold("web") is not None
    assert det.is_anomalous("web", 1e15)


def test_unknown_class_and_idle_rates():
    det = AnomalyDetector(min_samples=10, window=None)
    assert det.threshold("nope") is None
    assert not det.is_anomalous("nope", 1e18)
    assert det.flag("nope", np.ones((2, 3))).shape == (2, 3)
    assert "nope" not in det and len(det) == 0  # queries do not create classes
    # zeros (idle segments), negatives and non-finite values are dropped, not observed
    det.observe("web", [0.0, -1.0, np.inf, np.nan])
    assert "web" not in det
    det.observe("web", [0, 0, 5, 7])
    assert det.stats["observed"] == 2 and det.stats["dropped"] == 6
    assert det.samples("web") == 2


def test_classes_are_independent():
    det = AnomalyDetector()
    feed(det, "small", 5000, seed=3, mu=8.0)  # median ~3 kB
    feed(det, "big", 5000, seed=4, mu=14.0)  # median ~1.2 MB
    rate = 100 * np.exp(8.0)  # 100x the small class's median, ~1/4 of big's median
    assert det.is_anomalous("small", rate)
    assert not det.is_anomalous("big", rate)
    assert det.threshold("small") < det.threshold("big")
    # a third class with too few samples is unaffected by the others
    det.observe("new", lognormal(10, seed=5))
    assert not det.is_anomalous("new", 1e12)


def test_lru_bound_evicts_least_recently_used():
    det = AnomalyDetector(max_classes=3, min_samples=10)
    for c in "abc":
        det.observe(c, lognormal(50, seed=ord(c)))
    assert len(det) == 3
    det.threshold("a")  # a query is a use: b is now the least recently used
    det.observe("d", lognormal(50, seed=6))
    assert "b" not in det and {"a", "c", "d"} <= {c for c in "abcd" if c in det}
    assert det.stats == det.stats | {"classes": 3, "evicted": 1}
    for i in range(100):
        det.observe(f"x{i}", [1.0, 2.0])
        assert len(det) <= 3
    assert det.stats["evicted"] == 101
    assert det.stats["classes"] == 3
    # an evicted class starts over: no threshold until min_samples again
    det.observe("a", [1.0])
    assert det.threshold("a") is None


def test_threshold_tracks_a_shift_with_rotation():
    window = 20_000
    det = AnomalyDetector(window=window)
    feed(det, "web", 3 * window, seed=7)
    before = det.threshold("web")
    spike = 100 * MEDIAN
    assert det.is_anomalous("web", spike)
    # the class's traffic grows 150x (new content, say); old data is gone after
    # at most two rotations
    shift = MU + np.log(150.0)
    feed(det, "web", 2 * window, seed=8, mu=shift)
    after = det.threshold("web")
    expected = 4.0 * np.quantile(lognormal(2 * window, seed=8, mu=shift), 0.999)
    assert after == pytest.approx(expected, rel=0.25)
    assert after > 50 * before
    assert not det.is_anomalous("web", spike)  # now an ordinary rate
    assert det.stats["rotations"] >= 5
    assert det.samples("web") <= 2 * window


@pytest.mark.parametrize("window", [20_000, None])
def test_downward_shift_needs_rotation(window):
    # The class's rates drop 150x. Without rotation (window=None: one t-digest
    # over the class's whole life) the old tail keeps the threshold up and a
    # connection at 100x the new median is not flagged; with rotation the
    # threshold follows within two windows.
    det = AnomalyDetector(window=window)
    feed(det, "web", 60_000, seed=9)
    before = det.threshold("web")
    low = MU - np.log(150.0)
    feed(det, "web", 60_000, seed=10, mu=low)
    spike = 100 * np.exp(low)
    if window is None:
        assert det.stats["rotations"] == 0 and det.samples("web") == 120_000
        assert det.threshold("web") > 0.5 * before
        assert not det.is_anomalous("web", spike)
    else:
        assert det.threshold("web") < before / 50
        assert det.is_anomalous("web", spike)


def test_rotation_keeps_min_samples():
    det = AnomalyDetector(min_samples=1000, window=1000)
    det.observe("web", lognormal(1000, seed=11))  # rotates: previous full, current empty
    assert det.stats["rotations"] == 1
    assert det.threshold("web") is not None
    det.observe("web", lognormal(10, seed=12))
    assert 1000 <= det.samples("web") <= 2000
    assert det.threshold("web") is not None


def test_parameter_validation():
    for kw in (
        {"q_high": 1.0},
        {"q_high": 0.0},
        {"factor": 0},
        {"min_samples": 0},
        {"max_classes": 0},
        {"compression": 1},
        {"window": 0},
    ):
        with pytest.raises(ValueError):
            AnomalyDetector(**kw)
    # a generation never holds fewer than min_samples rates
    assert AnomalyDetector(min_samples=500_000).window == 500_000
    assert AnomalyDetector(min_samples=1000, window=10).window == 1000
    assert AnomalyDetector(window=None).window is None


def _conn(cid: int, frontend: str, segs: list[tuple[int, int]]) -> ConnectionRecord:
    return ConnectionRecord(
        conn_id=cid.to_bytes(16, "big"),
        src="192.0.2.1",
        src_port=40000 + cid,
        dst="198.51.100.1",
        dst_port=443,
        frontend=frontend,
        flags=0,
        counter_source=0,
        granularity_level=0,
        requested_lease_ms=0,
        predicted_lease_ms=0,
        lease_source=0,
        bytes_in_total=0,
        bytes_out_total=0,
        segments=tuple(
            SegmentRecord(
                direction=d,
                start_byte_offset=0,
                byte_count=b,
                bytes_transferred=b,
                packets_transferred=1,
                timestamp_last_activity_ms=0,
                level=0,
            )
            for d, b in segs
        ),
    )


def test_records_helpers_and_process():
    rec = _conn(1, "web", [(DIR_IN, 100), (DIR_OUT, 0), (DIR_OUT, 3000)])
    assert segment_rates(rec).tolist() == [100.0, 3000.0]
    assert segment_rates(rec, interval_ms=500).tolist() == [200.0, 6000.0]
    assert segment_rates(rec, direction=DIR_OUT).tolist() == [3000.0]
    assert traffic_class(rec) == "web" and traffic_class(rec, DIR_OUT) == "web/out"

    det = AnomalyDetector(min_samples=500, window=None)
    rng = np.random.default_rng(13)
    cid = 0
    for _ in range(5):  # 5 intervals of 200 connections: out ~ lognormal, in small
        recs = []
        for b in rng.lognormal(MU, SIGMA, 200).astype(int) + 1:
            cid += 1
            recs.append(_conn(cid, "web", [(DIR_IN, 50), (DIR_OUT, int(b))]))
        assert det.process(recs) == []  # nothing flagged before min_samples / in-distribution
    assert det.samples("web/out") == 1000 and det.samples("web/in") == 1000
    normal = _conn(10**6, "web", [(DIR_OUT, int(MEDIAN))])
    # 100 kB upstream is ordinary for "out" but 2000x the "in" class
    upload = _conn(10**6 + 1, "web", [(DIR_IN, 100_000)])
    burst = _conn(10**6 + 2, "web", [(DIR_IN, 50), (DIR_OUT, int(1000 * MEDIAN))])
    other = _conn(10**6 + 3, "api", [(DIR_OUT, 10**12)])  # unknown class: never flagged
    flagged = det.process([normal, upload, burst, other])
    assert flagged == [upload.conn_id, burst.conn_id]
    assert det.samples("api/out") == 1  # observed after the flag check
