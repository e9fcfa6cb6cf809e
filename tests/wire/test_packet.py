"""Connection publishing packet v1: codec, authentication, replay guard, receiver.

Every codec test runs on both twins through the `packet` fixture (ids
"cython" and "python"); differential tests hold the twins to the same bytes,
the same records and the same exceptions (type and message).

- round trip: encode -> decode is the identity, split datagrams keep the
  records in order, each datagram <= mtu and packed greedily;
- rejection: truncated, oversized, bad magic, bad version, any flipped bit,
  wrong key, replayed and malformed (re-signed, so the parser is reached)
  datagrams raise PacketError with the right reason and nothing else;
- fuzzing: hypothesis on random and mutated bytes in-process, plus a seeded
  time-boxed mutational fuzzer in a child process (a crash fails the test
  with its input instead of killing pytest);
- PacketReceiver over a real UDP socket on 127.0.0.1;
- the worked example in docs/publishing-packet.md is what the encoder emits.

Longer fuzzing, outside pytest:
    PYTHONPATH=. python tests/wire/test_packet.py --seconds 600 [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import importlib
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO_ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # the fuzzer child process
    sys.path.insert(0, str(REPO_ROOT))

import spoa.wire._packet_py as reference  # noqa: E402
from tests.conftest import compiled_disabled, compiled_fixture, load_twin, twin_fixture  # noqa: E402
from spoa.wire.records import (  # noqa: E402
    DIR_IN,
    DIR_OUT,
    ConnectionRecord,
    ConnFlags,
    CounterSource,
    LeaseSource,
    PacketHeader,
    SegmentRecord,
)

KEY = b"0123456789abcdef0123456789abcdef"
OTHER_KEY = b"fedcba9876543210fedcba9876543210"
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
FUZZ_SECONDS = float(os.environ.get("SPOA_PACKET_FUZZ_SECONDS", "5"))
DOC = REPO_ROOT / "docs" / "publishing-packet.md"

FAST = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# -- fixtures: both twins ----------------------------------------------------------------


packet = twin_fixture("packet")  # one packet codec twin; every test using it runs once per twin
compiled = compiled_fixture("packet")


@pytest.fixture(scope="session")
def fuzz_twins(request: pytest.FixtureRequest) -> list[ModuleType]:
    """Both twins (the compiled one first), or the reference alone when disabled."""
    if compiled_disabled(request.config):
        return [reference]
    return [load_twin(request.config, "cython", "packet"), reference]


# -- strategies ------------------------------------------------------------------------------

u64 = st.one_of(st.integers(0, U64), st.sampled_from([0, 1, 255, 256, 65535, 2**32, 2**63, U64]))
u32 = st.one_of(st.integers(0, U32), st.sampled_from([0, 30000, U32]))
i8 = st.integers(-128, 127)
ipv4 = st.integers(0, U32).map(lambda n: socket.inet_ntop(socket.AF_INET, n.to_bytes(4, "big")))
ipv6 = st.one_of(
    st.binary(min_size=16, max_size=16),
    st.integers(0, U32).map(lambda n: bytes(10) + b"\xff\xff" + n.to_bytes(4, "big")),  # ::ffff:a.b.c.d
    st.sampled_from([bytes(16), bytes(15) + b"\x01"]),
).map(lambda b: socket.inet_ntop(socket.AF_INET6, b))
address_pairs = st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6))
frontends = st.one_of(
    st.sampled_from(["", "fe_http", "fe_https", "f" * 255, "é" * 127]),
    st.text(st.characters(blacklist_categories=["Cs"]), max_size=40),
).filter(lambda s: len(s.encode("utf-8")) <= 255)

segments = st.builds(
    SegmentRecord,
    direction=st.sampled_from([DIR_IN, DIR_OUT]),
    start_byte_offset=u64,
    byte_count=u64,
    bytes_transferred=u64,
    packets_transferred=u64,
    timestamp_last_activity_ms=u64,
    level=i8,
)


@st.composite
def connections(draw, max_segments: int = 6) -> ConnectionRecord:
    src, dst = draw(address_pairs)
    return ConnectionRecord(
        conn_id=draw(st.binary(min_size=16, max_size=16)),
        src=src,
        src_port=draw(st.integers(0, 65535)),
        dst=dst,
        dst_port=draw(st.integers(0, 65535)),
        frontend=draw(frontends),
        flags=draw(st.integers(0, 255)),
        counter_source=draw(st.integers(0, 255)),
        granularity_level=draw(i8),
        requested_lease_ms=draw(u32),
        predicted_lease_ms=draw(u32),
        lease_source=draw(st.integers(0, 255)),
        bytes_in_total=draw(u64),
        bytes_out_total=draw(u64),
        segments=tuple(draw(st.lists(segments, max_size=max_segments))),
    )


headers = st.builds(PacketHeader, node_id=u64, sequence=u64, timestamp_ms=u64, interval_ms=u32,
                    flags=st.integers(0, 255))
keys = st.binary(min_size=16, max_size=80)


def record_size(rec: ConnectionRecord) -> int:
    return reference.CONN_SIZE + len(rec.frontend.encode("utf-8")) + reference.SEG_SIZE * len(rec.segments)


@st.composite
def packets(draw, max_records: int = 12):
    """(header, records, key, mtu) with an mtu every record fits in."""
    records = draw(st.lists(connections(), max_size=max_records))
    need = max([record_size(r) for r in records], default=0) + reference.OVERHEAD
    mtu = draw(st.one_of(st.integers(max(need, reference.MIN_MTU), reference.MAX_DATAGRAM),
                         st.integers(max(need, reference.MIN_MTU), max(need, reference.MIN_MTU) + 600)))
    return draw(headers), records, draw(keys), mtu


def sample_record(i: int = 0, nseg: int = 2, v6: bool = False, frontend: str = "fe_https") -> ConnectionRecord:
    return ConnectionRecord(
        conn_id=i.to_bytes(16, "big"),
        src=f"2001:db8::{i:x}" if v6 else f"192.0.2.{i % 256}",
        src_port=40000 + i % 20000,
        dst="2001:db8::443" if v6 else "198.51.100.7",
        dst_port=443,
        frontend=frontend,
        flags=ConnFlags.CLOSING if i % 3 == 0 else 0,
        counter_source=CounterSource.KERNEL,
        granularity_level=-1 if i % 2 else 2,
        requested_lease_ms=0,
        predicted_lease_ms=45000,
        lease_source=LeaseSource.PREDICTED,
        bytes_in_total=1000 + i,
        bytes_out_total=(5 << 20) + i,
        segments=tuple(
            SegmentRecord(j % 2, (j // 2) << 20, 1 << 20, 4096 * j, 3 * j, 1_700_000_000_000 + j, j % 3 - 1)
            for j in range(nseg)
        ),
    )


HEADER = PacketHeader(node_id=7, sequence=1001, timestamp_ms=1_700_000_000_000, interval_ms=1000)


def decode_all(mod: ModuleType, datagrams: list[bytes], key: bytes):
    out = [mod.decode_datagram(d, key) for d in datagrams]
    return out, [rec for _, _, _, recs in out for rec in recs]


def resign(data: bytes | bytearray, key: bytes = KEY, fix_length: bool = True) -> bytes:
    """Set the length field and a valid HMAC over a body: reaches the parser."""
    body = bytearray(data[:-16])
    if fix_length and len(body) >= 8:
        struct.pack_into(">H", body, 6, len(body) + 16)
    return bytes(body) + hmac.digest(key, bytes(body), "sha256")[:16]


def outcome(mod: ModuleType, data: bytes, key: bytes = KEY):
    """What decoding gives, as comparable plain values."""
    try:
        return ("ok", mod.decode_datagram(data, key))
    except reference.PacketError as exc:
        return ("error", exc.reason, exc.detail)


def raised(fn, *args):
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - the twins are compared on it
        return type(exc), str(exc)
    return None


# -- the extension and the façade ---------------------------------------------------------


def test_compiled_packet_loaded():
    import spoa.wire.packet

    if os.environ.get("SPOA_NO_EXTENSIONS", "") not in ("", "0"):
        assert spoa.wire.packet.IMPLEMENTATION == "python"
        return
    import spoa.wire._packet  # noqa: F401 - an ImportError here names the build problem

    assert spoa.wire.packet.IMPLEMENTATION == "cython", "spoa.wire._packet did not load: run `python setup.py build_ext --inplace`"
    assert spoa.wire.packet.encode_packet is spoa.wire._packet.encode_packet
    assert spoa.wire.packet.PacketError is reference.PacketError  # one class for both twins
    import spoa.wire._record_builder

    assert spoa.wire._record_builder.FAST_RECORDS, "records are built through their constructors: decoding is ~4x slower"


@pytest.mark.c_extension
@pytest.mark.parametrize("key", [b"k" * 16, b"\x00" * 64, bytes(range(65)), bytes(range(200)), bytearray(b"b" * 40)],
                         ids=["16B", "64B-zeros", "65B-hashed-first", "200B", "bytearray"])
def test_compiled_hmac_paths_sign_as_the_twin(compiled, key):
    # libcrypto's SHA-256 primitives (the fast path, found at import on this
    # machine) and the HMAC-object fallback both give the twin's bytes.
    header = PacketHeader(node_id=7, sequence=9, timestamp_ms=1, interval_ms=1000)
    conns = [sample_record(i, v6=i % 2 == 1) for i in range(40)]
    expected = reference.encode_packet(header, conns, key, 1400)
    assert compiled.USES_LIBCRYPTO, "libcrypto's SHA256_* not found: HMAC runs ~2.5x slower"
    try:
        for fast in (True, False):
            assert compiled._use_libcrypto(fast) is fast
            assert compiled.encode_packet(header, conns, key, 1400) == expected
            for datagram in expected:
                compiled.decode_datagram(datagram, key)
            forged = expected[0][:-1] + bytes([expected[0][-1] ^ 1])
            with pytest.raises(reference.PacketError) as err:
                compiled.decode_datagram(forged, key)
            assert err.value.reason == "bad_hmac"
    finally:
        compiled._use_libcrypto(True)


@pytest.mark.parametrize(("env_value", "implementation"), [("1", "python"), ("", "cython")])
def test_no_extensions_env_selects_the_twin(env_value, implementation, request):
    if implementation == "cython":
        request.getfixturevalue("compiled")
    env = dict(os.environ, SPOA_NO_EXTENSIONS=env_value, PYTHONPATH=str(REPO_ROOT))
    module = "spoa.wire._packet" if implementation == "cython" else "spoa.wire._packet_py"
    script = (
        "import spoa.wire.packet, importlib\n"
        f"twin = importlib.import_module({module!r})\n"
        "assert spoa.wire.packet.decode_datagram is twin.decode_datagram\n"
        "assert spoa.wire.packet.ReplayGuard is twin.ReplayGuard\n"
        "print(spoa.wire.packet.IMPLEMENTATION)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == implementation


def test_format_constants(packet):
    assert (packet.HEADER_SIZE, packet.TAG_SIZE, packet.CONN_SIZE, packet.SEG_SIZE) == (42, 16, 84, 42)
    assert packet.OVERHEAD == 58 and packet.MIN_MTU == 142 and packet.MAX_DATAGRAM == 65507
    assert packet.MAGIC == b"CPUB" and packet.VERSION == 1
    # The numbers docs/publishing-packet.md quotes.
    assert packet.max_segments(1400) == 29
    assert packet.max_segments(1400, 255) == 23
    assert packet.max_segments(1400, 8) == 29
    assert packet.max_segments(9000) == 210
    assert packet.max_segments(65507) == 1556


# -- round trip and twin identity -----------------------------------------------------------


@FAST
@given(packets())
def test_roundtrip_is_identity(packet, case):
    header, records, key, mtu = case
    datagrams = packet.encode_packet(header, records, key, mtu)
    decoded, got = decode_all(packet, datagrams, key)
    assert got == records
    assert [(i, c) for _, i, c, _ in decoded] == [(i, len(datagrams)) for i in range(len(datagrams))]
    assert all(h == header for h, _, _, _ in decoded)
    assert all(reference.OVERHEAD <= len(d) <= mtu for d in datagrams)


@FAST
@given(packets())
def test_twins_byte_identical(compiled, case):
    header, records, key, mtu = case
    datagrams = compiled.encode_packet(header, records, key, mtu)
    assert datagrams == reference.encode_packet(header, records, key, mtu)
    for data in datagrams:
        assert compiled.decode_datagram(data, key) == reference.decode_datagram(data, key)


@FAST
@given(st.lists(connections(max_segments=30), min_size=1, max_size=40), st.sampled_from([576, 1400, 1500, 9000]))
def test_split_greedy_in_order_each_within_mtu(packet, records, mtu):
    records = [r for r in records if record_size(r) <= mtu - reference.OVERHEAD]
    datagrams = packet.encode_packet(HEADER, records, KEY, mtu)
    decoded, got = decode_all(packet, datagrams, KEY)
    assert got == records
    sizes = [len(d) for d in datagrams]
    assert all(s <= mtu for s in sizes)
    # Greedy: the first record of each next datagram would not have fitted.
    for (_, _, _, recs), size, (_, _, _, nxt) in zip(decoded, sizes, decoded[1:]):
        assert size + record_size(nxt[0]) > mtu
        assert recs


def test_split_example(packet):
    records = [sample_record(i, nseg=4) for i in range(50)]  # 84 + 8 + 168 = 260 bytes each
    datagrams = packet.encode_packet(HEADER, records, KEY)
    assert [len(d) for d in datagrams] == [58 + 5 * 260] * 10
    decoded, got = decode_all(packet, datagrams, KEY)
    assert got == records
    assert [i for _, i, _, _ in decoded] == list(range(10)) and {c for _, _, c, _ in decoded} == {10}


def test_empty_packet_is_one_heartbeat_datagram(packet):
    (data,) = packet.encode_packet(HEADER, [], KEY)
    assert len(data) == 58
    assert packet.decode_datagram(data, KEY) == (HEADER, 0, 1, [])


def test_accepts_any_sequence_and_bytes_like(packet):
    records = (sample_record(1), sample_record(2, v6=True))
    a = packet.encode_packet(HEADER, records, KEY)
    assert packet.encode_packet(HEADER, iter(records), bytearray(KEY)) == a
    listed = [replace(r, segments=list(r.segments)) for r in records]
    assert packet.encode_packet(HEADER, listed, KEY) == a
    assert packet.decode_datagram(bytearray(a[0]), KEY) == packet.decode_datagram(memoryview(a[0]), KEY)


def test_decoded_records_are_ordinary_records(packet):
    rec = sample_record(3, nseg=3, v6=True)
    # Decoding gives plain ints for the enum fields.
    rec = replace(rec, flags=int(rec.flags), counter_source=int(rec.counter_source),
                  lease_source=int(rec.lease_source))
    (data,) = packet.encode_packet(HEADER, [rec], KEY)
    (got,) = packet.decode_datagram(data, KEY)[3]
    assert got == rec and hash(got) == hash(rec) and repr(got) == repr(rec)
    assert type(got) is ConnectionRecord and type(got.segments[0]) is SegmentRecord
    with pytest.raises(AttributeError):
        got.src = "x"  # still frozen


def test_address_forms(packet):
    cases = [("192.0.2.1", "198.51.100.7"), ("0.0.0.0", "255.255.255.255"), ("::", "::1"),
             ("::ffff:192.0.2.1", "::ffff:198.51.100.7"), ("2001:db8::1", "fe80::1")]
    for src, dst in cases:
        rec = replace(sample_record(), src=src, dst=dst)
        (data,) = packet.encode_packet(HEADER, [rec], KEY)
        (got,) = packet.decode_datagram(data, KEY)[3]
        assert (got.src, got.dst) == (src, dst)
    # Non-canonical text decodes to the canonical form (inet_ntop's).
    rec = replace(sample_record(), src="2001:DB8:0:0::1", dst="0:0:0:0:0:0:0:1")
    (got,) = packet.decode_datagram(packet.encode_packet(HEADER, [rec], KEY)[0], KEY)[3]
    assert (got.src, got.dst) == ("2001:db8::1", "::1")


def test_largest_datagram_and_record(packet):
    # A record of max_segments(65507) segments fills a 65507-byte datagram exactly.
    rec = replace(sample_record(0, nseg=0, frontend=""), segments=sample_record(0, nseg=1556).segments)
    (data,) = packet.encode_packet(HEADER, [rec], KEY, 65507)
    assert len(data) == 58 + 84 + 1556 * 42 == 65494
    assert packet.decode_datagram(data, KEY)[3] == [rec]
    fill = replace(rec, frontend="x" * 13)
    (data,) = packet.encode_packet(HEADER, [fill], KEY, 65507)
    assert len(data) == 65507 and packet.decode_datagram(data, KEY)[3] == [fill]


def test_record_larger_than_mtu(packet):
    fits = sample_record(0, nseg=29, frontend="")
    assert len(packet.encode_packet(HEADER, [fits], KEY, 1400)[0]) == 58 + 84 + 29 * 42
    too_big = sample_record(5, nseg=30, frontend="")
    with pytest.raises(ValueError, match=r"connections\[1\] is 1344 bytes \(30 segments.*at most 29 segments"):
        packet.encode_packet(HEADER, [fits, too_big], KEY, 1400)
    with pytest.raises(ValueError, match=r"at most 23 segments"):
        packet.encode_packet(HEADER, [sample_record(0, nseg=24, frontend="f" * 255)], KEY, 1400)


def test_too_many_datagrams(packet):
    records = [sample_record(0, nseg=0, frontend="")] * 65536  # one 84-byte record per 142-byte datagram
    with pytest.raises(ValueError, match="needs 65536 datagrams, at most 65535"):
        packet.encode_packet(HEADER, records, KEY, 142)
    assert len(packet.encode_packet(HEADER, records[:3], KEY, 142)) == 3


# -- invalid arguments: same exception, same message --------------------------------------------

BAD_RECORDS = {
    "conn_id short": {"conn_id": b"x" * 15},
    "conn_id str": {"conn_id": "x" * 16},
    "src garbage": {"src": "not-an-ip"},
    "src int": {"src": 3232235777},
    "src NUL": {"src": "192.0.2.1\x00"},
    "src surrogate": {"src": "192.0.2.\udc801"},
    "src zone": {"src": "fe80::1%eth0", "dst": "fe80::2"},
    "dst other family": {"dst": "2001:db8::1"},
    "dst v4 for v6 src": {"src": "2001:db8::1", "dst": "192.0.2.1"},
    "dst None": {"dst": None},
    "frontend long": {"frontend": "é" * 128},
    "frontend surrogate": {"frontend": "fe\ud800"},
    "frontend bytes": {"frontend": b"fe"},
    "segments None": {"segments": None},
    "src_port": {"src_port": 65536},
    "dst_port negative": {"dst_port": -1},
    "flags": {"flags": 256},
    "counter_source float": {"counter_source": 1.0},
    "lease_source": {"lease_source": -1},
    "granularity_level": {"granularity_level": 128},
    "granularity_level low": {"granularity_level": -129},
    "requested_lease_ms": {"requested_lease_ms": 1 << 32},
    "predicted_lease_ms str": {"predicted_lease_ms": "1"},
    "bytes_in_total": {"bytes_in_total": 1 << 64},
    "bytes_out_total": {"bytes_out_total": -1},
    "two problems, first wins": {"src_port": -1, "frontend": "x" * 300},
    "ports after totals": {"src_port": -1, "bytes_out_total": -1},
}
BAD_SEGMENTS = {
    "direction": {"direction": 2},
    "direction bool ok, level": {"direction": True, "level": 200},
    "level float": {"level": 0.5},
    "start": {"start_byte_offset": -1},
    "byte_count": {"byte_count": 1 << 64},
    "bytes_transferred": {"bytes_transferred": None},
    "packets_transferred": {"packets_transferred": 1 << 70},
    "timestamp": {"timestamp_last_activity_ms": -5},
}


class Index:
    """An __index__ integer: accepted like an int by both twins."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


