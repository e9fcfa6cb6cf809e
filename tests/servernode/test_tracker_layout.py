"""Segment tracker: what the compiled twin's slab + C hash table must keep equal to the twin.

Hash-table growth and backward-shift deletion under many register/close
cycles, slot reuse keeping registration order, key/address/port validation
with identical errors, update_batch with and without prefetching, frontend
interning and memory_bytes() accounting.
"""

from __future__ import annotations

import random
import sys
import tracemalloc
from array import array

import pytest

from spoa import _accel
from spoa.servernode import _tracker_py
from spoa.wire.records import DIR_IN, DIR_OUT, pack_key

if _accel.NO_EXTENSIONS:  # the compiled tracker's own layout: nothing to test on the twins alone
    pytest.skip("compiled modules disabled (SPOA_NO_EXTENSIONS)", allow_module_level=True)
from spoa.servernode import _tracker  # noqa: E402 - after the switch is honoured

TWINS = {"cython": _tracker.SegmentTracker, "python": _tracker_py.SegmentTracker}


def both(**params):
    return [cls(**params) for cls in TWINS.values()]


def key(i: int) -> bytes:
    return pack_key("192.0.2.10", 443, f"2001:db8::{i & 0xffff:x}", 1024 + (i >> 16))


def outcome(call):
    """(result, None) or (None, (exception class, message)) of call()."""
    try:
        return call(), None
    except Exception as exc:  # the point is comparing them
        return None, (type(exc), str(exc))


@pytest.mark.parametrize("seed", range(4))
def test_register_close_cycles_keep_table_and_order_equal(seed):
    rng = random.Random(seed)
    trackers = both(max_connections=100_000, max_total_segments=1_000_000)
    universe = [key(i) for i in range(3000)]
    live: set[bytes] = set()
    for step in range(20_000):
        k = rng.choice(universe)
        if k in live and rng.random() < 0.55:
            assert [t.close(k, step) for t in trackers] == [True, True]
            live.discard(k)
        else:
            cid = rng.randbytes(16)
            assert [t.register(k, cid, "192.0.2.1", 1, "::1", 80, "fe", step) for t in trackers] == [True, True]
            live.add(k)
        if step % 2500 == 0:  # every key findable, none too many, same order
            assert trackers[0].keys() == trackers[1].keys()
            assert all((k in trackers[0]) == (k in live) for k in universe)
    assert trackers[0].keys() == trackers[1].keys()
    assert len(trackers[0]) == len(live) == len(trackers[1])
    assert all((k in trackers[0]) == (k in live) for k in universe)
    # drain: every deletion shifts probe runs back; all the rest must stay findable
    for i, k in enumerate(sorted(live)):
        assert trackers[0].close(k, 0) and trackers[1].close(k, 0)
        if i % 97 == 0:
            assert all(k2 in trackers[0] for k2 in trackers[1].keys())
    assert len(trackers[0]) == 0 and trackers[0].keys() == []
    published = [t.publish() for t in trackers]
    assert published[0] == published[1]


def test_freed_slots_are_reused_and_order_follows_registration():
    for t in both():
        for k in (b"a", b"b", b"c", b"d"):
            t.register(k, k * 16, "192.0.2.1", 1, "192.0.2.2", 2, "fe", 0)
        before = t.memory_bytes()
        t.close(b"b", 1)
        t.register(b"e", b"e" * 16, "192.0.2.1", 1, "192.0.2.2", 2, "fe", 0)  # b's slot, at the end
        assert t.keys() == [b"a", b"c", b"d", b"e"]
        t.register(b"b", b"B" * 16, "192.0.2.1", 1, "192.0.2.2", 2, "fe", 0)
        t.register(b"a", b"A" * 16, "192.0.2.1", 1, "192.0.2.2", 2, "fe", 0)  # reused 4-tuple: closes a
        t.register(b"c", b"c" * 16, "192.0.2.1", 1, "192.0.2.2", 2, "fe", 5)  # same id: only seen again
        assert t.keys() == [b"c", b"d", b"e", b"b", b"a"]
        assert [r.conn_id[:1] for r in t.publish()] == [b"c", b"d", b"e", b"B", b"A", b"b", b"a"]
        if isinstance(t, _tracker.SegmentTracker):
            assert t.memory_bytes() == before


BAD_KEYS = [None, "text", 7, (1, 2), bytearray(b"k"), memoryview(b"k"), b"", b"x" * 41]


