"""A row's whole state (table columns, forecaster, policy, history) as a blob, and back."""

from __future__ import annotations

import dataclasses

import numpy as np

from spoa.lbnode.cluster.rows import RowCodec, latest, record_keys
from spoa.lbnode.cluster.segments import SegmentCodec
from spoa.wire.slots import conn_keys
from spoa.lbnode.node import columns
from spoa.lbnode.service import build_lbnode
from spoa.wire.records import SegmentRecord

from .helpers import lbnode_config, record


def test_rows_restore_into_another_table_exactly(tmp_path):
    source = build_lbnode(lbnode_config(tmp_path, 1)).table
    for now in (1000, 2000, 3000):
        source.ingest_batch(columns(7, [record(i, i * now) for i in range(50)]), now)
        source.end_interval(now)
    rows = np.flatnonzero(source.keys.in_use)
    codec = RowCodec(source)
    keys = conn_keys(source.node[rows], source.conn_id[rows])
    blobs = codec.pack(rows, keys, np.zeros(len(rows), np.uint32)).tobytes()
    assert len(blobs) == codec.dtype().itemsize * len(rows)
    target = build_lbnode(lbnode_config(tmp_path, 2)).table
    into = np.arange(10, 10 + len(rows))
    records = codec.unpack(blobs)
    node_ids, conn_ids = record_keys(records)
    assert (node_ids == source.node[rows]).all() and conn_ids.tobytes() == source.conn_id[rows].tobytes()
    assert not records["gone"].any()
    RowCodec(target).restore(into, records)
    fields = codec._fields()
    # the default forecaster's level (SES), the activity policy's silences and their forecaster
    assert {name for name, _, _ in fields} >= {"table.expires", "table.last_total", "forecaster.level",
                                                "policy.gap_q", "policy.since_ms", "history.buf",
                                                "policy.silences.buf", "policy.gap_forecaster.level"}
    for (name, owner, attr), (_, owner2, attr2) in zip(fields, RowCodec(target)._fields()):
        np.testing.assert_array_equal(getattr(owner, attr)[rows], getattr(owner2, attr2)[into], err_msg=name)


def test_another_history_length_is_another_layout(tmp_path):
    a = RowCodec(build_lbnode(lbnode_config(tmp_path, 1)).table)
    config = lbnode_config(tmp_path, 1)
    config["forecast"]["history"] = 16
    assert a.layout() != RowCodec(build_lbnode(config).table).layout()


def test_latest_record_of_each_connection_counts_and_deletions_remove(tmp_path):
    table = build_lbnode(lbnode_config(tmp_path, 1)).table
    table.ingest_batch(columns(7, [record(i, 10 * (i + 1)) for i in range(3)]), 1000)
    codec = RowCodec(table)
    rows = np.array([table.slot(7, i.to_bytes(16, "big")) for i in range(3)])
    keys = conn_keys(table.node[rows], table.conn_id[rows])
    first = codec.pack(rows, keys, np.zeros(3, np.uint32))  # a base: whole records
    table.last_total[rows] += 5
    second = codec.pack(rows[:2], keys[:2], np.zeros(2, np.uint32), delta=True)  # 0 and 1 refreshed again
    gone = codec.deletions(keys[1:2])  # 1 ended
    result, last, inexact = latest(first, np.concatenate([second, gone]), codec.rings())
    by_key = {bytes(r["key"]): int(r["table.last_total"]) for r in result}
    assert by_key == {bytes(keys[0]): 15, bytes(keys[2]): 30}
    assert sorted(last.tolist()) == [2, 3] and inexact == 0  # 2 in the base, 0 in the chunk
    assert not len(latest(first[:0], second[:0], codec.rings())[0])


def test_segment_records_come_grouped_by_slot_each_with_its_connections_state(tmp_path):
    table = build_lbnode(lbnode_config(tmp_path, 1)).table
    segs = tuple(SegmentRecord(direction=d, start_byte_offset=k << 20, byte_count=1 << 20, bytes_transferred=10 * k + d,
                               packets_transferred=1, timestamp_last_activity_ms=5, level=k)
                 for d in (0, 1) for k in range(2))
    for now in (1000, 2000):
        table.ingest_batch(columns(7, [dataclasses.replace(record(i, i * now), segments=segs) for i in range(40)]), now)
        table.end_interval(now)
    rows = np.flatnonzero(table.keys.in_use)[::-1]  # not in the order their segments were made
    slots = np.arange(len(rows)) // 3 % 5  # each row's slot, not sorted: pack groups by it
    rows, slots = rows[np.argsort(slots, kind="stable")], np.sort(slots)
    keys = conn_keys(table.node[rows], table.conn_id[rows])
    packed, of = SegmentCodec(table).pack(rows, keys, slots)
    assert len(packed) == 4 * len(rows) and (np.diff(of) >= 0).all()
    key_of = {keys[i].tobytes(): (row, slot) for i, (row, slot) in enumerate(zip(rows.tolist(), slots.tolist()))}
    history = table.segments.history
    for record_, slot in zip(packed, of.tolist()):
        row, want = key_of[bytes(record_["key"])]
        assert slot == want
        (s,) = [s for s in table.segments.of_connection(row) if table.segments.direction[s] == record_["direction"]
                and table.segments.start[s] == record_["start"]]
        assert record_["byte_count"] == table.segments.byte_count[s] and record_["level"] == table.segments.level[s]
        assert record_["pos"] == history.pos[s] and record_["count"] == history.count[s] == 2
        np.testing.assert_array_equal(record_["ring"], history.buf[s])
