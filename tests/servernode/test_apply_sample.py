"""SegmentTracker.apply_sample: the kernel sample joined to the tracker in one call.

Random sequences (registrations with IPv4 and IPv6 keys, samples that miss
some tracked connections, carry untracked keys, closing states and counter
resets, close_missing both ways, intervals) drive both twins side by side:
their results, published records and stats must be equal. The agent's path
(LeaseModule._apply_kernel_sample) is held to the Python join it replaced,
kept here as the reference. Bad input: a clear error, nothing applied.
"""

from __future__ import annotations

import collections
import types
from array import array
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spoa.servernode import _tracker_py
from spoa.servernode.lease_module import _CLOSING_STATES, LeaseModule, LeaseSettings
from spoa.servernode.sampler import TcpSample
from spoa.wire.records import DIR_IN, DIR_OUT, ConnFlags, CounterSource, pack_key

from tests.conftest import compiled_fixture, twin_fixture

tracker_impl = twin_fixture("tracker")
compiled_tracker = compiled_fixture("tracker")
KERNEL = CounterSource.KERNEL
CLOSING = _CLOSING_STATES


def endpoint(i: int) -> tuple[str, str]:
    """(client address, frontend address) of connection i: IPv4 for even i, IPv6 for odd."""
    if i % 2:
        return f"2001:db8::{i:x}", "2001:db8::1"
    return f"10.0.{i >> 8 & 255}.{i & 255}", "198.51.100.1"


def key_of(i: int) -> bytes:
    client, frontend = endpoint(i)
    return pack_key(frontend, 443, client, 40000 + i)


def register(tracker, i: int, now: int) -> bool:
    client, frontend = endpoint(i)
    return tracker.register(key_of(i), i.to_bytes(16, "big"), client, 40000 + i, frontend, 443, "fe", now)


def sample_of(key: bytes, state: int, received: int, acked: int, segs_in: int, segs_out: int,
              recv_ago: int = 0, sent_ago: int = 0) -> TcpSample:
    return TcpSample(key=key, state=state, bytes_received=received, bytes_acked=acked, segs_in=segs_in,
                     segs_out=segs_out, data_segs_in=segs_in, data_segs_out=segs_out,
                     last_data_recv_ms=recv_ago, last_data_sent_ms=sent_ago, rtt_us=100)


def small(cls):
    return cls(segment_size=64 << 10, min_segment_size=8 << 10, max_segment_size=512 << 10, split_bytes=16 << 10,
               idle_ms=100, max_segments_per_connection=8, max_total_segments=400, max_connections=40,
               expire_ms=5000)


@pytest.fixture(scope="session")
def both_trackers(compiled_tracker):
    return [compiled_tracker.SegmentTracker, _tracker_py.SegmentTracker]


# A step: register connections, or take a sample of some of them, or end the interval.
#   ("register", [i...])
#   ("sample", {i: (state, more_in, more_out, more_segs, reset, recv_ago, sent_ago)}, untracked [j...],
#    close_missing)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("register"), st.lists(st.integers(0, 30), max_size=8)),
        st.tuples(
            st.just("sample"),
            st.dictionaries(st.integers(0, 30), st.tuples(
                st.sampled_from([1, 1, 1, 4, 5, 8, 9, 11, 2, 3]), st.integers(0, 200 << 10),
                st.integers(0, 200 << 10), st.integers(0, 50), st.booleans(), st.integers(0, 3000),
                st.integers(0, 3000)), max_size=20),
            st.lists(st.integers(100, 120), max_size=3),
            st.booleans(),
        ),
        st.tuples(st.just("tick"), st.integers(1, 2000)),
    ),
    max_size=30,
)