def calls_with(k):
    return {
        "register": lambda t: t.register(k, b"c" * 16, "192.0.2.1", 1, "192.0.2.2", 2, "fe", 0),
        "set_closing": lambda t: t.set_closing(k),
        "set_lease": lambda t: t.set_lease(k, 1, 2, 0),
        "close": lambda t: t.close(k, 0),
        "update": lambda t: t.update(k, DIR_IN, 1, 1, 0, 0),
        "update_batch": lambda t: t.update_batch([b"ok", k], DIR_IN, array("Q", [1, 1]), array("Q", [1, 1]),
                                                 array("q", [0, 0]), 0),
        "touch": lambda t: t.touch(k, 0),
        "touch_batch": lambda t: t.touch_batch([b"ok", k], 0),
        "snapshot": lambda t: t.snapshot(k),
        "contains": lambda t: k in t,
    }


@pytest.mark.parametrize("bad", BAD_KEYS, ids=repr)
def test_bad_keys_raise_the_same_error_everywhere(bad):
    trackers = both()
    for t in trackers:
        t.register(b"ok", b"c" * 16, "192.0.2.1", 1, "192.0.2.2", 2, "fe", 0)
    for name, call in calls_with(bad).items():
        results = [outcome(lambda: call(t)) for t in trackers]
        assert results[0] == results[1], name
        assert results[0][1] is not None and results[0][1][0] in (TypeError, ValueError), name
    # nothing was applied, not even the batch's valid first key
    assert [t.snapshot(b"ok") for t in trackers][0].bytes_in_total == 0
    assert trackers[0].stats == trackers[1].stats


def test_longest_and_shortest_keys_work():
    for t in both():
        for k in (b"\x00", b"\xff" * 40, bytes(36)):
            assert t.register(k, b"c" * 16, "192.0.2.1", 1, "192.0.2.2", 2, "fe", 0)
            assert k in t and t.update(k, DIR_OUT, 5, 1, 1, 0)
        assert t.keys() == [b"\x00", b"\xff" * 40, bytes(36)]
        assert b"\x00\x00" not in t and b"\xff" * 39 not in t


GOOD_ADDRESSES = {
    "192.0.2.1": "192.0.2.1", "0.0.0.0": "0.0.0.0", "255.255.255.255": "255.255.255.255",
    "::ffff:192.0.2.1": "192.0.2.1", "::FFFF:10.1.2.3": "10.1.2.3", "::ffff:c000:0201": "192.0.2.1",
    "2001:DB8:0:0:0:0:0:1": "2001:db8::1", "::": "::", "::1": "::1", "::1.2.3.4": "::1.2.3.4",
    "fe80::1:2:3:4": "fe80::1:2:3:4", "2001:db8:0:1:0:0:0:0": "2001:db8:0:1::",
}
BAD_ADDRESSES = ["", "a", "1.2.3", "1.2.3.4.5", "999.1.1.1", "01.2.3.4x", "1.2.3.4\x00", "::1\x00", "fe80::1%eth0",
                 "2001:db8::g", "\ud800", "１.２.３.４", " 192.0.2.1", None, 1, b"192.0.2.1"]


def test_addresses_come_back_identical_from_both_twins():
    for text, want in GOOD_ADDRESSES.items():
        records = []
        for t in both():
            t.register(b"k", b"c" * 16, text, 1, text, 2, "fe", 0)
            rec = t.snapshot(b"k")
            records.append((rec.src, rec.dst))
        assert records == [(want, want)] * 2, text


@pytest.mark.parametrize("bad", BAD_ADDRESSES, ids=repr)
def test_bad_addresses_raise_the_same_error(bad):
    for position in ("src", "dst"):
        args = {"src": "192.0.2.1", "dst": "::1", position: bad}
        results = [outcome(lambda: t.register(b"k", b"c" * 16, args["src"], 1, args["dst"], 2, "fe", 0))
                   for t in both()]
        assert results[0] == results[1]
        assert results[0][1][0] is (ValueError if isinstance(bad, str) else TypeError)