@pytest.mark.parametrize("change", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_bad_record_same_error(compiled, change):
    records = [sample_record(0), replace(sample_record(1), **change)]
    error = raised(reference.encode_packet, HEADER, records, KEY)
    assert error is not None and error[0] in (TypeError, ValueError)
    assert "connections[1]" in error[1] or error[0] is TypeError
    assert raised(compiled.encode_packet, HEADER, records, KEY) == error


@pytest.mark.parametrize("change", BAD_SEGMENTS.values(), ids=BAD_SEGMENTS.keys())
def test_bad_segment_same_error(compiled, change):
    rec = sample_record(1, nseg=3)
    segs = list(rec.segments)
    segs[2] = replace(segs[2], **change)
    records = [replace(rec, segments=tuple(segs))]
    error = raised(reference.encode_packet, HEADER, records, KEY)
    assert error is not None and "connections[0].segments[2]." in error[1]
    assert raised(compiled.encode_packet, HEADER, records, KEY) == error


@pytest.mark.parametrize(
    ("header", "key", "mtu"),
    [
        (HEADER, b"short", 1400),
        (HEADER, "a str key of more than 16 chars", 1400),
        (HEADER, KEY, 141),
        (HEADER, KEY, 65508),
        (HEADER, KEY, 1400.0),
        (replace(HEADER, node_id=-1), KEY, 1400),
        (replace(HEADER, sequence=1 << 64), KEY, 1400),
        (replace(HEADER, interval_ms=1 << 32), KEY, 1400),
        (replace(HEADER, flags=256), KEY, 1400),
        (replace(HEADER, timestamp_ms=None), KEY, 1400),
    ],
)
def test_bad_arguments_same_error(compiled, header, key, mtu):
    error = raised(reference.encode_packet, header, [sample_record()], key, mtu)
    assert error is not None and error[0] in (TypeError, ValueError)
    assert raised(compiled.encode_packet, header, [sample_record()], key, mtu) == error


def test_index_objects_accepted_alike(compiled):
    rec = replace(sample_record(2), src_port=Index(80), bytes_in_total=Index(U64),
                  segments=(replace(sample_record(2).segments[0], level=Index(-3), direction=Index(1)),))
    assert compiled.encode_packet(HEADER, [rec], KEY) == reference.encode_packet(HEADER, [rec], KEY)


field_values = st.one_of(
    st.integers(-(2**65), 2**65), st.sampled_from([-1, 0, 1, 127, 128, 255, 256, 65535, 65536, U32 + 1, U64 + 1]),
    st.floats(allow_nan=False), st.none(), st.text(max_size=3), st.binary(max_size=20),
)
RECORD_FIELDS = [f for f in ConnectionRecord.__dataclass_fields__ if f != "segments"]
SEGMENT_FIELDS = list(SegmentRecord.__dataclass_fields__)


@FAST
@given(
    st.lists(st.tuples(st.sampled_from(RECORD_FIELDS), field_values), max_size=3),
    st.lists(st.tuples(st.integers(0, 2), st.sampled_from(SEGMENT_FIELDS), field_values), max_size=3),
)
def test_random_bad_fields_same_outcome(compiled, record_changes, segment_changes):
    rec = sample_record(4, nseg=3)
    segs = list(rec.segments)
    for j, name, value in segment_changes:
        segs[j] = replace(segs[j], **{name: value})
    rec = replace(rec, segments=tuple(segs), **dict(record_changes))
    error = raised(reference.encode_packet, HEADER, [rec], KEY)
    assert raised(compiled.encode_packet, HEADER, [rec], KEY) == error
    if error is None:
        assert compiled.encode_packet(HEADER, [rec], KEY) == reference.encode_packet(HEADER, [rec], KEY)


# -- rejection of bad datagrams --------------------------------------------------------------------


def valid_datagram(nrec: int = 3, nseg: int = 2) -> bytes:
    (data,) = reference.encode_packet(HEADER, [sample_record(i, nseg=nseg) for i in range(nrec)], KEY)
    return data


def reason(mod: ModuleType, data: bytes, key: bytes = KEY) -> str:
    with pytest.raises(reference.PacketError) as info:
        mod.decode_datagram(data, key)
    assert isinstance(info.value, ValueError)
    return info.value.reason


# -- records in wire form (RecordBatch, encode_batch) ------------------------------------------


@FAST
@given(packets(), st.integers(0, 14), st.integers(0, 14))
def test_a_record_batch_encodes_as_its_records_do(packet, case, start, stop):
    header, records, key, mtu = case
    batch = packet.RecordBatch.from_records(records)
    assert len(batch) == len(records)
    assert batch.conn_ids() == b"".join([r.conn_id for r in records])
    assert packet.encode_batch(header, batch, key, mtu) == reference.encode_packet(header, records, key, mtu)
    assert (packet.encode_batch(header, batch, key, mtu, start, stop)
            == reference.encode_packet(header, records[start:stop], key, mtu))
    order = list(range(len(records)))[::-1]
    assert (packet.encode_batch(header, batch.take(order), key, mtu)
            == reference.encode_packet(header, [records[i] for i in order], key, mtu))


def test_a_record_batch_grows_by_whole_additions(packet):
    batch = packet.RecordBatch()
    batch.add_records([sample_record(1), sample_record(2, v6=True)])
    with pytest.raises(ValueError, match=r"connections\[3\]"):
        batch.add_records([sample_record(3), replace(sample_record(4), src_port=70000)])
    assert len(batch) == 2  # the failed addition left nothing behind
    batch.add_records([sample_record(5)])
    assert (packet.encode_batch(HEADER, batch, KEY)
            == reference.encode_packet(HEADER, [sample_record(1), sample_record(2, v6=True), sample_record(5)], KEY))
    assert packet.encode_batch(HEADER, packet.RecordBatch(), KEY) == reference.encode_packet(HEADER, [], KEY)


def test_record_batch_bad_input_same_error(compiled):
    """Both twins refuse alike: not a batch, a record too big for the mtu (named by its index in
    the batch), an index out of range, a bad record, a bad key or mtu."""
    def cases(mod):
        batch = mod.RecordBatch.from_records([sample_record(0), sample_record(1, nseg=40)])
        return [
            lambda: mod.encode_batch(HEADER, [sample_record(0)], KEY),
            lambda: mod.encode_batch(HEADER, batch, KEY, 1400),
            lambda: mod.encode_batch(HEADER, batch, KEY, 1400, 1),
            lambda: mod.encode_batch(HEADER, batch, b"short"),
            lambda: mod.encode_batch(HEADER, batch, KEY, 100),
            lambda: batch.take([2]),
            lambda: batch.take(["0"]),
            lambda: mod.RecordBatch.from_records([sample_record(0), 5]),
        ]
    for mine, theirs in zip(cases(compiled), cases(reference)):
        error = raised(theirs)
        assert error is not None
        assert raised(mine) == error
    assert compiled.encode_batch(HEADER, compiled.RecordBatch.from_records([sample_record(0), sample_record(1, nseg=40)]),
                                 KEY, 9000, 0, 1) == reference.encode_packet(HEADER, [sample_record(0)], KEY, 9000)


def test_truncated_every_prefix(packet):
    data = valid_datagram()
    for n in range(len(data)):
        assert reason(packet, data[:n]) == "truncated", n


def test_oversized(packet):
    data = valid_datagram()
    assert reason(packet, data + bytes(65508 - len(data))) == "oversized"
    assert reason(packet, b"\xff" * 70000) == "oversized"


def test_bad_magic_and_version(packet):
    data = bytearray(valid_datagram())
    for i in range(4):
        bad = bytearray(data)
        bad[i] ^= 0x20
        assert reason(packet, bytes(bad)) == "bad_magic"
    assert reason(packet, b"HTTP/1.1 200 OK\r\n") == "bad_magic"
    for version in (0, 2, 255):
        bad = bytearray(data)
        bad[4] = version
        assert reason(packet, bytes(bad)) == "bad_version"
        assert reason(packet, resign(bad)) == "bad_version"  # a valid HMAC does not help


def test_every_flipped_bit_is_rejected(packet):
    data = valid_datagram(nrec=2, nseg=1)
    for bit in range(len(data) * 8):
        bad = bytearray(data)
        bad[bit // 8] ^= 1 << (bit % 8)
        byte = bit // 8
        expected = {0: "bad_magic", 1: "bad_magic", 2: "bad_magic", 3: "bad_magic", 4: "bad_version"}.get(byte)
        if byte in (6, 7):  # the length field: more is truncated, less leaves bytes over
            expected = "truncated" if bad[6:8] > data[6:8] else "malformed"
        assert reason(packet, bytes(bad)) == (expected or "bad_hmac"), bit


def test_wrong_key(packet):
    data = valid_datagram()
    assert reason(packet, data, OTHER_KEY) == "bad_hmac"
    assert reason(packet, data, KEY[:-1] + b"!") == "bad_hmac"
    assert packet.decode_datagram(data, bytearray(KEY))[3] == decode_all(packet, [data], KEY)[1]


def test_decode_rejects_bad_key_argument(packet):
    with pytest.raises(ValueError, match="at least 16 bytes"):
        packet.decode_datagram(valid_datagram(), b"short")
    with pytest.raises(TypeError, match="key must be bytes"):
        packet.decode_datagram(valid_datagram(), "0123456789abcdef0123")


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytearray:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return out


R0 = 42  # first record
R1 = 42 + 84 + 8 + 2 * 42  # second record (sample records: 8-byte frontend, 2 segments)


def malformed_cases() -> dict[str, bytes]:
    data = valid_datagram(nrec=3, nseg=2)
    tag_less = data  # resign() replaces the last 16 bytes
    cases = {
        "record count +1": resign(_patched(tag_less, 40, ">H", 4)),
        "record count -1": resign(_patched(tag_less, 40, ">H", 2)),
        "record count 65535": resign(_patched(tag_less, 40, ">H", 65535)),
        "segment count +1": resign(_patched(tag_less, R0 + 82, ">H", 3)),
        "segment count -1": resign(_patched(tag_less, R0 + 82, ">H", 1)),
        "segment count 65535": resign(_patched(tag_less, R1 + 82, ">H", 65535)),
        "frontend length 255": resign(_patched(tag_less, R0 + 81, ">B", 255)),
        "frontend length 0": resign(_patched(tag_less, R0 + 81, ">B", 0)),
        "family 5": resign(_patched(tag_less, R1 + 76, ">B", 5)),
        "family 0": resign(_patched(tag_less, R0 + 76, ">B", 0)),
        "IPv4 not mapped": resign(_patched(tag_less, R0 + 32, ">B", 1)),
        "IPv4 dst not mapped": resign(_patched(tag_less, R0 + 48 + 10, ">B", 0)),
        "frontend not UTF-8": resign(_patched(tag_less, R0 + 84, ">B", 0xFF)),
        "direction 2": resign(_patched(tag_less, R0 + 84 + 8 + 42, ">B", 2)),
        "index = count": resign(_patched(tag_less, 36, ">H", 1)),
        "count 0": resign(_patched(_patched(tag_less, 36, ">H", 0), 38, ">H", 0)),
        "extra bytes after the records": resign(data[:-16] + b"\0\0\0" + data[-16:]),
        "header length below the datagram": resign(data + b"\0", fix_length=False),
        "no records but bytes": resign(_patched(tag_less, 40, ">H", 0)),
    }
    return cases


MALFORMED = malformed_cases()


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed(packet, data):
    assert reason(packet, data) == "malformed"


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_same_detail(compiled, data):
    assert outcome(compiled, data) == outcome(reference, data)


def test_ipv6_family_accepts_any_address(packet):
    data = valid_datagram(nrec=1)
    as_v6 = resign(_patched(data, R0 + 76, ">B", 6))
    (rec,) = packet.decode_datagram(as_v6, KEY)[3]
    assert rec.src == "::ffff:192.0.2.0" and rec.dst == "::ffff:198.51.100.7"


def test_error_class(packet):
    err = packet.PacketError("replayed", "x")
    assert isinstance(err, ValueError) and err.reason == "replayed" and str(err) == "replayed: x"
    assert packet.PacketError is reference.PacketError
    assert set(packet.REASONS) == {"truncated", "oversized", "bad_magic", "bad_version", "bad_hmac", "malformed",
                                   "replayed"}
    with pytest.raises(ValueError):
        packet.PacketError("nonsense")


# -- fuzzing ------------------------------------------------------------------------------------------

CORPUS = [valid_datagram(3, 2), valid_datagram(1, 0), valid_datagram(0, 0)]
CORPUS.append(reference.encode_packet(HEADER, [sample_record(1, nseg=5, v6=True, frontend="é" * 20)], KEY)[0])
INTERESTING = [0, 1, 2, 3, 4, 5, 6, 0x7F, 0x80, 0xFE, 0xFF]


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif op == 1 and out:
            out[rng.randrange(len(out))] = rng.choice(INTERESTING)
        elif op == 2 and len(out) > 1:
            at = rng.randrange(len(out))
            del out[at : at + rng.randint(1, 64)]
        elif op == 3:
            at = rng.randrange(len(out) + 1)
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif op == 4 and len(out) > 2:
            at = rng.randrange(len(out) - 1)  # a big-endian u16 field to an edge value
            out[at : at + 2] = rng.choice([0, 1, 2, 255, 256, 65535]).to_bytes(2, "big")
        elif op == 5 and out:
            at = rng.randrange(len(out))
            out[at : at + 8] = rng.randbytes(8)
    return bytes(out)


def fuzz_case(mods: list[ModuleType], data: bytes) -> None:
    """Every twin gives the same outcome; PacketError is the only exception out."""
    results = []
    for mod in mods:
        try:
            header, index, count, records = mod.decode_datagram(data, KEY)
        except reference.PacketError as exc:
            assert exc.reason in reference.REASONS
            results.append((exc.reason, exc.detail))
            continue
        assert 0 <= index < count and len(data) <= reference.MAX_DATAGRAM
        # What decodes re-encodes to the same bytes (the format has one encoding).
        again = reference.encode_packet(header, records, KEY, max(len(data), reference.MIN_MTU))
        assert len(again) == 1 and again[0][:36] == data[:36] and again[0][42:-16] == data[42:-16]
        results.append(("ok", header, index, count, records))
    assert all(r == results[0] for r in results), (data.hex(), results)


def fuzz_loop(mods: list[ModuleType], seconds: float, seed: int) -> int:
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    cases = 0
    while time.monotonic() < deadline:
        for _ in range(50):
            kind = rng.randrange(4)
            if kind == 0:
                data = rng.randbytes(rng.randrange(0, 400))
            elif kind == 1:
                data = mutate(rng, rng.choice(CORPUS))  # mostly stopped by the HMAC
            else:
                data = resign(mutate(rng, rng.choice(CORPUS)), fix_length=kind == 2)  # reaches the parser
            fuzz_case(mods, data)
            cases += 1
    return cases


def _twins_for_child() -> list[ModuleType]:
    mods = [reference]
    if os.environ.get("SPOA_NO_EXTENSIONS", "") in ("", "0"):
        try:
            mods.insert(0, importlib.import_module("spoa.wire._packet"))
        except ImportError:
            pass
    return mods


def test_fuzz_time_boxed(request):
    if not compiled_disabled(request.config):
        request.getfixturevalue("compiled")  # skip (CI: fail) when the extension is not built
    seed = random.randrange(1 << 30)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, str(Path(__file__)), "--seconds", str(FUZZ_SECONDS), "--seed", str(seed)],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=FUZZ_SECONDS + 60,
    )  # fmt: skip
    assert result.returncode == 0, f"fuzzer (seed {seed}) exit {result.returncode}:\n{result.stderr[-4000:]}"
    report = json.loads(result.stdout)
    assert report["cases"] > 1000 and len(report["twins"]) == (1 if compiled_disabled(request.config) else 2)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: b"CPUB\x01" + b),
    st.binary(max_size=300).map(lambda b: resign(b"CPUB\x01" + b + bytes(16))),
    st.tuples(st.sampled_from(CORPUS), st.randoms(use_true_random=False)).map(lambda t: resign(mutate(t[1], t[0]))),
))
def test_fuzz_hypothesis(fuzz_twins, data):
    fuzz_case(fuzz_twins, data)


