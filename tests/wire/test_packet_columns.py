"""Columnar decoding (ColumnBatch): both twins, against decode_datagram.

- the columns hold exactly what decode_datagram returns (records rebuilt from
  them compare equal), for hypothesis packets and across many datagrams;
- the twins give equal arrays (dtype and values) and equal errors;
- every datagram decode_datagram refuses is refused with the same reason and
  detail, and leaves the batch as it was (malformed cases, fuzzing);
- drop_last, clear, frontend interning, growth, conn_id trailing zero bytes.
"""

from __future__ import annotations

import importlib
import random
import socket
from types import ModuleType

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spoa.wire._packet_py as reference
from spoa.wire import packet as facade
from spoa.wire.records import ConnectionRecord, PacketHeader, SegmentRecord

from .test_packet import (  # noqa: F401, F811 - fixtures
    CORPUS,
    FAST,
    HEADER,
    KEY,
    MALFORMED,
    compiled,
    fuzz_twins,
    mutate,
    packet,
    packets,
    resign,
    sample_record,
)

COLUMNS = [name for name, _ in reference.CONN_COLUMNS + reference.SEG_COLUMNS] + ["seg_start"]


def records_of(batch) -> list[tuple[int, ConnectionRecord]]:
    """(node_id, record) per row, rebuilt from the columns."""
    out = []
    c = {name: getattr(batch, name) for name in COLUMNS}
    for k in range(batch.n):
        family = int(c["family"][k])
        af, cut = (socket.AF_INET, 12) if family == 4 else (socket.AF_INET6, 0)
        segs = tuple(
            SegmentRecord(int(c["direction"][j]), int(c["start_byte_offset"][j]), int(c["byte_count"][j]),
                          int(c["bytes_transferred"][j]), int(c["packets_transferred"][j]),
                          int(c["timestamp_last_activity_ms"][j]), int(c["level"][j]))
            for j in range(c["seg_start"][k], c["seg_start"][k + 1])
        )  # fmt: skip
        rec = ConnectionRecord(
            bytes(c["conn_id"][k]), socket.inet_ntop(af, bytes(c["src"][k])[cut:]), int(c["src_port"][k]),
            socket.inet_ntop(af, bytes(c["dst"][k])[cut:]), int(c["dst_port"][k]),
            batch.frontends[c["frontend"][k]], int(c["flags"][k]), int(c["counter_source"][k]),
            int(c["granularity_level"][k]), int(c["requested_lease_ms"][k]), int(c["predicted_lease_ms"][k]),
            int(c["lease_source"][k]), int(c["bytes_in_total"][k]), int(c["bytes_out_total"][k]), segs,
        )  # fmt: skip
        out.append((int(c["node_id"][k]), rec))
    return out


def same_columns(a, b) -> None:
    assert (a.n, a.nseg, a.datagrams, list(a.frontends)) == (b.n, b.nseg, b.datagrams, list(b.frontends))
    for name in COLUMNS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name


def outcome(batch, data: bytes, key: bytes = KEY):
    try:
        return ("ok", batch.append_datagram(data, key))
    except reference.PacketError as exc:
        return ("error", exc.reason, exc.detail)


def test_facade_exports_the_loaded_twin():
    loaded = importlib.import_module("spoa.wire._packet" if facade.IMPLEMENTATION == "cython" else "spoa.wire._packet_py")
    assert facade.ColumnBatch is loaded.ColumnBatch
    header, index, count, batch = facade.decode_datagram_columns(resign(CORPUS[0]), KEY)
    assert (header, index, count) == reference.decode_datagram(resign(CORPUS[0]), KEY)[:3]
    assert batch.n == 3 and batch.datagrams == 1


@FAST
@given(packets())
def test_columns_hold_what_decode_datagram_returns(packet, case):
    header, records, key, mtu = case
    batch = packet.ColumnBatch()
    for d in packet.encode_packet(header, records, key, mtu):
        h, index, count = batch.append_datagram(d, key)
        assert (h, index, count) == packet.decode_datagram(d, key)[:3]
    assert records_of(batch) == [(header.node_id, rec) for rec in records]
    assert batch.seg_start[0] == 0 and batch.seg_start[-1] == batch.nseg


@FAST
@given(st.lists(packets(max_records=6), min_size=1, max_size=4))
def test_twins_give_equal_arrays(compiled, cases):
    batches = [compiled.ColumnBatch(), reference.ColumnBatch()]
    for header, records, key, mtu in cases:
        for d in reference.encode_packet(header, records, key, mtu):
            results = [outcome(b, d, key) for b in batches]
            assert results[0] == results[1]
    same_columns(*batches)


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_refused_alike_and_batch_unchanged(packet, data):
    batch = packet.ColumnBatch()
    batch.append_datagram(resign(CORPUS[0]), KEY)
    before = records_of(batch), batch.n, batch.nseg, batch.datagrams
    with pytest.raises(reference.PacketError) as info:
        batch.append_datagram(data, KEY)
    with pytest.raises(reference.PacketError) as expected:
        reference.decode_datagram(data, KEY)
    assert (info.value.reason, info.value.detail) == (expected.value.reason, expected.value.detail)
    assert (records_of(batch), batch.n, batch.nseg, batch.datagrams) == before
    batch.drop_last()  # the last *appended* datagram is still the good one
    assert batch.n == 0


