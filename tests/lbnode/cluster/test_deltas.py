"""Chunks of delta records (each ring's last cells, deltas.py): what a loader rebuilds from a
base and the chunks after it is the writer's in-memory state exactly, with a chunk lost, across
ring wraps, resets and compactions; another format is refused."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest

from spoa.lbnode.cluster.deltas import DELTA_CELLS
from spoa.lbnode.cluster.loader import StateLoader
from spoa.lbnode.cluster.store import StoreStats
from spoa.lbnode.cluster.writer import StoreWriter, chunk_field
from spoa.lbnode.cluster.segments import segment_field
from spoa.lbnode.node import columns
from spoa.lbnode.service import build_lbnode
from spoa.wire.records import ConnFlags, SegmentRecord

from .helpers import lbnode_config, record

SERVER_NODE = 7
STEPS = 45  # past the rolling history's 32 cells and the rings' 8: every ring wraps


class Node:
    """An LB node's table and its writer over one slot (every connection in it); each
    interval's chunk harvested from the writer's pending records as the store would hold it."""

    def __init__(self, tmp_path, node_id: int = 1) -> None:
        self.table = build_lbnode(lbnode_config(tmp_path, node_id)).table
        self.writer = StoreWriter(SimpleNamespace(stats=StoreStats()), self.table, "t", 1, 60_000)
        self.writer.epochs[0] = 1
        self.owned = np.ones(1, bool)
        self.table.on_release = lambda rows: self.writer.forget(rows, self.owned)
        self.chunks: list[tuple[bytes, bytes]] = []  # each interval's (rows, segments) blobs
        self.base: tuple[bytes, bytes] = (b"", b"")
        self.base_at = 0  # chunks before it are in the base

    def interval(self, step: int, conns: list[int], closed=(), quiet=()) -> None:
        recs = [dataclasses.replace(record(i, total(i, step, quiet), ConnFlags.CLOSED if i in closed else 0),
                                    segments=segments(i, step)) for i in conns]
        now = 100 * step
        self.table.ingest_batch(columns(SERVER_NODE, recs), now)
        changed = np.flatnonzero(self.table.refreshed)
        self.table.end_interval(now)
        self.writer.snapshot(changed, self.owned)
        self.chunks.append(tuple(b"".join(pending.pop(0, [])) for pending in
                                 (self.writer.pending, self.writer.pending_segments)))

    def compact(self) -> None:
        rows, segs = self.writer._bases({0})
        self.base, self.base_at = (bytes(rows[0]), bytes(segs[0])), len(self.chunks)

    def stored(self, lost=(), keep_compacted: bool = False) -> dict[bytes, bytes]:
        """The slot's hash: base, layout, names, epoch and the chunks since the base (with
        `keep_compacted`, those before it too, numbered before it: a compaction that did not
        survive); `lost`: chunk indexes missing."""
        out = {b"base": self.base[0], b"g:base": self.base[1], b"layout": self.writer.layout(),
               b"frontends": json.dumps(self.writer.frontends.get(0, [])).encode(), b"epoch": b"1"}
        for n, (rows, segs) in enumerate(self.chunks):
            if n in lost or (n < self.base_at and not keep_compacted):
                continue
            field = chunk_field(n + 1)
            out[field], out[segment_field(field)] = rows, segs
        return out


def total(i: int, step: int, quiet) -> int:
    """Cumulative bytes: growing by a different amount each interval; `quiet` ones every other
    interval from step 5 (a silence each time: their silences ring wraps too)."""
    return sum(0 if i in quiet and s >= 5 and s % 2 else (i + 1) * (s % 7 + 1) * 100 for s in range(step + 1))


def segments(i: int, step: int) -> tuple:
    """Two directions; every 4th connection's second segment comes and goes (reset when back)."""
    starts = [0] + ([1 << 20] if i % 4 or not 15 <= step < 20 else [])
    return tuple(SegmentRecord(direction=d, start_byte_offset=start, byte_count=100 * step,
                               bytes_transferred=(i + 1) * (step % 5 + 1) * (k + 1) + d, packets_transferred=1,
                               timestamp_last_activity_ms=100 * step, level=k)
                 for d in (0, 1) for k, start in enumerate(starts))


def run(node: Node, steps: int = STEPS, compact_at: int | None = None) -> None:
    """Connections 0-29 throughout (10-14 quiet every other interval: silences), 30-39 until step 12
    (closed), 40-49 from step 14 (new connections in the freed rows: their rings reset)."""
    for step in range(1, steps + 1):
        conns = list(range(30)) + (list(range(30, 40)) if step <= 12 else []) + \
            (list(range(40, 50)) if step >= 14 else [])
        node.interval(step, conns, closed=range(30, 40) if step == 12 else (), quiet=range(10, 15))
        if step == 3 or step == compact_at:
            node.compact()