# -- replay guard ---------------------------------------------------------------------------------------


def hdr(node: int, seq: int) -> PacketHeader:
    return PacketHeader(node_id=node, sequence=seq, timestamp_ms=0, interval_ms=1000)


def is_replayed(guard, node: int, seq: int, index: int = 0) -> bool:
    try:
        guard.check(hdr(node, seq), index)
    except reference.PacketError as exc:
        assert exc.reason == "replayed"
        return True
    return False


def test_replay_once_per_datagram(packet):
    guard = packet.ReplayGuard()
    assert not is_replayed(guard, 1, 10, 0)
    assert is_replayed(guard, 1, 10, 0)
    assert not is_replayed(guard, 1, 10, 1)  # another datagram of the same packet
    assert not is_replayed(guard, 2, 10, 0)  # another node
    assert not is_replayed(guard, 1, 11, 0)
    assert not is_replayed(guard, 1, 9, 0)  # late but inside the window, first time
    assert is_replayed(guard, 1, 9, 0)
    assert not is_replayed(guard, 1, 10, 65534)
    assert is_replayed(guard, 1, 10, 65534)


def test_replay_window_edges(packet):
    guard = packet.ReplayGuard(window=64)
    assert not is_replayed(guard, 1, 1000)
    assert not is_replayed(guard, 1, 1000 - 63)  # 63 behind: inside
    assert is_replayed(guard, 1, 1000 - 64)  # 64 behind: outside
    assert is_replayed(guard, 1, 0)
    assert not is_replayed(guard, 1, U64)  # a jump forward is fine
    assert is_replayed(guard, 1, 1000 + 1)  # everything before it is now too old
    assert not is_replayed(guard, 1, U64 - 63, 5)
    with pytest.raises(reference.PacketError, match="outside the 64-sequence window"):
        guard.check(hdr(1, 5), 0)