def build_sample(spec, untracked, counters):
    """The TcpSample dict of one step; counters[(i)] = cumulative (in, out, segs), advanced here."""
    sample = {}
    for i, (state, more_in, more_out, more_segs, reset, recv_ago, sent_ago) in spec.items():
        b_in, b_out, segs = (0, 0, 0) if reset else counters.get(i, (0, 0, 0))
        counters[i] = (b_in + more_in, b_out + more_out, segs + more_segs)
        sample[key_of(i)] = sample_of(key_of(i), state, counters[i][0], counters[i][1], counters[i][2],
                                      counters[i][2] // 2, recv_ago, sent_ago)
    for j in untracked:
        sample[key_of(j)] = sample_of(key_of(j), 1, 5, 5, 1, 1)
    return sample


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_twins_agree(both_trackers, ops):
    trackers = [small(cls) for cls in both_trackers]
    now = 10_000
    counters: dict = {}
    for t in trackers:
        t.begin_interval(now)
    for op in ops:
        if op[0] == "register":
            for i in op[1]:
                assert len({register(t, i, now) for t in trackers}) == 1
        elif op[0] == "sample":
            _, spec, untracked, close_missing = op
            sample = build_sample(spec, untracked, counters)
            tracked = set(trackers[0].keys())
            results = [t.apply_sample(sample, now, KERNEL, CLOSING, close_missing) for t in trackers]
            assert results[0] == results[1]
            known, closed = results[0]
            assert known == len(tracked & sample.keys())
            assert closed == (len(tracked) - known if close_missing or known else 0)
            assert trackers[0].keys() == trackers[1].keys()
            assert [t.snapshot(k) for t in trackers[:1] for k in t.keys()] == [
                trackers[1].snapshot(k) for k in trackers[1].keys()]
        else:
            for t in trackers:
                t.end_interval(now)
            published = [t.publish(now) for t in trackers]
            assert published[0] == published[1]
            now += op[1]
            for t in trackers:
                t.begin_interval(now)
        assert trackers[0].stats == trackers[1].stats
        assert trackers[0].total_segments == trackers[1].total_segments
    final = [t.publish() for t in trackers]
    assert final[0] == final[1]


def test_apply_sample_rules(tracker_impl):
    t = small(tracker_impl.SegmentTracker)
    for i in range(4):
        register(t, i, 1000)
    untracked = key_of(9)
    sample = {key_of(1): sample_of(key_of(1), 8, 700, 900, 3, 2, 10, 20),
              key_of(3): sample_of(key_of(3), 1, 70, 90, 1, 1),
              untracked: sample_of(untracked, 1, 1, 1, 1, 1)}
    # close_missing false and none found: nothing closes
    assert t.apply_sample({untracked: sample[untracked]}, 1500, KERNEL, CLOSING, False) == (0, 0)
    assert len(t) == 4 and t.stats["unknown_updates"] == 0
    # found ones update; then the missing 0 and 2 close, in registration order
    assert t.apply_sample(sample, 2000, KERNEL, CLOSING, False) == (2, 2)
    assert t.keys() == [key_of(1), key_of(3)]
    rec = t.snapshot(key_of(1))
    assert (rec.bytes_in_total, rec.bytes_out_total, rec.counter_source) == (700, 900, KERNEL)
    assert rec.flags & ConnFlags.CLOSING and not t.snapshot(key_of(3)).flags & ConnFlags.CLOSING  # 8: CLOSE_WAIT
    seg_in = [s for s in rec.segments if s.direction == DIR_IN][0]
    seg_out = [s for s in rec.segments if s.direction == DIR_OUT][0]
    assert (seg_in.packets_transferred, seg_in.timestamp_last_activity_ms) == (3, 1990)
    assert (seg_out.packets_transferred, seg_out.timestamp_last_activity_ms) == (2, 1980)
    final = t.publish()[-2:]
    assert [r.conn_id for r in final] == [(0).to_bytes(16, "big"), (2).to_bytes(16, "big")]
    assert t.stats["closed"] == 2
    # close_missing true: an empty sample closes everything
    assert t.apply_sample({}, 3000, KERNEL, CLOSING, True) == (0, 2)
    assert len(t) == 0


def test_touch_keeps_sampled_connections_from_expiring(tracker_impl):
    t = tracker_impl.SegmentTracker(expire_ms=1000)
    register(t, 0, 0)
    register(t, 1, 0)
    # counters that never move, last data long ago: only the touch keeps them alive
    sample = {key_of(i): sample_of(key_of(i), 1, 0, 0, 0, 0, 4_000_000, 4_000_000) for i in (0, 1)}
    for now in range(500, 5000, 500):
        assert t.apply_sample(sample, now, KERNEL, CLOSING, True) == (2, 0)
        t.end_interval(now)
    assert len(t) == 2


def test_counter_resets_are_counted_as_update_batch_counts_them(both_trackers):
    results = []
    for cls in both_trackers:
        for joined in (True, False):
            t = small(cls)
            register(t, 0, 0)
            register(t, 1, 0)
            for received in (5000, 100, 300):  # 100 < 5000: a reset
                sample = {key_of(i): sample_of(key_of(i), 1, received, received * 2, 9, 9) for i in (0, 1)}
                if joined:
                    t.apply_sample(sample, 10, KERNEL, CLOSING, False)
                else:
                    keys = list(sample)
                    t.update_batch(keys, DIR_IN, array("Q", [received] * 2), array("Q", [9] * 2),
                                   array("q", [10] * 2), KERNEL)
                    t.update_batch(keys, DIR_OUT, array("Q", [received * 2] * 2), array("Q", [9] * 2),
                                   array("q", [10] * 2), KERNEL)
                    t.touch_batch(keys, 10)
            results.append((t.publish(), t.stats))
    assert results[0][1]["counter_resets"] == 4
    assert all(r == results[0] for r in results)


def test_many_connections_with_prefetching_on_and_off(compiled_tracker):
    """Past the table's growth and the prefetch pipeline's depth; the window changes nothing."""
    records = []
    for window in (16, 0, 1, 31):
        previous = compiled_tracker.set_prefetch_window(window)
        try:
            for cls in (compiled_tracker.SegmentTracker, _tracker_py.SegmentTracker):
                t = cls(max_connections=5000)
                for i in range(3000):
                    register(t, i, 0)
                sample = {key_of(i): sample_of(key_of(i), 1 if i % 7 else 8, i * 10, i * 20, i % 13, i % 11)
                          for i in range(3000) if i % 5}
                sample.update({key_of(i): sample_of(key_of(i), 1, 1, 1, 1, 1) for i in range(5000, 5100)})
                assert t.apply_sample(sample, 50, KERNEL, CLOSING, False) == (2400, 600)
                records.append((t.publish(), t.stats))
        finally:
            compiled_tracker.set_prefetch_window(previous)
    assert all(r == records[0] for r in records)


# -- values of other types -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class OtherSlots:
    """Slots in another order: the offsets are learnt per type."""

    last_data_sent_ms: int
    last_data_recv_ms: int
    data_segs_out: int
    data_segs_in: int
    bytes_acked: int
    bytes_received: int
    state: int


class OverriddenState(TcpSample):
    """A subclass whose attribute lookup says otherwise than its slots: read as Python reads it."""

    __slots__ = ()

    def __getattribute__(self, name):
        return 8 if name == "state" else super().__getattribute__(name)


def test_values_of_other_types_are_read_by_their_attributes(both_trackers):
    base = sample_of(b"", 1, 1000, 2000, 3, 4, 5, 6)
    fields = _tracker_py.SAMPLE_FIELDS
    values = {name: getattr(base, name) for name in fields}
    kinds = [
        lambda key: OtherSlots(**values),
        lambda key: types.SimpleNamespace(**values),
        lambda key: collections.namedtuple("Row", fields)(**values),
        lambda key: OverriddenState(**{f: getattr(base, f) for f in TcpSample.__slots__ if f != "key"}, key=key),
        lambda key: replace(base, key=key),
    ]
    results = []
    for cls in both_trackers:
        t = small(cls)
        for i in range(len(kinds)):
            register(t, i, 0)
        # the kinds interleaved: the compiled twin switches between types
        sample = {key_of(i): kinds[i % len(kinds)](key_of(i)) for i in range(len(kinds))}
        assert t.apply_sample(sample, 100, KERNEL, CLOSING, False) == (len(kinds), 0)
        assert t.apply_sample(sample, 200, KERNEL, CLOSING, False) == (len(kinds), 0)
        results.append(t.publish())
    assert results[0] == results[1]
    flags = [r.flags & ConnFlags.CLOSING for r in results[0]]
    assert flags == [0, 0, 0, ConnFlags.CLOSING, 0]  # the overridden state 8 (CLOSE_WAIT) is closing
    assert {(r.bytes_in_total, r.bytes_out_total) for r in results[0]} == {(1000, 2000)}


# -- bad input -------------------------------------------------------------------------------------

GOOD = sample_of(key_of(0), 1, 10, 20, 1, 1)
U64 = 2**64 - 1
BAD = [
    ([(key_of(0), GOOD)], None, TypeError, "sample must be a dict, not list"),
    ({"k": GOOD}, None, TypeError, "sample keys must be bytes, not str"),
    ({key_of(5): object()}, None, TypeError, f"sample value of key {key_of(5).hex()} has no state: object"),
    ({key_of(5): replace(GOOD, state=256)}, None, ValueError, "state of the sample of key"),
    ({key_of(5): replace(GOOD, bytes_received=-1)}, None, ValueError, "bytes_received of the sample of key"),
    ({key_of(5): replace(GOOD, bytes_acked=U64 + 1)}, None, ValueError, f"must be 0..{U64}, got {U64 + 1}"),
    ({key_of(5): replace(GOOD, data_segs_in=-(2**70))}, None, ValueError, "data_segs_in of"),
    ({key_of(5): replace(GOOD, data_segs_out=1.0)}, None, TypeError, "data_segs_out of the sample of key"),
    ({key_of(5): replace(GOOD, last_data_recv_ms=2**32)}, None, ValueError, "must be 0..4294967295, got 4294967296"),
    ({key_of(5): replace(GOOD, last_data_sent_ms="0")}, None, TypeError, "must be int, not str"),
    ({}, (1, "x"), TypeError, "closing_states must hold ints, not str"),
    ({}, (300,), ValueError, "closing_states must hold 0..255, got 300"),
]


@pytest.mark.parametrize(("bad", "states", "error", "text"), BAD)
def test_bad_input_raises_the_same_error_and_applies_nothing(both_trackers, bad, states, error, text):
    messages = []
    for cls in both_trackers:
        t = small(cls)
        register(t, 0, 0)
        register(t, 1, 0)
        before = (t.snapshot(key_of(0)), t.snapshot(key_of(1)), dict(t.stats))
        sample = bad
        if isinstance(bad, dict):  # good entries first and last: none of them may be applied
            sample = {key_of(0): replace(GOOD, state=8), **bad, key_of(1): GOOD}
        with pytest.raises(error) as caught:
            t.apply_sample(sample, 100, KERNEL, CLOSING if states is None else states, True)
        assert text in str(caught.value)
        messages.append(str(caught.value))
        assert (t.snapshot(key_of(0)), t.snapshot(key_of(1)), t.stats) == before
        assert len(t) == 2
    assert messages[0] == messages[1]


def test_bad_source_is_refused(tracker_impl):
    t = small(tracker_impl.SegmentTracker)
    with pytest.raises(ValueError, match="source must be 0..255"):
        t.apply_sample({}, 0, 256, CLOSING, True)


def test_keys_no_connection_can_have_are_ignored(both_trackers):
    for cls in both_trackers:
        t = small(cls)
        register(t, 0, 0)
        sample = {b"": GOOD, b"x" * 41: GOOD, key_of(0): GOOD}
        assert t.apply_sample(sample, 10, KERNEL, CLOSING, False) == (1, 0)


def test_a_sample_changed_while_read_is_refused(compiled_tracker):
    """A value's attribute code that mutates the dict: the compiled twin must not keep freed keys."""
    t = small(compiled_tracker.SegmentTracker)
    register(t, 0, 0)
    sample: dict = {}

    class Meddling:
        def __getattr__(self, name):
            sample.pop(key_of(1), None)
            sample[b"y" * 36] = GOOD
            return getattr(GOOD, name)

    sample[key_of(0)] = GOOD
    sample[key_of(1)] = Meddling()
    with pytest.raises(RuntimeError, match="the sample changed"):
        t.apply_sample(sample, 10, KERNEL, CLOSING, False)
    assert t.snapshot(key_of(0)).bytes_in_total == 0


# -- the agent's path against the join it replaced -------------------------------------------------

class FakeSampler:
    def __init__(self) -> None:
        self.snapshot: dict = {}

    def set_ports(self, ports) -> None:
        pass

    def sample(self) -> dict:
        return self.snapshot


def old_apply_kernel_sample(module, now):
    """LeaseModule._apply_kernel_sample before apply_sample (commit fe64163), the reference."""
    sample = module.sampler.sample()
    module.stats.samples += 1
    tracker = module.tracker
    kernel = CounterSource.KERNEL
    keys = tracker.keys()
    if not module._kernel_sees_haproxy:
        module._kernel_sees_haproxy = any(key in sample for key in keys)
    present, infos = [], []
    for key in keys:
        info = sample.get(key)
        if info is None:
            if module._kernel_sees_haproxy:
                tracker.close(key, now)
                module.stats.connections_closed += 1
            continue
        present.append(key)
        infos.append(info)
        if info.state in _CLOSING_STATES:
            tracker.set_closing(key)
    if not present:
        return
    tracker.update_batch(present, DIR_IN, array("Q", [i.bytes_received for i in infos]),
                         array("Q", [i.data_segs_in for i in infos]),
                         array("q", [now - i.last_data_recv_ms for i in infos]), kernel)
    tracker.update_batch(present, DIR_OUT, array("Q", [i.bytes_acked for i in infos]),
                         array("Q", [i.data_segs_out for i in infos]),
                         array("q", [now - i.last_data_sent_ms for i in infos]), kernel)
    tracker.touch_batch(present, now)
    module.stats.sources["kernel"] += len(present)


module_steps = st.lists(
    st.one_of(
        st.tuples(st.just("register"), st.lists(st.integers(0, 30), max_size=8)),
        st.tuples(
            st.just("sample"),
            st.dictionaries(st.integers(0, 30), st.tuples(
                st.sampled_from([1, 1, 4, 8, 9, 2]), st.integers(0, 100 << 10), st.integers(0, 100 << 10),
                st.integers(0, 30), st.booleans(), st.integers(0, 2000), st.integers(0, 2000)), max_size=20),
            st.lists(st.integers(100, 120), max_size=3),
            st.just(False),
        ),
    ),
    max_size=25,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(module_steps)
def test_module_path_gives_the_records_of_the_old_join(tracker_impl, ops):
    sampler = FakeSampler()
    modules = [LeaseModule(small(tracker_impl.SegmentTracker), sampler, None, 1000, 1, LeaseSettings())
               for _ in range(2)]
    now = 10_000
    counters: dict = {}
    for op in ops:
        if op[0] == "register":
            for i in op[1]:
                for m in modules:
                    register(m.tracker, i, now)
            continue
        sampler.snapshot = build_sample(op[1], op[2], counters)
        modules[0]._apply_kernel_sample(now)
        old_apply_kernel_sample(modules[1], now)
        for m in modules:
            m.tracker.end_interval(now)
        published = [m.tracker.publish(now) for m in modules]
        assert published[0] == published[1]
        for m in modules:
            m.tracker.begin_interval(now)
        assert modules[0].tracker.stats == modules[1].tracker.stats
        assert modules[0]._kernel_sees_haproxy == modules[1]._kernel_sees_haproxy
        stats = [replace(m.stats, sample_seconds=0.0) for m in modules]
        assert stats[0] == stats[1]
        now += 1000
