"""Segment tracker: invariants on both twins, and the twins against each other.

Random operation sequences (register, cumulative counter updates, intervals,
closes; bytes keys of several lengths, random IPv4/IPv6 addresses) drive a
Cython and a pure-Python tracker side by side; after every step their
published records must be equal and the invariants must hold:
segments tile each direction's byte range, interval sums equal the deltas,
bounds hold, and nothing is lost when bounds coarsen.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spoa.servernode import _tracker_py
from spoa.wire.packet import encode_batch, encode_packet
from spoa.wire.records import DIR_IN, DIR_OUT, ConnFlags, PacketHeader, pack_key

from tests.conftest import compiled_fixture, twin_fixture

tracker_impl = twin_fixture("tracker")  # one twin module; tests using it run once per twin
compiled_tracker = compiled_fixture("tracker")
KiB = 1024
KEYS = [bytes([i]) * (1 + 5 * i) for i in range(8)]  # 1..36 bytes: every key length path
K = pack_key("10.0.0.2", 80, "10.0.0.1", 1)  # the product's key shape


HEADER = PacketHeader(node_id=7, sequence=1, timestamp_ms=1000, interval_ms=100)
WIRE_KEY = b"k" * 32


def outcome(fn, *args):
    """fn's result, or the (type, message) of what it raised: a record the wire cannot carry
    (addresses of two families) must fail alike on both paths."""
    try:
        return fn(*args)
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)


def small_tracker(cls, **overrides):
    params = dict(segment_size=64 * KiB, min_segment_size=8 * KiB, max_segment_size=512 * KiB,
                  split_bytes=16 * KiB, idle_ms=100, max_segments_per_connection=12,
                  max_total_segments=40, max_connections=6, expire_ms=1000)
    params.update(overrides)
    return cls(**params)


def check_invariants(tracker, records, interval_deltas):
    for rec in records:
        per_dir = {DIR_IN: [], DIR_OUT: []}
        for seg in rec.segments:
            per_dir[seg.direction].append(seg)
        for direction, segs in per_dir.items():
            assert segs, "every direction keeps at least its tail segment"
            # tiling: contiguous from 0, no gap, no overlap
            offset = 0
            for seg in segs:
                assert seg.start_byte_offset == offset
                offset += seg.byte_count
            total = rec.bytes_in_total if direction == DIR_IN else rec.bytes_out_total
            assert offset == total
            if not rec.flags & ConnFlags.CLOSED and rec.conn_id in interval_deltas:
                want_bytes, want_packets = interval_deltas[rec.conn_id][direction]
                assert sum(s.bytes_transferred for s in segs) == want_bytes
                assert sum(s.packets_transferred for s in segs) == want_packets
        assert len(rec.segments) <= tracker.max_segments_per_connection


addresses = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),  # IPv4-mapped text comes back dotted
    st.ip_addresses(v=6).map(lambda a: a.exploded.upper()),  # non-canonical IPv6 text
)

operations = st.lists(
    st.one_of(
        st.tuples(st.just("register"), st.integers(0, 7), addresses, addresses),
        st.tuples(st.just("update"), st.integers(0, 7), st.sampled_from([DIR_IN, DIR_OUT]),
                  st.integers(0, 300 * KiB), st.integers(0, 400)),
        st.tuples(st.just("tick"), st.integers(1, 400)),
        st.tuples(st.just("close"), st.integers(0, 7)),
        st.tuples(st.just("defer"), st.integers(0, 7), st.integers(-200, 800)),
        # a hint for connection id k: lease ms, its source, level, anomaly, the lease source in force
        st.tuples(st.just("hint"), st.integers(0, 8), st.integers(0, 3000), st.sampled_from([0, 1, 2]),
                  st.integers(-3, 3), st.booleans(), st.sampled_from([0, 1, 2])),
    ),
    max_size=60,
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_twins_agree_and_invariants_hold(both_trackers, ops):
    # 0, 1: compiled and twin publishing records; 2, 3: the same publishing in wire form
    # (publish_batch), which must give the very bytes encode_packet writes for 0's records.
    trackers = [small_tracker(cls) for cls in both_trackers * 2]
    for t in trackers:  # a cadence the ticks' steps (1..400 ms) cross
        t.set_refresh(50, 0.34, 300)
    now = 1000
    counters: dict = {}  # (key, direction) -> (bytes, packets) cumulative
    deltas: dict = {}  # conn_id -> {direction: [bytes, packets]} this interval
    for t in trackers:
        t.begin_interval(now)
    for op in ops:
        if op[0] == "register":
            key, src, dst = op[1], op[2], op[3]
            results = [t.register(KEYS[key], bytes([key]) * 16, src, 40000 + key, dst, 80, f"fe{key % 3}", now)
                       for t in trackers]
            assert len(set(results)) == 1
            if results[0] and bytes([key]) * 16 not in deltas:
                deltas[bytes([key]) * 16] = {DIR_IN: [0, 0], DIR_OUT: [0, 0]}
        elif op[0] == "update":
            _, key, direction, more_bytes, more_packets = op
            b, p = counters.get((key, direction), (0, 0))
            b, p = b + more_bytes, p + more_packets
            results = [t.update(KEYS[key], direction, b, p, now, 0) for t in trackers]
            assert len(set(results)) == 1
            if results[0]:
                counters[(key, direction)] = (b, p)
                d = deltas[bytes([key]) * 16][direction]
                d[0] += more_bytes
                d[1] += more_packets
        elif op[0] == "defer":  # leave it out of publish(now) while quiet, until now + offset
            for t in trackers:
                t.set_publish_after(KEYS[op[1]], max(0, now + op[2]))
        elif op[0] == "hint":
            _, k, lease_ms, source, level, anomaly, lease_source = op
            results = [t.set_hint(bytes([k]) * 16, lease_ms, source, level, anomaly, now, 30000, lease_source)
                       for t in trackers]
            assert set(results) == {KEYS[k] in trackers[0] if k < 8 else False}
        elif op[0] == "close":
            results = [t.close(KEYS[op[1]], now) for t in trackers]
            assert len(set(results)) == 1
            if results[0]:
                counters.pop((op[1], DIR_IN), None)
                counters.pop((op[1], DIR_OUT), None)
                deltas.pop(bytes([op[1]]) * 16, None)
        else:
            for t in trackers:
                t.end_interval(now)
            snapshots = [[t.snapshot(k) for k in sorted(t.keys())] for t in trackers]
            assert snapshots[0] == snapshots[1]
            check_invariants(trackers[0], snapshots[0], deltas)
            assert trackers[0].keys() == trackers[1].keys()
            assert [t.hint(k) for k in KEYS for t in trackers[:1]] == [trackers[1].hint(k) for k in KEYS]
            assert trackers[0].total_segments == trackers[1].total_segments
            assert trackers[0].total_segments <= trackers[0].max_total_segments
            published = [t.publish(now) for t in trackers[:2]]
            assert published[0] == published[1]
            wire = [outcome(encode_packet, HEADER, published[0], WIRE_KEY)]
            wire += [outcome(lambda t: encode_batch(HEADER, t.publish_batch(now), WIRE_KEY), t) for t in trackers[2:]]
            assert wire[0] == wire[1] == wire[2]
            # deferral never holds back a connection that moved something this interval
            live = {rec.conn_id for rec in snapshots[0]}
            active = {cid for cid, d in deltas.items() if cid in live and any(b or p for b, p in d.values())}
            assert active <= {rec.conn_id for rec in published[0]}
            for key in list(counters):
                if KEYS[key[0]] not in trackers[0]:  # expired
                    counters.pop(key)
            now += op[1]
            for t in trackers:
                t.begin_interval(now)
            deltas = {cid: {DIR_IN: [0, 0], DIR_OUT: [0, 0]} for cid in deltas}
    assert all(t.stats == trackers[0].stats for t in trackers)
    final = [t.publish() for t in trackers]
    assert all(f == final[0] for f in final)


@pytest.fixture
def tracker_cls(tracker_impl):
    return tracker_impl.SegmentTracker


@pytest.fixture(scope="session")
def both_trackers(compiled_tracker):
    """The compiled and the pure-Python SegmentTracker, for differential tests."""
    return [compiled_tracker.SegmentTracker, _tracker_py.SegmentTracker]


def test_bytes_fill_segments_of_the_base_size(tracker_cls):
    t = tracker_cls(segment_size=1 << 20, split_bytes=1 << 40)
    t.register(K, b"c" * 16, "10.0.0.1", 1, "10.0.0.2", 80, "fe", 0)
    t.begin_interval(0)
    t.update(K, DIR_OUT, 3 * (1 << 20) + 5, 300, 10, 0)
    segs = [s for s in t.snapshot(K).segments if s.direction == DIR_OUT]
    assert [s.byte_count for s in segs] == [1 << 20, 1 << 20, 1 << 20, 5]
    assert sum(s.packets_transferred for s in segs) == 300


def test_packets_are_shared_in_proportion_to_bytes(tracker_cls):
    t = tracker_cls(segment_size=100, min_segment_size=10, max_segment_size=1000, split_bytes=1 << 40)
    t.register(K, b"c" * 16, "10.0.0.1", 1, "10.0.0.2", 80, "fe", 0)
    t.begin_interval(0)
    t.update(K, DIR_IN, 50, 0, 1, 0)
    t.begin_interval(1)
    # 150 new bytes: 50 top up the first segment, 100 fill the second: 1/3, 2/3
    t.update(K, DIR_IN, 200, 10, 2, 0)
    segs = [s for s in t.snapshot(K).segments if s.direction == DIR_IN]
    assert [s.bytes_transferred for s in segs] == [50, 100]
    # 10 * 50/150 = 3.33 -> 3, 10 * 100/150 = 6.67 -> 6, the extra one to the larger remainder
    assert [s.packets_transferred for s in segs] == [3, 7]


def test_packets_without_bytes_go_to_the_tail(tracker_cls):
    t = tracker_cls()
    t.register(K, b"c" * 16, "10.0.0.1", 1, "10.0.0.2", 80, "fe", 0)
    t.begin_interval(0)
    t.update(K, DIR_IN, 0, 4, 1, 0)
    segs = t.snapshot(K).segments
    assert [s.packets_transferred for s in segs if s.direction == DIR_IN] == [4]


def test_hot_tail_splits_and_idle_segments_merge(tracker_cls):
    t = tracker_cls(segment_size=1 << 20, min_segment_size=64 << 10, max_segment_size=16 << 20,
                    split_bytes=256 << 10, idle_ms=1000)
    t.register(K, b"c" * 16, "10.0.0.1", 1, "10.0.0.2", 80, "fe", 0)
    t.begin_interval(0)
    t.update(K, DIR_OUT, 600 << 10, 500, 900, 0)
    t.end_interval(1000)
    rec = t.snapshot(K)
    out = [s for s in rec.segments if s.direction == DIR_OUT]
    assert rec.granularity_level == 1
    assert [(s.start_byte_offset, s.byte_count, s.level) for s in out] == [(0, 512 << 10, 1), (512 << 10, 88 << 10, 1)]
    assert sum(s.packets_transferred for s in out) == 500
    # new data now uses the finer size
    t.begin_interval(1000)
    t.update(K, DIR_OUT, 2 << 20, 1500, 1900, 0)
    assert all(s.byte_count <= 512 << 10 for s in t.snapshot(K).segments)
    # then quiet: full idle neighbours merge, the level coarsens
    for now in range(2000, 9000, 1000):
        t.begin_interval(now)
        t.end_interval(now + 999)
    rec = t.snapshot(K)
    out = [s for s in rec.segments if s.direction == DIR_OUT]
    assert len(out) <= 2 and sum(s.byte_count for s in out) == 2 << 20
    assert rec.granularity_level < 1
    assert t.stats["splits"] >= 1 and t.stats["merges"] >= 1


def test_segment_bound_coarsens_without_losing_bytes(tracker_cls):
    t = tracker_cls(segment_size=1024, min_segment_size=1024, max_segment_size=4096,
                    max_segments_per_connection=8, split_bytes=1 << 40)
    t.register(K, b"c" * 16, "10.0.0.1", 1, "10.0.0.2", 80, "fe", 0)
    t.begin_interval(0)
    t.update(K, DIR_OUT, 100 * 1024, 100, 5, 0)
    rec = t.snapshot(K)
    assert len(rec.segments) <= 8
    assert sum(s.byte_count for s in rec.segments) == 100 * 1024
    assert sum(s.bytes_transferred for s in rec.segments) == 100 * 1024
    assert t.stats["coarsened"] > 0


def test_counter_going_backwards_is_counted_not_subtracted(tracker_cls):
    t = tracker_cls()
    t.register(K, b"c" * 16, "10.0.0.1", 1, "10.0.0.2", 80, "fe", 0)
    t.update(K, DIR_IN, 1000, 10, 1, 0)
    t.update(K, DIR_IN, 10, 1, 2, 0)
    assert t.stats["counter_resets"] == 1
    assert t.snapshot(K).bytes_in_total == 1000


def test_close_publishes_a_final_record_once(tracker_cls):
    t = tracker_cls()
    t.register(K, b"c" * 16, "10.0.0.1", 1, "10.0.0.2", 80, "fe", 0)
    t.update(K, DIR_IN, 1000, 10, 1, 0)
    assert t.close(K, 5)
    first = t.publish()
    assert len(first) == 1 and first[0].flags & ConnFlags.CLOSED and first[0].bytes_in_total == 1000
    assert t.publish() == []
    assert K not in t


def test_unseen_connections_expire(tracker_cls):
    t = tracker_cls(expire_ms=1000)
    t.register(K, b"c" * 16, "10.0.0.1", 1, "10.0.0.2", 80, "fe", 0)
    t.end_interval(500)
    assert K in t
    t.end_interval(1000)
    recs = t.publish()
    assert K not in t and recs[0].flags & ConnFlags.EXPIRED


def test_touch_batch_keeps_connections_alive_like_touch(tracker_cls):
    batch, single = tracker_cls(expire_ms=1000), tracker_cls(expire_ms=1000)
    for t in (batch, single):
        for k in (1, 2):
            t.register(KEYS[k], bytes([k]) * 16, "10.0.0.1", k, "10.0.0.2", 80, "fe", 0)
    batch.touch_batch((KEYS[1], b"unknown"), 600)  # any sequence; unknown keys are no error
    single.touch(KEYS[1], 600)
    single.touch(b"unknown", 600)
    for t in (batch, single):
        t.touch_batch([KEYS[1]], 100)  # never back in time
        t.end_interval(1000)
        assert KEYS[1] in t and KEYS[2] not in t
        t.end_interval(1599)
        assert KEYS[1] in t
        t.end_interval(1600)
        assert KEYS[1] not in t


def test_reused_four_tuple_closes_the_old_connection(tracker_cls):
    t = tracker_cls()
    t.register(K, b"a" * 16, "10.0.0.1", 1, "10.0.0.2", 80, "fe", 0)
    t.register(K, b"b" * 16, "10.0.0.1", 1, "10.0.0.2", 80, "fe", 1)
    recs = t.publish()
    assert [(r.conn_id[:1], bool(r.flags & ConnFlags.CLOSED)) for r in recs] == [(b"b", False), (b"a", True)]


def test_connection_limit_refuses_and_counts(tracker_cls):
    t = tracker_cls(max_connections=2)
    assert t.register(KEYS[1], b"a" * 16, "192.0.2.1", 1, "192.0.2.2", 2, "fe", 0)
    assert t.register(KEYS[2], b"b" * 16, "192.0.2.1", 1, "192.0.2.2", 2, "fe", 0)
    assert not t.register(KEYS[3], b"c" * 16, "192.0.2.1", 1, "192.0.2.2", 2, "fe", 0)
    assert t.stats["refused"] == 1 and len(t) == 2


def test_share_is_identical_in_both_twins(compiled_tracker):
    cases = [(10, [1, 2]), (7, [0, 3, 3]), (1, [5, 5]), (2**40, [2**40, 3, 2**50]), (0, [1]), (5, [0, 0])]
    for total, weights in cases:
        assert compiled_tracker.share_py(total, weights) == _tracker_py.share(total, weights)
        assert sum(_tracker_py.share(total, weights)) == (total if any(weights) else 0)


def test_compiled_tracker_loaded():
    import os

    from spoa.servernode import tracker

    if os.environ.get("SPOA_NO_EXTENSIONS", "") in ("", "0"):
        assert tracker.IMPLEMENTATION == "cython"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3 << 20), st.integers(0, 500)), max_size=40))
def test_update_batch_equals_one_update_at_a_time(both_trackers, steps):
    from array import array

    results = []
    for cls in both_trackers:
        for batched in (True, False):
            t = small_tracker(cls, max_connections=10)
            for k in range(4):  # keys 4 and 5 stay unknown
                t.register(KEYS[k], bytes([k]) * 16, "192.0.2.1", 1, "2001:db8::2", 2, "fe", 0)
            totals: dict = {}
            keys, byts, pkts = [], [], []
            for key, more_bytes, more_packets in steps:
                b, p = totals.get(key, (0, 0))
                totals[key] = (b + more_bytes, p + more_packets)
                keys.append(KEYS[key])
                byts.append(totals[key][0])
                pkts.append(totals[key][1])
            if batched:
                known = t.update_batch(keys, DIR_OUT, array("Q", byts), array("Q", pkts),
                                       array("q", [7] * len(keys)), 0)
            else:
                known = sum(t.update(k, DIR_OUT, b, p, 7, 0) for k, b, p in zip(keys, byts, pkts))
            results.append((known, [t.snapshot(KEYS[k]) for k in range(4)], t.stats))
    assert all(r == results[0] for r in results)


def test_publish_now_leaves_out_quiet_deferred_connections_only(tracker_cls):
    t = small_tracker(tracker_cls)
    for k in (1, 2, 3):
        t.register(KEYS[k], bytes([k]) * 16, "192.0.2.1", 40000 + k, "192.0.2.2", 80, "fe", 1000)
        t.set_publish_after(KEYS[k], 5000)
    t.begin_interval(1000)
    t.update(KEYS[2], DIR_OUT, 100, 1, 1000, 0)  # active: goes out whatever its deferral
    t.close(KEYS[3], 1000)  # final: goes out whatever its deferral
    t.end_interval(1000)
    ids = [r.conn_id for r in t.publish(4999)]
    assert ids == [bytes([2]) * 16, bytes([3]) * 16]
    assert t.stats["deferred"] == 1
    t.begin_interval(1000)
    assert [r.conn_id for r in t.publish(5000)] == [bytes([1]) * 16, bytes([2]) * 16]  # its time has come
    t.set_publish_after(KEYS[1], 10_000)
    assert [r.conn_id for r in t.publish()] == [bytes([1]) * 16, bytes([2]) * 16]  # no now: everything


@pytest.mark.parametrize(("requested", "error"), [(-1, ValueError), (1 << 32, ValueError), (1.5, TypeError)])
def test_lease_durations_are_u32_in_both_twins(tracker_cls, requested, error):
    t = small_tracker(tracker_cls)
    with pytest.raises(error, match="requested_ms"):
        t.set_lease(KEYS[1], requested, 0, 0)
    t.set_lease(KEYS[1], (1 << 32) - 1, 0, 0)  # unknown key: ignored once the values are valid


def test_hints_are_found_by_connection_id_and_kept_per_connection(tracker_cls):
    t = small_tracker(tracker_cls, max_connections=100)
    for k in range(40):  # past the first table sizes: the id index grows with the key table
        t.register(bytes([k + 1]) * 3, bytes([k]) * 16, "192.0.2.1", 40000 + k, "192.0.2.2", 80, "fe", 1000)
    assert all(t.set_hint(bytes([k]) * 16, 5000 + k, 1, k % 4, k % 2, 1500, 5000 + k, 1) for k in range(40))
    assert [t.hint(bytes([k + 1]) * 3) for k in (0, 39)] == [(5000, 1, 0, 0, 1500), (5039, 1, 3, 1, 1500)]
    rec = t.snapshot(bytes([40]) * 3)
    assert (rec.requested_lease_ms, rec.predicted_lease_ms, rec.lease_source) == (5039, 5039, 1)
    assert not t.set_hint(b"?" * 16, 5000, 1, 0, False, 1500, 5000, 1)  # no such connection
    t.register(b"new", bytes([39]) * 16, "192.0.2.1", 1, "192.0.2.2", 80, "fe", 1600)  # the same id again
    assert t.hint(b"new") is None  # a new connection: no hint yet
    t.set_hint(bytes([39]) * 16, 9000, 1, 0, False, 1700, 9000, 1)  # the later registration takes it
    assert t.hint(b"new")[0] == 9000 and t.hint(bytes([40]) * 3)[0] == 5039
    t.close(bytes([40]) * 3, 1800)  # the older one closing leaves the id with the newer
    assert t.set_hint(bytes([39]) * 16, 9100, 1, 0, False, 1800, 9100, 1) and t.hint(b"new")[0] == 9100
    t.close(b"new", 1900)
    assert not t.set_hint(bytes([39]) * 16, 9100, 1, 0, False, 1900, 9100, 1)
    t.register(bytes([1]) * 3, bytes([77]) * 16, "192.0.2.1", 40000, "192.0.2.2", 80, "fe", 2000)  # 4-tuple reused
    assert t.hint(bytes([1]) * 3) is None and not t.set_hint(bytes([0]) * 16, 1, 1, 0, False, 2000, 1, 1)


def test_a_predicted_lease_refreshes_a_quiet_connection_on_its_cadence(tracker_cls):
    t = small_tracker(tracker_cls, expire_ms=10**9)
    t.set_refresh(1000, 0.34, 5000)
    for k in (1, 2):
        t.register(KEYS[k], bytes([k]) * 16, "192.0.2.1", 40000 + k, "192.0.2.2", 80, "fe", 0)
    t.set_hint(bytes([1]) * 16, 6000, 1, 0, False, 0, 6000, 1)  # predicted, never published: every interval
    t.set_hint(bytes([2]) * 16, 6000, 2, 0, False, 0, 30000, 2)  # fallback: every interval

    def published(now):
        t.begin_interval(now)
        t.end_interval(now)
        return [r.conn_id[0] for r in t.publish(now)]

    assert published(1000) == [1, 2]  # then every ceil(6000 * 0.34) = 2041 ms (float), until 0 + 5000 + 1
    assert published(2000) == [2] and published(3040) == [2] and published(3041) == [1, 2]
    assert published(5000) == [2] and published(5001) == [1, 2]  # the hint went stale: every interval
    assert published(5002) == [1, 2]
    t.set_hint(bytes([1]) * 16, 100, 1, 0, False, 6000, 100, 1)  # short lease: the interval bounds it
    assert published(6001) == [2] and published(6002) == [1, 2]  # 5002 + 1000
    assert t.stats["deferred"] == 4


@pytest.mark.parametrize("trouble", ["two_families", "long_frontend", "negative_stamp", "none"])
def test_publish_batch_writes_what_encode_packet_writes_and_fails_alike(both_trackers, trouble):
    """Wire form from the slab against records + encode_packet, on trackers fed alike (compiled
    and twin, each both ways): the same datagrams, or the same error for a record the wire cannot
    carry; either way every due connection counts as published and the closed ones are gone."""
    def fed(cls):
        t = small_tracker(cls, max_connections=50, max_total_segments=400)
        t.set_refresh(50, 0.34, 300)
        for i in range(20):
            v6 = i % 4 == 0
            src, dst = (f"2001:db8::{i + 1:x}", "2001:db8::ff") if v6 else (f"10.0.0.{i + 1}", "10.0.1.1")
            if trouble == "two_families" and i == 7:
                dst = "2001:db8::ff"
            frontend = "é" * 128 if trouble == "long_frontend" and i == 9 else f"fe{i % 3}"
            key = pack_key(dst, 443, src, 2000 + i)
            t.register(key, bytes([i + 1]) * 16, src, 2000 + i, dst, 443, frontend, 1000)
            t.update(key, DIR_IN, 100_000 * i, 10 * i, -5 if trouble == "negative_stamp" and i == 11 else 1000, 1)
            t.update(key, DIR_OUT, 300_000 * i, 20 * i, 1000, 1)
        t.set_hint(bytes([3]) * 16, 60_000, 1, 0, 0, 1000, 30_000, 1)
        t.close(t.keys()[5], 1000)
        t.end_interval(1000)
        return t
    for cls in both_trackers:
        by_records, by_wire = fed(cls), fed(cls)
        expected = outcome(lambda: encode_packet(HEADER, by_records.publish(1100), WIRE_KEY))
        got = outcome(lambda: encode_batch(HEADER, by_wire.publish_batch(1100), WIRE_KEY))
        assert got == expected
        assert isinstance(got, tuple) == (trouble != "none")
        assert by_wire.publish(1200) == by_records.publish(1200)  # the same slab state after
        assert by_wire.stats == by_records.stats