def test_replay_lru_bounded(packet):
    guard = packet.ReplayGuard(window=4, max_nodes=2)
    assert not is_replayed(guard, 1, 5)
    assert not is_replayed(guard, 2, 5)
    assert not is_replayed(guard, 1, 6)  # node 1 is now the most recent
    assert not is_replayed(guard, 3, 5)  # evicts node 2
    assert len(guard) == 2 and guard.evictions == 1 and 2 not in guard and 1 in guard
    assert is_replayed(guard, 1, 6)
    # The documented limit: a forgotten node's old datagram is new again.
    assert not is_replayed(guard, 2, 5)
    for node in range(100, 1100):
        guard.check(hdr(node, 1), 0)
    assert len(guard) == 2 and guard.evictions == 1002


def test_replay_rejection_changes_nothing(packet):
    guard = packet.ReplayGuard(window=3, max_nodes=1)
    guard.check(hdr(1, 10), 0)
    assert is_replayed(guard, 1, 10)
    assert is_replayed(guard, 1, 7)
    assert len(guard) == 1 and guard.evictions == 0
    assert not is_replayed(guard, 1, 8)


def test_replay_python_state_stays_bounded():
    guard = reference.ReplayGuard(window=8, max_nodes=3)
    for seq in range(10_000):
        guard.check(hdr(seq % 5, seq), seq % 7)
    assert len(guard._nodes) == 3
    assert all(len(seen) <= 8 for _, seen in guard._nodes.values())