@pytest.mark.parametrize("call", [
    lambda t: t.register(b"k", b"c" * 16, "192.0.2.1", -1, "::1", 2, "fe", 0),
    lambda t: t.register(b"k", b"c" * 16, "192.0.2.1", 1, "::1", 65536, "fe", 0),
    lambda t: t.register(b"k", b"c" * 16, "192.0.2.1", "80", "::1", 2, "fe", 0),
    lambda t: t.register(b"k", b"c" * 16, "192.0.2.1", 1, "::1", 2, None, 0),
    lambda t: t.register(b"k", "c" * 16, "192.0.2.1", 1, "::1", 2, "fe", 0),
    lambda t: t.register(b"k", b"c" * 15, "192.0.2.1", 1, "::1", 2, "fe", 0),
    lambda t: t.close(b"k", 0, 256),
    lambda t: t.set_lease(b"k", 1, 1, 300),
    lambda t: t.update(b"k", DIR_IN, 1, 1, 1, 256),
    lambda t: t.update(b"k", 2, 1, 1, 1, 0),
    lambda t: t.update_batch([b"k"], DIR_IN, array("Q", [1]), array("Q", [1]), array("q", [1]), -1),
    lambda t: t.set_hint("c" * 16, 1, 1, 0, False, 0, 1, 1),
    lambda t: t.set_hint(b"c" * 15, 1, 1, 0, False, 0, 1, 1),
    lambda t: t.set_hint(b"c" * 16, 1 << 32, 1, 0, False, 0, 1, 1),
    lambda t: t.set_hint(b"c" * 16, 1, 1, 0, False, 0, -1, 1),
    lambda t: t.set_hint(b"c" * 16, 1, 256, 0, False, 0, 1, 1),
    lambda t: t.set_hint(b"c" * 16, 1, 1, 128, False, 0, 1, 1),
    lambda t: t.set_hint(b"c" * 16, 1, 1, 0, False, 0, 1, 256),
    lambda t: t.hint("k"),
])
def test_other_argument_errors_match(call):
    results = []
    for t in both():
        t.register(b"k", b"c" * 16, "192.0.2.1", 1, "::1", 2, "fe", 0)
        results.append(outcome(lambda: call(t)))
    assert results[0] == results[1] and results[0][1] is not None