def fuzz_inputs(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        base = mutate(rng, rng.choice(CORPUS))
        out.append(resign(base) if rng.random() < 0.8 else base)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_same_outcome_as_decode_datagram(fuzz_twins, seed):
    batches = [mod.ColumnBatch() for mod in fuzz_twins]
    expected = []
    for data in fuzz_inputs(seed, 400):
        try:
            h, i, c, recs = reference.decode_datagram(data, KEY)
            want = ("ok", (h, i, c))
            expected += [(h.node_id, r) for r in recs]
        except reference.PacketError as exc:
            want = ("error", exc.reason, exc.detail)
        for batch in batches:
            assert outcome(batch, data) == want, data.hex()
    for batch in batches:
        assert records_of(batch) == expected
    if len(batches) == 2:
        same_columns(*batches)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: resign(b"CPUB\x01" + b + bytes(16))),
    st.tuples(st.sampled_from(CORPUS), st.randoms(use_true_random=False)).map(lambda t: resign(mutate(t[1], t[0]))),
))
def test_hypothesis_twins_agree(fuzz_twins, data):
    results = {str(outcome(mod.ColumnBatch(), data)) for mod in fuzz_twins}
    assert len(results) == 1


def test_many_datagrams_many_nodes_one_batch(packet):
    batch = packet.ColumnBatch()
    expected = []
    for node in range(1, 40):
        recs = [sample_record(node * 100 + i, nseg=node % 5, frontend=f"fe{node % 3}") for i in range(node % 7)]
        header = PacketHeader(node_id=node, sequence=node, timestamp_ms=0, interval_ms=1000)
        for d in packet.encode_packet(header, recs, KEY, 600):
            batch.append_datagram(d, KEY)
        expected += [(node, r) for r in recs]
    assert records_of(batch) == expected  # grown well past the initial capacity
    assert batch.frontends == ["fe1", "fe2", "fe0"]  # interned in the order met
    batch.clear()
    assert (batch.n, batch.nseg, batch.datagrams, len(batch.seg_start)) == (0, 0, 0, 1)
    assert batch.frontends == ["fe1", "fe2", "fe0"]  # clear() keeps the names


def test_drop_last_takes_back_one_datagram(packet):
    d1, d2 = packet.encode_packet(HEADER, [sample_record(i, nseg=3) for i in range(2)], KEY, 142 + 8 + 3 * 42 + 84)
    batch = packet.ColumnBatch()
    batch.append_datagram(d1, KEY)
    batch.append_datagram(d2, KEY)
    batch.drop_last()
    assert records_of(batch) == [(HEADER.node_id, sample_record(0, nseg=3))] and batch.datagrams == 1
    with pytest.raises(ValueError, match="no datagram to drop"):
        batch.drop_last()


def test_conn_id_keeps_trailing_zero_bytes(packet):
    rec = sample_record(0)
    rec = ConnectionRecord(**{**{f: getattr(rec, f) for f in rec.__slots__}, "conn_id": b"\x01" + bytes(15)})
    (data,) = packet.encode_packet(HEADER, [rec], KEY)
    batch = packet.ColumnBatch()
    batch.append_datagram(data, KEY)
    assert batch.conn_id.dtype == np.dtype("V16") and bytes(batch.conn_id[0]) == b"\x01" + bytes(15)
    assert batch.conn_id.tolist() == [b"\x01" + bytes(15)]


def test_columns_are_read_only_views(packet):
    batch = packet.ColumnBatch()
    batch.append_datagram(resign(CORPUS[0]), KEY)
    with pytest.raises(ValueError):
        batch.bytes_in_total[0] = 1
    with pytest.raises(AttributeError, match="no column"):
        batch.nonsense  # noqa: B018


def test_interned_names_are_bounded(packet):
    batch = packet.ColumnBatch()
    for i in range(reference.MAX_INTERNED + 2):
        (d,) = packet.encode_packet(HEADER, [sample_record(i, nseg=0, frontend=f"f{i}")], KEY)
        batch.append_datagram(d, KEY)
    assert len(batch.frontends) == reference.MAX_INTERNED + 2
    batch.clear()
    assert batch.frontends == []


def test_bad_key_and_bytes_like(packet: ModuleType):
    batch = packet.ColumnBatch()
    with pytest.raises(ValueError, match="at least 16 bytes"):
        batch.append_datagram(b"", b"short")
    batch.append_datagram(bytearray(resign(CORPUS[0])), bytearray(KEY))
    batch.append_datagram(memoryview(resign(CORPUS[1])), KEY)
    assert batch.n == 4
