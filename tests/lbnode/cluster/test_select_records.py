"""A decoded batch kept to some of its records: every column and each kept record's own
segments, exactly as the records it keeps would have decoded alone."""

from __future__ import annotations

import numpy as np

from spoa.lbnode.cluster.tier import select_records
from spoa.wire.packet import decode_datagram_columns, encode_packet
from spoa.wire.records import PacketHeader

from ...wire.test_packet import sample_record
from ...wire.test_packet_columns import records_of

KEY = b"k" * 32


def test_kept_records_keep_their_own_segments():
    records = [sample_record(i, nseg=i % 4) for i in range(12)]  # 0 to 3 segments each
    (datagram,) = encode_packet(PacketHeader(node_id=7, sequence=1, timestamp_ms=1, interval_ms=1000), records,
                                KEY, 9000)
    batch = decode_datagram_columns(datagram, KEY)[3]
    keep = np.array([i % 3 != 1 for i in range(12)])
    kept = select_records(batch, keep)
    assert kept.n == int(keep.sum()) and kept.frontends == batch.frontends
    assert records_of(kept) == [r for r, k in zip(records_of(batch), keep.tolist()) if k]
    none = select_records(batch, np.zeros(12, bool))
    assert none.n == 0 and none.seg_start.tolist() == [0] and records_of(none) == []
