"""A row's whole state (table columns, forecaster, policy, history) as a blob, and back."""

from __future__ import annotations

import numpy as np

from spoa.lbnode.cluster.rows import RowCodec
from spoa.lbnode.node import columns
from spoa.lbnode.service import build_lbnode

from .helpers import lbnode_config, record


def test_rows_restore_into_another_table_exactly(tmp_path):
    source = build_lbnode(lbnode_config(tmp_path, 1)).table
    for now in (1000, 2000, 3000):
        source.ingest_batch(columns(7, [record(i, i * now) for i in range(50)]), now)
        source.end_interval(now)
    rows = np.flatnonzero(source.keys.in_use)
    codec = RowCodec(source)
    blobs, size = codec.pack(rows, np.zeros(len(rows), np.uint32))
    assert size == codec.dtype().itemsize and len(blobs) == size * len(rows)
    target = build_lbnode(lbnode_config(tmp_path, 2)).table
    into = np.arange(10, 10 + len(rows))
    RowCodec(target).restore(into, codec.unpack(blobs))
    fields = codec._fields()
    assert {name for name, _, _ in fields} >= {"table.expires", "table.last_total", "forecaster.size",
                                                "policy.gap_q", "history.buf", "policy.silences.buf"}
    for (name, owner, attr), (_, owner2, attr2) in zip(fields, RowCodec(target)._fields()):
        np.testing.assert_array_equal(getattr(owner, attr)[rows], getattr(owner2, attr2)[into], err_msg=name)


def test_another_history_length_is_another_layout(tmp_path):
    a = RowCodec(build_lbnode(lbnode_config(tmp_path, 1)).table)
    config = lbnode_config(tmp_path, 1)
    config["forecast"]["history"] = 16
    assert a.layout() != RowCodec(build_lbnode(config).table).layout()