@pytest.mark.parametrize("window", [0, 1, 5, 12, 31])
def test_update_batch_gives_the_same_result_with_any_prefetch_window(window):
    rng = random.Random(window)
    keys = [key(i) for i in range(500)]
    batches = [rng.sample(keys, 300) for _ in range(3)]  # the last 100 keys stay unknown
    previous = _tracker.set_prefetch_window(window)
    try:
        results = []
        for t in both(max_connections=1000, max_total_segments=100_000, segment_size=4096,
                      min_segment_size=1024, max_segment_size=1 << 20):
            for i, k in enumerate(keys[:400]):
                t.register(k, i.to_bytes(16, "big"), "192.0.2.1", 1, "::1", 2, "fe", 0)
            totals = dict.fromkeys(keys, 0)
            for batch in batches:
                for k in batch:
                    totals[k] += 3000
                t.update_batch(batch, DIR_OUT, array("Q", [totals[k] for k in batch]),
                               array("Q", [totals[k] // 1000 for k in batch]), array("q", [5] * len(batch)), 0)
            results.append((t.publish(), t.stats))
        assert results[0] == results[1]
    finally:
        _tracker.set_prefetch_window(previous)


def test_prefetch_window_bounds():
    with pytest.raises(ValueError):
        _tracker.set_prefetch_window(-1)
    with pytest.raises(ValueError):
        _tracker.set_prefetch_window(32)
    assert _tracker.set_prefetch_window(_tracker.set_prefetch_window(3)) == 3


def test_frontend_names_are_interned():
    t = _tracker.SegmentTracker()
    t.register(key(0), bytes(16), "192.0.2.1", 1, "::1", 2, "frontend-a", 0)
    base = t.memory_bytes()
    for i in range(1, 1000):  # equal names, distinct str objects: one entry
        t.register(key(i), i.to_bytes(16, "big"), "192.0.2.1", 1, "::1", 2, "".join(["frontend-", "a"]), 0)
    assert t.memory_bytes() - base < 24 * 1024  # only the key and id tables grew
    grown = t.memory_bytes()
    for i in range(1000, 1100):
        t.register(key(i), i.to_bytes(16, "big"), "192.0.2.1", 1, "::1", 2, f"frontend-{i}", 0)
    assert t.memory_bytes() - grown >= 100 * 50  # 100 new names, each a str of ~60 bytes
    assert {r.frontend for r in t.publish()} == {"frontend-a"} | {f"frontend-{i}" for i in range(1000, 1100)}


SEGMENT = 48  # bytes of the compiled twin's Segment
ARRAY_16 = 8 + 16 * SEGMENT  # an overflow array: slot-count header + slots
ARRAY_2 = 8 + 2 * SEGMENT
CHUNK = 2 << 20  # a slab chunk: 6,553 320-byte Conns
HINTS = -(-6553 * 24 // 4096) * 4096  # its HintState region, 24 bytes a slot, whole pages


def test_compiled_memory_bytes_accounts_chunks_table_and_overflow():
    t = _tracker.SegmentTracker(segment_size=1024, min_segment_size=1024, max_segment_size=16384, idle_ms=10)
    empty = t.memory_bytes()
    t.register(b"a", bytes(16), "192.0.2.1", 1, "::1", 2, "fe", 0)
    one = t.memory_bytes()
    assert one - empty >= 2 << 20  # the first 2 MiB chunk
    t.update(b"a", DIR_OUT, 10 * 1024, 10, 1, 0)  # 10 segments: an array of 16
    assert t.memory_bytes() - one == ARRAY_16
    t.close(b"a", 2)
    assert t.memory_bytes() == one  # overflow freed; the chunk stays for reuse
    t.register(b"b", bytes(16), "192.0.2.1", 1, "::1", 2, "fe", 0)
    t.update(b"b", DIR_OUT, 10 * 1024, 10, 1, 0)
    assert t.memory_bytes() - one == ARRAY_16
    # full idle neighbours merge back to one segment: inline again, the array freed
    t.begin_interval(100)
    t.end_interval(100)
    assert [s.byte_count for s in t.snapshot(b"b").segments] == [0, 10 * 1024]
    assert t.memory_bytes() == one
    t.update(b"b", DIR_OUT, 12 * 1024, 12, 101, 0)  # and out again (the idle tail coarsened the level)
    assert [s.byte_count for s in t.snapshot(b"b").segments] == [0, 10 * 1024, 2048]
    assert t.memory_bytes() - one == ARRAY_2


def test_compiled_memory_bytes_grows_by_whole_chunks():
    t = _tracker.SegmentTracker(max_connections=20_000)  # 2 MiB // 320 B = 6,553 slots per chunk
    sizes = set()
    for i in range(14_000):
        t.register(key(i), i.to_bytes(16, "big"), "192.0.2.1", 1, "::1", 2, "fe", 0)
        sizes.add(t.memory_bytes())
    chunks = [b - a for a, b in zip(sorted(sizes), sorted(sizes)[1:]) if b - a >= 2 << 20]
    assert len(chunks) == 2  # 14,000 connections: 3 chunks of 6,553 320-byte slots
    # 3 chunks and their hint regions, 14,000 entries at load <= 1/2: 2^15 8-byte
    # key entries and 4-byte id entries; then 8 + 8 chunk pointers and the one frontend name
    tables = 32768 * (8 + 4)
    assert 3 * (CHUNK + HINTS) + tables + 8 * 16 < t.memory_bytes() < 3 * (CHUNK + HINTS) + tables + 1024


def test_a_connection_is_320_bytes_of_slab_and_24_of_hint_state():
    t = _tracker.SegmentTracker(max_connections=20_000)
    for i in range(6553):  # 2 MiB // 320
        t.register(key(i), i.to_bytes(16, "big"), "192.0.2.1", 1, "::1", 2, "fe", 0)
    one_chunk = t.memory_bytes()
    t.register(key(6553), bytes(16), "192.0.2.1", 1, "::1", 2, "fe", 0)
    assert t.memory_bytes() - one_chunk == CHUNK + HINTS


def test_both_twins_export_key_max():
    from spoa.servernode import tracker

    assert tracker.KEY_MAX == _tracker.KEY_MAX == _tracker_py.KEY_MAX == 40


def test_twin_memory_bytes_is_close_to_tracemalloc():
    t = _tracker_py.SegmentTracker(max_connections=10_000)
    keys = [key(i) for i in range(3000)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i, k in enumerate(keys):
        t.register(k, i.to_bytes(16, "big"), "192.0.2.1", 40000 + i, "2001:db8::1", 443, "fe", 0)
        t.update(k, DIR_OUT, 10_000 + i, 10, 5, 0)
    traced = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    estimate = t.memory_bytes() - sum(sys.getsizeof(k) for k in keys)  # the keys existed before
    assert 0.75 < estimate / traced < 1.25