def test_replay_guard_arguments(packet):
    for kwargs in ({"window": 0}, {"window": 4097}, {"max_nodes": 0}, {"window": 1.5}):
        error = raised(lambda: reference.ReplayGuard(**kwargs))
        assert error is not None and raised(lambda: packet.ReplayGuard(**kwargs)) == error
    guard = packet.ReplayGuard(window=1)
    assert (guard.window, guard.max_nodes, guard.evictions) == (1, 4096, 0)
    with pytest.raises(AttributeError):
        guard.window = 5
    for bad in (-1, 65535, 1 << 80):
        with pytest.raises(ValueError, match="index out of range"):
            guard.check(hdr(1, 1), bad)
    with pytest.raises(ValueError, match="header.sequence out of range"):
        guard.check(hdr(1, -1), 0)


@FAST
@given(
    st.integers(1, 6),
    st.integers(1, 4),
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 30), st.integers(0, 3)), max_size=80),
)
def test_replay_twins_agree(compiled, window, max_nodes, checks):
    guards = [compiled.ReplayGuard(window, max_nodes), reference.ReplayGuard(window, max_nodes)]
    for node, seq, index in checks:
        results = [raised(g.check, hdr(node, seq), index) for g in guards]
        assert results[0] == results[1]
        assert [len(g) for g in guards][0] == len(guards[1]) and guards[0].evictions == guards[1].evictions


