"""LB node: columnar ingest (LeaseTable.ingest_batch) and per-segment state.

- a batch of many datagrams leaves the table exactly as ingesting them one
  datagram at a time does (random intervals: new, refreshed, closed, unknown
  closed, repeated reports, lapsed and resumed connections), with either
  SlotMap twin;
- node.columns() (the object path) gives what ColumnBatch decodes;
- the segment history follows splits and merges, restarts reused keys fresh,
  releases with the connection, stays within its capacity, keeps a bounded
  history of each segment's bytes per interval;
- the anomaly detector is fed segment rates and flags the connection owning
  the hot segment.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from spoa.lbnode import _slotmap_py, node, segment_history
from spoa.lbnode.anomaly import AnomalyDetector
from spoa.lbnode.forecast import SES
from spoa.lbnode.lease_policy import LeaseBounds, VolumePolicy
from spoa.lbnode.node import LeaseTable
from spoa.lbnode.segment_history import SegmentHistory
from spoa.wire import _packet_py
from spoa.wire.packet import ColumnBatch, encode_packet
from spoa.wire.records import DIR_IN, DIR_OUT, ConnectionRecord, ConnFlags, PacketHeader, SegmentRecord

KEY = b"k" * 32
BOUNDS = LeaseBounds(min_ms=1000, max_ms=60_000, standard_ms=30_000)
STATE = ("expires", "refreshed_at", "last_total", "volume", "elapsed", "lease", "source", "level", "flagged",
         "refreshed")


@pytest.fixture(params=["compiled", "python"])
def twins(request, monkeypatch):
    if request.param == "python":
        for module in (node, segment_history):
            monkeypatch.setattr(module, "SlotMap", _slotmap_py.SlotMap)
    return request.param


def table(capacity: int = 64, segments: int | None = None, anomaly=None) -> LeaseTable:
    seg_table = SegmentHistory(segments or 4 * capacity, history=4)
    return LeaseTable(capacity, SES(capacity, alpha=0.5), VolumePolicy(BOUNDS, 10.0), BOUNDS.standard_ms, 1000,
                      remember_expired=50, anomaly=anomaly, segments=seg_table)


def record(cid: int, total: int, segs=(), flags: int = 0, frontend: str = "fe") -> ConnectionRecord:
    return ConnectionRecord(conn_id=cid.to_bytes(16, "big"), src="192.0.2.1", src_port=1, dst="192.0.2.2",
                            dst_port=2, frontend=frontend, flags=flags, counter_source=0, granularity_level=cid % 3,
                            requested_lease_ms=0, predicted_lease_ms=0, lease_source=0, bytes_in_total=total // 3,
                            bytes_out_total=total - total // 3, segments=tuple(segs))


def seg(direction: int, start: int, transferred: int) -> SegmentRecord:
    return SegmentRecord(direction, start, 1 << 20, transferred, 1, 1_700_000_000_000 + transferred, 0)


def by_key(t: LeaseTable) -> dict:
    live = np.flatnonzero(t.keys.in_use)
    out = {}
    for slot in live.tolist():
        key = (int(t.node[slot]), t.keys.key_b[slot].tobytes())
        segs = t.segments.of_connection(slot)
        out[key] = (tuple(getattr(t, name)[slot].item() for name in STATE), int(t.class_id[slot]),
                    [(int(t.segments.direction[s]), int(t.segments.start[s]), int(t.segments.byte_count[s]),
                      t.segments.history.series(int(s)).tolist()) for s in segs])
    return out


def scenario(seed: int) -> list[tuple[int, list[tuple[int, list[ConnectionRecord]]]]]:
    """Intervals: (now, [(node_id, records of one packet), ...])."""
    rng = random.Random(seed)
    totals: dict[tuple[int, int], int] = {}
    closed: set[tuple[int, int]] = set()
    intervals = []
    for k in range(12):
        now = 1000 * (k + 1)
        packets = []
        for node_id in (1, 2):
            recs = []
            for cid in range(rng.randrange(4, 20)):
                key = (node_id, cid)
                if key in closed or rng.random() < 0.3:  # silent this interval (may lapse)
                    continue
                totals[key] = totals.get(key, 0) + rng.choice([0, 10, 5000, 100_000])
                flags = ConnFlags.CLOSED if rng.random() < 0.08 else 0
                nseg = rng.randrange(0, 5)
                segs = [seg(j % 2, (j // 2) << rng.randrange(16, 22), rng.randrange(0, 9000)) for j in range(nseg)]
                recs.append(record(cid, totals[key], segs, flags, frontend=f"fe{cid % 3}"))
                if rng.random() < 0.15 and not flags:  # reported twice in the interval
                    totals[key] += 7
                    recs.append(record(cid, totals[key], segs[:1], 0, frontend=f"fe{cid % 3}"))
                if flags:
                    closed.add(key)
            if rng.random() < 0.3:  # a closed report of a connection never held
                recs.append(record(999, 5, (), ConnFlags.CLOSED))
            packets.append((node_id, recs))
        intervals.append((now, packets))
    return intervals


@pytest.mark.parametrize("seed", range(6))
def test_one_batch_equals_one_datagram_at_a_time(twins, seed):
    one, many = table(), table()
    for now, packets in scenario(seed):
        batch = ColumnBatch()
        for node_id, recs in packets:
            header = PacketHeader(node_id=node_id, sequence=now, timestamp_ms=now, interval_ms=1000)
            for d in encode_packet(header, recs, KEY, 600):
                single = ColumnBatch()
                single.append_datagram(d, KEY)
                one.ingest_batch(single, now)
                batch.append_datagram(d, KEY)
        many.ingest_batch(batch, now)
        assert by_key(one) == by_key(many)
        hints_one, hints_many = one.end_interval(now + 900), many.end_interval(now + 900)
        assert sorted(hints_one) == sorted(hints_many)
        for node_id in hints_one:
            assert sorted(hints_one[node_id].tolist()) == sorted(hints_many[node_id].tolist())
        assert one.stats == many.stats
        assert one.recently_expired == many.recently_expired
        assert len(one.segments) == len(many.segments)
    s = many.stats
    assert s.closed and s.expired and s.premature_expiries and s.new_connections and s.refreshes > s.new_connections


def test_object_path_columns_match_the_decoder():
    recs = [record(i, 1000 * i, [seg(DIR_IN, 0, i), seg(DIR_OUT, 1 << 20, 2 * i)], frontend=f"f{i % 2}")
            for i in range(9)]
    batch = _packet_py.ColumnBatch()
    for d in encode_packet(PacketHeader(3, 1, 0, 1000), recs, KEY, 600):
        batch.append_datagram(d, KEY)
    cols = node.columns(3, recs)
    for name in ("node_id", "conn_id", "flags", "frontend", "granularity_level", "bytes_in_total",
                 "bytes_out_total", "seg_start", "direction", "level", "start_byte_offset", "byte_count",
                 "bytes_transferred", "timestamp_last_activity_ms"):
        assert np.array_equal(getattr(cols, name), getattr(batch, name)), name
    assert cols.frontends == batch.frontends and cols.n == batch.n


def slots_of(t: LeaseTable, cid: int) -> list[tuple[int, int, list[float]]]:
    segs = t.segments.of_connection(t.slot(1, cid.to_bytes(16, "big")))
    return [(int(t.segments.direction[s]), int(t.segments.start[s]), int(s)) for s in segs]


def test_segments_follow_splits_and_merges(twins):
    t = table()
    t.ingest(1, [record(1, 10, [seg(DIR_IN, 0, 100), seg(DIR_OUT, 0, 200)])], 1000)
    t.end_interval(1000)
    (_, _, in0), (_, _, out0) = slots_of(t, 1)
    # the out segment splits at 1 MiB: the old start keeps its slot and history
    t.ingest(1, [record(1, 20, [seg(DIR_IN, 0, 1), seg(DIR_OUT, 0, 2), seg(DIR_OUT, 1 << 20, 3)])], 2000)
    t.end_interval(2000)
    got = slots_of(t, 1)
    assert [(d, s) for d, s, _ in got] == [(DIR_IN, 0), (DIR_OUT, 0), (DIR_OUT, 1 << 20)]
    assert got[0][2] == in0 and got[1][2] == out0
    history = t.segments.history
    assert history.series(out0).tolist() == [200, 2] and history.series(got[2][2]).tolist() == [3]
    # merged back: the 1 MiB segment is gone, its slot reclaimed at the interval's end
    t.ingest(1, [record(1, 30, [seg(DIR_IN, 0, 5), seg(DIR_OUT, 0, 6)])], 3000)
    assert [(d, s) for d, s, _ in slots_of(t, 1)] == [(DIR_IN, 0), (DIR_OUT, 0)]  # stale at once
    assert len(t.segments) == 3
    t.end_interval(3000)
    assert len(t.segments) == 2 and t.segments.dropped == 1
    # ... and if it comes back, it starts over
    t.ingest(1, [record(1, 40, [seg(DIR_OUT, 0, 7), seg(DIR_OUT, 1 << 20, 8)])], 4000)
    t.ingest(1, [record(1, 41, [seg(DIR_OUT, 0, 9)])], 4100)
    t.ingest(1, [record(1, 42, [seg(DIR_OUT, 0, 1), seg(DIR_OUT, 1 << 20, 4)])], 4200)  # before any sweep
    t.end_interval(4200)
    (_, _, out), (_, _, back) = slots_of(t, 1)
    assert history.series(out).tolist() == [200, 2, 6, 17] and history.series(back).tolist() == [4]


def test_segments_released_with_their_connection_and_slot_reuse(twins):
    t = table(capacity=1)
    t.ingest(1, [record(1, 10, [seg(DIR_IN, 0, 100)])], 1000)
    t.end_interval(1000)
    t.ingest(1, [record(1, 20, [seg(DIR_IN, 0, 50)], flags=ConnFlags.CLOSED)], 2000)
    assert len(t) == 0
    # the next connection takes slot 0 before the sweep: its segment 0 is its own
    t.ingest(1, [record(2, 5, [seg(DIR_IN, 0, 9)])], 2000)
    t.end_interval(2000)
    ((_, _, s),) = slots_of(t, 2)
    assert t.segments.history.series(s).tolist() == [9] and len(t.segments) == 1
    t.end_interval(10**9)  # lapses
    assert len(t) == 0 and t.stats.expired == 1
    t.end_interval(10**9 + 1)
    assert len(t.segments) == 0


def test_segment_capacity_bounds_and_sweeps_first(twins):
    t = table(capacity=4, segments=3)
    t.ingest(1, [record(1, 1, [seg(DIR_IN, k << 20, 1) for k in range(4)])], 1000)
    assert len(t.segments) == 3 and t.segments.refused == 1
    t.ingest(1, [record(1, 1, [seg(DIR_IN, 0, 1)], flags=ConnFlags.CLOSED)], 1100)
    t.ingest(1, [record(2, 1, [seg(DIR_OUT, k << 20, 1) for k in range(3)])], 1200)  # stale ones make room
    assert t.segments.refused == 1 and len(t.segments) == 3 and len(slots_of(t, 2)) == 3


def test_segment_history_is_a_bounded_ring(twins):
    t = table()
    for k in range(7):
        t.ingest(1, [record(1, 10 * k, [seg(DIR_OUT, 0, 100 + k)])], 1000 * (k + 1))
        t.ingest(1, [record(1, 10 * k + 1, [seg(DIR_OUT, 0, 1)])], 1000 * (k + 1) + 10)  # same interval: summed
        t.end_interval(1000 * (k + 1) + 20)
    ((_, _, s),) = slots_of(t, 1)
    assert t.segments.history.series(s).tolist() == [104, 105, 106, 107]  # history=4 intervals


def test_anomaly_is_decided_on_segment_rates():
    detector = AnomalyDetector(q_high=0.9, factor=2.0, min_samples=20)
    t = table(capacity=64, anomaly=detector)
    recs = [record(i, 0, [seg(DIR_IN, 0, 100), seg(DIR_OUT, 0, 1000)], frontend="web") for i in range(40)]
    t.ingest(1, recs, 1000)
    t.end_interval(1000)
    assert "web/in" in detector and "web/out" in detector and detector.samples("web/out") == 40
    # connection 7: its in segment far above the class; its total (1 MB out elsewhere) is not what counts
    recs = [record(i, 0, [seg(DIR_IN, 0, 100_000 if i == 7 else 100), seg(DIR_OUT, 0, 1000)], frontend="web")
            for i in range(40)]
    t.ingest(1, recs, 2000)
    hints = t.end_interval(2000)[1]
    flagged = {int.from_bytes(h["conn_id"], "big") for h in hints if h["flags"]}
    assert flagged == {7} and t.stats.anomalies == 1


def _grow_scenario(intervals: int = 5, per_interval: int = 1500) -> list[tuple[int, list[ConnectionRecord]]]:
    """Connections arriving faster than the first table size, the early ones refreshed."""
    rng = random.Random(7)
    out = []
    for k in range(intervals):
        recs = [record(cid, 1000 * (k + 1) + cid, [seg(DIR_IN, 0, rng.randrange(9000))])
                for cid in range(per_interval * (k + 1)) if cid % 5 or k % 2]
        out.append((1000 * (k + 1), recs))
    return out


def _run(t: LeaseTable, intervals) -> list:
    hints = []
    for now, recs in intervals:
        batch = ColumnBatch()
        for d in encode_packet(PacketHeader(1, now, now, 1000), recs, KEY, 1400):
            batch.append_datagram(d, KEY)
        t.ingest_batch(batch, now)
        hints.append(sorted(t.end_interval(now + 900).get(1, np.zeros(0)).tolist()))
    return hints


def test_a_table_that_grows_holds_what_a_preallocated_one_does(twins, monkeypatch):
    """Memory follows the connections held: the arrays double from a small
    start, and every connection's state, segments and hints stay as if the
    table had been allocated at its bound."""
    grown = table(10_000, segments=20_000)
    monkeypatch.setattr(node, "INITIAL_CAPACITY", 10_000)
    monkeypatch.setattr(segment_history, "INITIAL_SEGMENTS", 20_000)
    preallocated = table(10_000, segments=20_000)
    assert (grown.capacity, preallocated.capacity) == (1024, 10_000)
    assert _run(grown, _grow_scenario()) == _run(preallocated, _grow_scenario())
    assert by_key(grown) == by_key(preallocated) and grown.stats == preallocated.stats
    assert 6000 <= len(grown) <= grown.capacity == 8192 and grown.segments.capacity == 8192
    assert grown.forecaster.capacity == len(grown.segments.conn_epoch) == len(grown.lease) == 8192


def test_growth_stops_at_the_bound_and_refuses_beyond(twins):
    t = table(1500, segments=3000)
    recs = [record(cid, 100, [seg(DIR_IN, 0, 10)]) for cid in range(2000)]
    batch = ColumnBatch()
    for d in encode_packet(PacketHeader(1, 1, 1, 1000), recs, KEY, 1400):
        batch.append_datagram(d, KEY)
    t.ingest_batch(batch, 1000)
    assert (t.capacity, len(t), t.stats.refused) == (1500, 1500, 500)