def state(table) -> dict[bytes, tuple]:
    """Every held connection's whole state: its row's fields (as RowCodec reads them) and its
    segments' (direction, start, last report, ring, position, count)."""
    writer_codec = StoreWriter(SimpleNamespace(stats=StoreStats()), table, "t", 1, 1).codec
    segs = table.segments
    out = {}
    for row in np.flatnonzero(table.keys.in_use).tolist():
        fields = tuple((name, getattr(owner, attr)[row].tobytes()) for name, owner, attr in writer_codec._fields())
        mine = segs.of_connection(row)
        seg_state = tuple((int(segs.direction[s]), int(segs.start[s]), int(segs.byte_count[s]), int(segs.level[s]),
                           int(segs.last_activity[s]), segs.history.buf[s].tobytes(), int(segs.history.pos[s]),
                           int(segs.history.count[s])) for s in mine.tolist())
        out[table.conn_id[row].tobytes()] = (fields, seg_state)
    return out


def load(tmp_path, stored: dict[bytes, bytes]) -> tuple[dict, StoreStats]:
    """What another node adopts from the slot's hash, as its state."""
    target = Node(tmp_path, 2)
    stats = target.writer.store.stats
    loader = StateLoader(target.writer.store, target.table, target.writer, "t", grace_ms=0)
    loader.adopt(0, stored, now=0)  # now 0: every stored deadline stands as it is
    return state(target.table), stats


@pytest.fixture
def node(tmp_path) -> Node:
    node = Node(tmp_path)
    run(node)
    return node


def test_base_and_delta_chunks_reload_exactly_the_in_memory_state(tmp_path, node):
    table = node.table
    # what the run is meant to exercise: wrapped rings of each kind, silences, reused rows
    assert (table.history.count[table.keys.in_use] == table.history.length).any()
    assert (table.policy.silences.count[table.keys.in_use] == table.policy.silences.length).any()
    assert (table.segments.history.count[table.segments.keys.in_use] == table.segments.history.length).any()
    assert table.allocations > len(table)
    stored = node.stored()
    assert len([f for f in stored if f.startswith(b"c:")]) == STEPS - 3  # a base at step 3, then chunks
    # a chunk's records are smaller than a base's by the rings' cells
    codec = node.writer.codec
    assert codec.delta_dtype().itemsize == codec.dtype().itemsize - 4 * (32 + 8 - 2 * DELTA_CELLS)
    loaded, stats = load(tmp_path, stored)
    assert loaded == state(table) and len(loaded) == 40
    assert stats.rings_inexact == 0 and stats.rows_refused == 0


def test_a_lost_chunk_is_repaired_by_the_next(tmp_path, node):
    expected = state(node.table)
    deletions = {n for n, (rows, _segs) in enumerate(node.chunks) if len(node.writer.codec.unpack(rows, delta=True))
                 and node.writer.codec.unpack(rows, delta=True)["gone"].any()}
    # any chunk but the last (nothing after it repairs it) and those ending connections (a lost
    # deletion brings its connection back: the store's loss, not a ring's)
    for lost in sorted(set(range(3, len(node.chunks) - 1)) - deletions):
        loaded, stats = load(tmp_path, node.stored(lost={lost}))
        assert loaded == expected, lost
        assert stats.rings_inexact == 0


def test_two_chunks_lost_in_a_row_are_counted_not_silently_wrong(tmp_path, node):
    _loaded, stats = load(tmp_path, node.stored(lost={30, 31}))
    assert stats.rings_inexact > 0


def test_a_compaction_folds_the_chunks_into_a_new_base(tmp_path):
    node = Node(tmp_path)
    run(node, compact_at=25)
    stored = node.stored()
    assert min(int(f[2:]) for f in stored if f.startswith(b"c:")) == 26  # numbers go on past the base
    expected = state(node.table)
    assert load(tmp_path, stored)[0] == expected
    # a compaction that did not survive (a failover lost it): the old base and every chunk, in order
    old = Node(tmp_path)
    run(old, compact_at=None)
    loaded, stats = load(tmp_path, old.stored(keep_compacted=True))
    assert loaded == state(old.table) and stats.rings_inexact == 0


def test_a_slot_stored_in_another_format_is_refused(tmp_path, node):
    stored = node.stored()
    # the layout as written before delta chunks: the same records, chunks of whole ones
    writer = node.writer
    stored[b"layout"] = writer.codec.layout() + b"|" + writer.segment_codec.layout()
    loaded, stats = load(tmp_path, stored)
    assert loaded == {} and stats.rows_refused > 0