# -- the receiver over a real UDP socket ------------------------------------------------------------------


def test_receiver_over_udp(packet, monkeypatch):
    import spoa.lbnode.packet_receiver as receiver_module

    monkeypatch.setattr(receiver_module, "decode_datagram", packet.decode_datagram)
    received = []
    good = packet.encode_packet(HEADER, [sample_record(i, nseg=8) for i in range(12)], KEY)
    assert len(good) >= 3
    flipped = bytearray(good[0])
    flipped[100] ^= 4
    bad = [
        ("replayed", good[1]),
        ("truncated", good[2][:50]),
        ("truncated", b"CP"),
        ("bad_magic", b"XPUB" + good[0][4:]),
        ("bad_version", good[0][:4] + b"\x02" + good[0][5:]),
        ("bad_hmac", bytes(flipped)),
        ("bad_hmac", packet.encode_packet(replace(HEADER, sequence=5000), [sample_record()], OTHER_KEY)[0]),
        ("malformed", MALFORMED["record count +1"]),
        ("malformed", MALFORMED["direction 2"]),
        ("replayed", packet.encode_packet(replace(HEADER, sequence=HEADER.sequence - 64), [], KEY)[0]),
    ]

    async def run():
        transport, protocol = await receiver_module.open_receiver(
            "127.0.0.1", 0, KEY, lambda h, recs, addr: received.append((h, recs)), replay_guard=packet.ReplayGuard()
        )
        try:
            address = transport.get_extra_info("sockname")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                for data in good:
                    sender.sendto(data, address)
                for _, data in bad:
                    sender.sendto(data, address)
                total = len(good) + len(bad)
                deadline = time.monotonic() + 10
                while protocol.accepted + sum(protocol.rejected.values()) < total:
                    assert time.monotonic() < deadline, protocol.stats()
                    await asyncio.sleep(0.01)
            # Too big for UDP over IPv4: straight into the protocol.
            protocol.datagram_received(good[0] + bytes(65508 - len(good[0])), ("127.0.0.1", 1))
            return protocol.stats()
        finally:
            transport.close()

    stats = asyncio.run(run())
    expected = dict.fromkeys(reference.REASONS, 0)
    for why, _ in bad:
        expected[why] += 1
    expected["oversized"] += 1
    assert stats["rejected"] == expected
    assert stats["accepted"] == len(good) and stats["records"] == 12 and stats["nodes"] == 1
    assert [h for h, _ in received] == [HEADER] * len(good)
    assert [r for _, recs in received for r in recs] == [sample_record(i, nseg=8) for i in range(12)]


