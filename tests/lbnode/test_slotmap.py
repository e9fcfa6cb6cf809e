"""SlotMap (key -> slot allocator): both twins behave identically.

Random operation sequences (resolve with and without create, lookup, release)
give the same slots, fresh flags, key arrays and counts in both twins; free
slots come back LIFO; a full map refuses, and after growing hands out the
new slots after the free ones, its keys intact; a key repeated in one call gets its
first occurrence's slot; release skips free slots and checks the range.
"""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spoa.lbnode._slotmap_py as reference
from spoa.lbnode import slotmap as facade
from tests.conftest import compiled_disabled, compiled_fixture, twin_fixture

slotmap = twin_fixture("slotmap")  # either twin: every test using it runs once per twin
compiled = compiled_fixture("slotmap")


def keys(pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([p[0] for p in pairs], np.uint64)
    b = np.zeros((len(pairs), 2), np.uint64)
    b[:, 0] = [p[1] for p in pairs]
    b[:, 1] = [p[1] * 7 for p in pairs]
    return a, b


def test_compiled_slotmap_loaded(request):
    if compiled_disabled(request.config):
        assert facade.IMPLEMENTATION == "python"
        return
    import spoa.lbnode._slotmap  # noqa: F401 - an ImportError here names the build problem

    assert facade.IMPLEMENTATION == "cython", "run `python setup.py build_ext --inplace`"


def test_lifo_refused_repeated_and_release(slotmap):
    m = slotmap.SlotMap(3)
    slots, fresh = m.resolve(*keys([(1, 1), (1, 2), (1, 1), (2, 1), (3, 3)]))
    assert slots.tolist() == [0, 1, 0, 2, reference.REFUSED] and fresh.tolist() == [1, 1, 0, 1, 0]
    assert len(m) == 3 and m.in_use.all()
    assert m.key_a.tolist() == [1, 1, 2] and m.key_b[:, 0].tolist() == [1, 2, 1]
    m.release(np.array([1, 0, 1]))  # 1 is skipped the second time
    assert len(m) == 1 and m.lookup(*keys([(1, 1), (2, 1)])).tolist() == [reference.MISSING, 2]
    slots, _ = m.resolve(*keys([(9, 9), (8, 8)]), create=np.array([True, False]))
    assert slots.tolist() == [0, reference.MISSING]  # the last released is handed out first
    with pytest.raises(IndexError, match="out of range"):
        m.release(np.array([3]))
    with pytest.raises(ValueError, match="capacity"):
        slotmap.SlotMap(0)


def test_many_keys_and_deletions_keep_lookups_right(slotmap):
    rng = np.random.default_rng(5)
    n = 5000
    m = slotmap.SlotMap(n)
    a = rng.integers(0, 4, n).astype(np.uint64)
    b = rng.integers(0, 1 << 63, (n, 2)).astype(np.uint64)
    slots, fresh = m.resolve(a, b)
    assert fresh.all() and sorted(slots.tolist()) == list(range(n))
    gone = rng.permutation(n)[: n // 2]
    m.release(slots[gone])
    found = m.lookup(a, b)
    expect = slots.copy()
    expect[gone] = reference.MISSING
    assert np.array_equal(found, expect)


ops = st.lists(st.tuples(
    st.sampled_from(["resolve", "create", "lookup", "release", "grow"]),
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5)), max_size=12),
    st.lists(st.booleans(), min_size=12, max_size=12),
    st.lists(st.integers(0, 7), max_size=4),
), max_size=25)  # fmt: skip


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 8), ops)
def test_twins_agree(compiled, capacity, operations):
    maps = [compiled.SlotMap(capacity), reference.SlotMap(capacity)]
    for op, pairs, wanted, released in operations:
        a, b = keys(pairs)
        if op == "release":
            for m in maps:
                m.release(np.array([s % m.capacity for s in released], np.int64))
        elif op == "grow":
            for m in maps:
                m.grow(m.capacity + len(released) + 1)
        elif op == "lookup":
            x, y = (m.lookup(a, b) for m in maps)
            assert np.array_equal(x, y)
        else:
            create = np.array(wanted[: len(pairs)], bool) if op == "create" else None
            (s1, f1), (s2, f2) = (m.resolve(a, b, create) for m in maps)
            assert np.array_equal(s1, s2) and np.array_equal(f1, f2)
        assert len(maps[0]) == len(maps[1]) and np.array_equal(maps[0].in_use, maps[1].in_use)
        used = maps[0].in_use
        assert np.array_equal(maps[0].key_a[used], maps[1].key_a[used])
        assert np.array_equal(maps[0].key_b[used], maps[1].key_b[used])


def test_grow_keeps_keys_and_hands_out_free_slots_first(slotmap):
    m = slotmap.SlotMap(4)
    a, b = keys([(1, i) for i in range(4)])
    slots, _ = m.resolve(a, b)
    assert slots.tolist() == [0, 1, 2, 3]
    m.release(np.array([2], np.int64))
    m.grow(3)  # not more: no change
    assert m.capacity == 4
    m.grow(8)
    assert m.capacity == 8 and len(m.key_a) == 8 and m.key_b.shape == (8, 2)
    assert m.lookup(a, b).tolist() == [0, 1, slotmap.MISSING, 3]
    more_a, more_b = keys([(2, i) for i in range(6)])
    slots, fresh = m.resolve(more_a, more_b)
    assert slots.tolist() == [2, 4, 5, 6, 7, slotmap.REFUSED] and fresh.tolist() == [True] * 5 + [False]
    assert m.lookup(a, b).tolist() == [0, 1, slotmap.MISSING, 3]