def test_receiver_never_raises(packet, monkeypatch, caplog):
    import spoa.lbnode.packet_receiver as receiver_module

    def broken(data, key):
        raise RuntimeError("codec bug")

    def bad_callback(header, records, addr):
        raise KeyError("consumer bug")

    with pytest.raises(ValueError, match="at least 16 bytes"):  # a bad key fails at once
        receiver_module.PacketReceiver(b"short", bad_callback)
    (data,) = packet.encode_packet(HEADER, [sample_record()], KEY)
    protocol = receiver_module.PacketReceiver(KEY, bad_callback, replay_guard=packet.ReplayGuard())
    monkeypatch.setattr(receiver_module, "decode_datagram", packet.decode_datagram)
    protocol.datagram_received(data, None)
    assert protocol.accepted == 1 and protocol.callback_errors == 1
    monkeypatch.setattr(receiver_module, "decode_datagram", broken)
    protocol.datagram_received(data, None)
    assert protocol.rejected["malformed"] == 1
    assert "codec bug" in caplog.text and "consumer bug" in caplog.text


# -- the documentation's worked example -------------------------------------------------------------------

EXAMPLE_KEY = b"example-key-0123456789abcdef-0001"
EXAMPLE_HEADER = PacketHeader(node_id=42, sequence=1_700_000_123, timestamp_ms=1_717_171_717_000, interval_ms=1000)
EXAMPLE_RECORD = ConnectionRecord(
    conn_id=bytes.fromhex("3f2a9c4e1b7d4e0f8a6b5c4d3e2f1a0b"),
    src="192.0.2.10",
    src_port=54321,
    dst="198.51.100.7",
    dst_port=443,
    frontend="fe_https",
    flags=ConnFlags.CLOSING,
    counter_source=CounterSource.KERNEL,
    granularity_level=0,
    requested_lease_ms=0,
    predicted_lease_ms=45_000,
    lease_source=LeaseSource.PREDICTED,
    bytes_in_total=1_843,
    bytes_out_total=2_097_152,
    segments=(
        SegmentRecord(DIR_IN, 0, 1_843, 517, 2, 1_717_171_716_412, 0),
        SegmentRecord(DIR_OUT, 0, 2_097_152, 1_048_576, 724, 1_717_171_716_998, -1),
    ),
)


def example_hex() -> str:
    """The example datagram, 16 bytes a line (what the doc shows)."""
    (data,) = reference.encode_packet(EXAMPLE_HEADER, [EXAMPLE_RECORD], EXAMPLE_KEY)
    return "\n".join(data[i : i + 16].hex(" ") for i in range(0, len(data), 16))


def test_doc_example_is_the_encoders_output(packet):
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- example-hex -->\s*```\n(.*?)\n```", text, re.S)
    assert block, "docs/publishing-packet.md lost its example-hex block"
    documented = "\n".join(line.split("  ")[1] for line in block.group(1).splitlines())
    assert documented == example_hex(), "regenerate with: PYTHONPATH=. python tests/wire/test_packet.py --example"
    (data,) = packet.encode_packet(EXAMPLE_HEADER, [EXAMPLE_RECORD], EXAMPLE_KEY)
    assert data.hex() == documented.replace(" ", "").replace("\n", "")
    assert packet.decode_datagram(data, EXAMPLE_KEY) == (EXAMPLE_HEADER, 0, 1, [EXAMPLE_RECORD])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=FUZZ_SECONDS)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--example", action="store_true", help="print the doc's example hex dump and exit")
    args = parser.parse_args()
    if args.example:
        for n, line in enumerate(example_hex().splitlines()):
            print(f"{n * 16:04x}  {line}")
        return
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    mods = _twins_for_child()
    try:
        cases = fuzz_loop(mods, args.seconds, seed)
    except AssertionError:
        print(f"seed {seed}", file=sys.stderr)
        raise
    print(json.dumps({"seed": seed, "cases": cases, "twins": [m.__name__ for m in mods]}))


if __name__ == "__main__":
    main()
