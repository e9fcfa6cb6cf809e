"""Byte-level tests of the SPOP codec, run against both twins.

Every test takes the `codec` fixture (tests/conftest.py), so it runs once on
the compiled spoa.spop._codec ("cython") and once on spoa.spop._codec_py ("python").
Expected bytes are written out by hand from ../shared/notes/spop.md sections
1 and 2 (golden frames of section 2.4, varint table of section 2.1), never
computed with the codec under test, so a bug shared by both twins still fails.
"""

from __future__ import annotations

import random
import socket
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoa.spop import frames
from spoa.spop.constants import FLAG_FIN, DataType, FrameType, Scope, Status
from spoa.spop.errors import (
    E_BAD_ACTION,
    E_FRAME_TOO_BIG,
    E_FRAME_TOO_SHORT,
    E_TRUNCATED_DATA,
    E_TRUNCATED_MESSAGE,
    E_TRUNCATED_STRING,
    E_TRUNCATED_VARINT,
    E_UNKNOWN_DATA_TYPE,
    E_VARINT_TOO_LONG,
    SpopError,
)

U64_MAX = (1 << 64) - 1
DEFAULT_MAX_FRAME_SIZE = 16380

# -- golden frames (spop.md 2.4), one comment per segment ----------------------

# HAPROXY-HELLO that `option spop-check` sends in 3.1/3.2 (82 bytes; HAProxy's
# own regtest reg-tests/checks/spop-check.vtc does `recv 82`).
HEALTHCHECK_HELLO = (
    b"\x00\x00\x00\x4e"  # length 78 (all bytes after this prefix)
    b"\x01"  # type 1 HAPROXY-HELLO
    b"\x00\x00\x00\x01"  # flags FIN
    b"\x00"  # stream-id 0 (HELLO)
    b"\x00"  # frame-id 0
    b"\x12supported-versions"  # key: varint length 18 + bytes
    b"\x08\x03" b"2.0"  # STRING, length 3, "2.0"
    b"\x0emax-frame-size"  # key: length 14
    b"\x03\xfc\xf0\x06"  # UINT32 16380 (3-byte varint)
    b"\x0ccapabilities"  # key: length 12
    b"\x08\x00"  # STRING, empty
    b"\x0bhealthcheck"  # key: length 11
    b"\x11"  # BOOL true (type 1 in the low nibble, true flag 0x10)
)

# HAPROXY-HELLO of a normal 3.1+ connection, as captured on the wire (a hex
# dump published with a third-party agent, not generated here): only
# "pipelining" is announced, and an engine-id follows.
HAPROXY_HELLO_WITH_ENGINE_ID = (
    b"\x00\x00\x00\x7b"  # length 123
    b"\x01"  # type 1 HAPROXY-HELLO
    b"\x00\x00\x00\x01"  # flags FIN
    b"\x00"  # stream-id 0
    b"\x00"  # frame-id 0
    b"\x12supported-versions"  # key: length 18
    b"\x08\x03" b"2.0"  # STRING "2.0"
    b"\x0emax-frame-size"  # key: length 14
    b"\x03\xfc\xf0\x06"  # UINT32 16380
    b"\x0ccapabilities"  # key: length 12
    b"\x08\x0a" b"pipelining"  # STRING, length 10
    b"\x09engine-id"  # key: length 9
    b"\x08\x24" b"4127d137-5a2a-4557-9048-49eca30b54f9"  # STRING, length 36
)

AGENT_HELLO = (
    b"\x00\x00\x00\x40"  # length 64
    b"\x65"  # type 101 AGENT-HELLO
    b"\x00\x00\x00\x01"  # flags FIN
    b"\x00"  # stream-id 0
    b"\x00"  # frame-id 0
    b"\x07version"  # key: length 7
    b"\x08\x03" b"2.0"  # STRING "2.0"
    b"\x0emax-frame-size"  # key: length 14
    b"\x03\xfc\xf0\x06"  # UINT32 16380
    b"\x0ccapabilities"  # key: length 12
    b"\x08\x0a" b"pipelining"  # STRING, length 10
)

NOTIFY = (
    b"\x00\x00\x00\x1e"  # length 30
    b"\x03"  # type 3 NOTIFY
    b"\x00\x00\x00\x01"  # flags FIN
    b"\x01"  # stream-id 1
    b"\x01"  # frame-id 1
    b"\x04conn"  # message name: length 4
    b"\x02"  # NB-ARGS 2 (one raw byte, not a varint)
    b"\x02ip"  # arg name: length 2
    b"\x06\xc0\x00\x02\x0a"  # IPV4 192.0.2.10 (4 raw bytes, network order)
    b"\x04port"  # arg name: length 4
    b"\x04\xf2\xf3\x17"  # INT64 51234 (3-byte varint)
)

ACK = (
    b"\x00\x00\x00\x19"  # length 25
    b"\x67"  # type 103 ACK
    b"\x00\x00\x00\x01"  # flags FIN
    b"\x01"  # stream-id 1
    b"\x01"  # frame-id 1
    b"\x01\x03\x02"  # SET-VAR, NB-ARGS 3, scope 2 (txn)
    b"\x05lease"  # var name: length 5
    b"\x04\xf0\xc4\x0d"  # INT64 30000
    b"\x02\x02\x01"  # UNSET-VAR, NB-ARGS 2, scope 1 (sess)
    b"\x01x"  # var name: length 1
)

AGENT_DISCONNECT = (
    b"\x00\x00\x00\x25"  # length 37
    b"\x66"  # type 102 AGENT-DISCONNECT
    b"\x00\x00\x00\x01"  # flags FIN
    b"\x00"  # stream-id 0
    b"\x00"  # frame-id 0
    b"\x0bstatus-code"  # key: length 11
    b"\x03\x00"  # UINT32 0 (normal)
    b"\x07message"  # key: length 7
    b"\x08\x06" b"normal"  # STRING, length 6
)

# A 3.1+ NOTIFY whose every message was filtered out by its ACL: HAProxy
# 3.1.0-3.2.x sends it with an empty payload (spop.md 2.3) and expects an ACK.
EMPTY_NOTIFY = (
    b"\x00\x00\x00\x07"  # length 7, the minimum
    b"\x03"  # type 3 NOTIFY
    b"\x00\x00\x00\x01"  # flags FIN
    b"\x01"  # stream-id 1
    b"\x01"  # frame-id 1 (no payload)
)

# An ACK without actions: valid (spop.md 2.3), what a handler with nothing to
# say sends back.
EMPTY_ACK = (
    b"\x00\x00\x00\x07"  # length 7
    b"\x67"  # type 103 ACK
    b"\x00\x00\x00\x01"  # flags FIN
    b"\x01"  # stream-id 1
    b"\x01"  # frame-id 1
)


# -- varint vectors (spop.md 2.1) -----------------------------------------------

# (value, encoding): the worked-examples table plus the boundaries the brief
# and code-models.md 10.10 ask for. 239/240, 2287/2288 and 264431/264432 are
# where the encoded length changes.
VARINT_VECTORS = [
    (0, "00"),
    (1, "01"),
    (239, "ef"),
    (240, "f0 00"),
    (255, "ff 00"),
    (256, "f0 01"),
    (2287, "ff 7f"),
    (2288, "f0 80 00"),
    (16380, "fc f0 06"),  # HAProxy's default max-frame-size
    (30000, "f0 c4 0d"),
    (51234, "f2 f3 17"),
    (264431, "ff ff 7f"),
    (264432, "f0 80 80 00"),
    (2**32 - 1, "ff f0 fe fe 7e"),
    (2**63 - 1, "ff f0 fe fe fe fe fe fe fe 06"),
    (2**63, "f0 f1 fe fe fe fe fe fe fe 06"),  # first value that needs UINT64
    (U64_MAX, "ff f0 fe fe fe fe fe fe fe 0e"),
]

# (encoded length, first value, last value) from the spop.md 2.1 length table.
VARINT_LENGTH_RANGES = [
    (1, 0, 239),
    (2, 240, 2_287),
    (3, 2_288, 264_431),
    (4, 264_432, 33_818_863),
    (5, 33_818_864, 4_328_786_159),
    (6, 4_328_786_160, 554_084_600_047),
    (7, 554_084_600_048, 70_922_828_777_711),
    (8, 70_922_828_777_712, 9_078_122_083_518_703),
    (9, 9_078_122_083_518_704, 1_161_999_626_690_365_679),
    (10, 1_161_999_626_690_365_680, U64_MAX),
]


def spec_varint_value(encoded: bytes) -> int:
    """The decoding formula of spop.md 2.1, v = b0 + sum(b_k * 2^(4+7(k-1))).

    An oracle independent of both twins, used to check the tables above.
    """
    return encoded[0] + sum(byte << (4 + 7 * (k - 1)) for k, byte in enumerate(encoded[1:], 1))


# -- typed data vectors (spop.md 2.2) --------------------------------------------

# (python value, encoding written by put_typed): what the agent sends.
TYPED_VECTORS = [
    pytest.param(None, "00", id="null"),
    pytest.param(True, "11", id="bool-true"),
    pytest.param(False, "01", id="bool-false"),
    pytest.param(0, "04 00", id="int-0"),
    pytest.param(51234, "04 f2 f3 17", id="int-51234"),
    # Negative ints go out as 64-bit two's complement (spop.md 2.1).
    pytest.param(-1, "04 ff f0 fe fe fe fe fe fe fe 0e", id="int-minus-1"),
    pytest.param(-(2**63), "04 f0 f1 fe fe fe fe fe fe fe 06", id="int64-min"),
    pytest.param(2**63 - 1, "04 ff f0 fe fe fe fe fe fe fe 06", id="int64-max"),
    # Above INT64 the writer switches to UINT64 so the value survives.
    pytest.param(2**63, "05 f0 f1 fe fe fe fe fe fe fe 06", id="uint64-2^63"),
    pytest.param(U64_MAX, "05 ff f0 fe fe fe fe fe fe fe 0e", id="uint64-max"),
    pytest.param(IPv4Address("192.0.2.10"), "06 c0 00 02 0a", id="ipv4"),
    pytest.param(
        IPv6Address("2001:db8::1"), "07 20 01 0d b8 00 00 00 00 00 00 00 00 00 00 00 01", id="ipv6"
    ),
    pytest.param("", "08 00", id="string-empty"),
    pytest.param("2.0", "08 03 32 2e 30", id="string"),
    pytest.param("é", "08 02 c3 a9", id="string-utf8"),
    # 300 bytes: the length itself needs a 2-byte varint (fc 03 = 252 + 3*16).
    pytest.param("a" * 300, "08 fc 03" + " 61" * 300, id="string-300"),
    pytest.param(b"", "09 00", id="binary-empty"),
    pytest.param(b"\x00\xff", "09 02 00 ff", id="binary"),
]

# (encoding, decoded value) for inputs the agent only receives.
DECODE_ONLY_VECTORS = [
    # An INT32 sent as 32-bit two's complement reads back as +4294967295,
    # exactly as HAProxy reads it (spop.md 2.1): only 64-bit negatives work.
    pytest.param("02 ff f0 fe fe 7e", 2**32 - 1, id="int32-32bit-twos-complement"),
    pytest.param("02 ff f0 fe fe fe fe fe fe fe 0e", -1, id="int32-minus-1"),
    pytest.param("03 fc f0 06", 16380, id="uint32"),
    pytest.param("04 ff f0 fe fe fe fe fe fe fe 0e", -1, id="int64-minus-1"),
    # The same varint is 2^64-1 as UINT64 and -1 as INT64.
    pytest.param("05 ff f0 fe fe fe fe fe fe fe 0e", U64_MAX, id="uint64-max"),
    pytest.param("11", True, id="bool-true"),
    pytest.param("01", False, id="bool-false"),
    pytest.param("00", None, id="null"),
    # Invalid UTF-8 in a string must not kill decoding: surrogateescape.
    pytest.param("08 02 c3 28", "\udcc3(", id="string-invalid-utf8"),
]


def unhex(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def read_frames(codec, data: bytes, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> list:
    """Feed `data` at once and return every complete frame."""
    reader = codec.FrameReader(max_frame_size)
    reader.feed(data)
    return drain(reader)


def drain(reader) -> list:
    out = []
    while (frame := reader.next_frame()) is not None:
        out.append(frame)
    return out


def header_and_payload(frame) -> tuple:
    return (frame.type, frame.flags, frame.stream_id, frame.frame_id, frame.payload)


def decode_typed(codec, encoded: bytes):
    """Decode one typed value by wrapping it in a one-entry KV-LIST."""
    frame = codec.Frame.from_payload(FrameType.AGENT_HELLO, FLAG_FIN, 0, 0, b"\x01v" + encoded)
    return frame.kv()["v"]


def payload_of(codec, payload: bytes):
    return codec.Frame.from_payload(FrameType.NOTIFY, FLAG_FIN, 1, 1, payload)


def assert_spop_error(excinfo, status: Status, detail: str) -> None:
    assert excinfo.value.status == status
    assert excinfo.value.detail == detail


def is_compiled(codec) -> bool:
    return codec.__name__ == "spoa.spop._codec"


# -- golden frames: decoding ----------------------------------------------------------


def test_healthcheck_hello_decodes(codec):
    [frame] = read_frames(codec, HEALTHCHECK_HELLO)
    assert len(HEALTHCHECK_HELLO) == 82
    assert (frame.type, frame.flags, frame.stream_id, frame.frame_id) == (FrameType.HAPROXY_HELLO, FLAG_FIN, 0, 0)
    assert frame.payload_length == 78 - 7
    kv = frame.kv()
    assert kv == {"supported-versions": "2.0", "max-frame-size": 16380, "capabilities": "", "healthcheck": True}
    # True must be the bool, not 1: the server tests `is True` for healthchecks.
    assert kv["healthcheck"] is True


def test_captured_haproxy_hello_decodes(codec):
    [frame] = read_frames(codec, HAPROXY_HELLO_WITH_ENGINE_ID)
    assert frame.kv() == {
        "supported-versions": "2.0",
        "max-frame-size": 16380,
        "capabilities": "pipelining",
        "engine-id": "4127d137-5a2a-4557-9048-49eca30b54f9",
    }


def test_agent_hello_decodes(codec):
    [frame] = read_frames(codec, AGENT_HELLO)
    assert (frame.type, frame.flags, frame.stream_id, frame.frame_id) == (FrameType.AGENT_HELLO, FLAG_FIN, 0, 0)
    assert frame.kv() == {"version": "2.0", "max-frame-size": 16380, "capabilities": "pipelining"}


def test_notify_decodes(codec):
    [frame] = read_frames(codec, NOTIFY)
    assert (frame.type, frame.flags, frame.stream_id, frame.frame_id) == (FrameType.NOTIFY, FLAG_FIN, 1, 1)
    [message] = frame.messages()
    assert message.name == "conn"
    assert message.nargs == len(message) == 2
    assert message.items() == [("ip", IPv4Address("192.0.2.10")), ("port", 51234)]
    assert message.get("ip") == IPv4Address("192.0.2.10")
    assert message.get("port") == 51234
    assert message.args == {"ip": IPv4Address("192.0.2.10"), "port": 51234}


def test_ack_decodes(codec):
    [frame] = read_frames(codec, ACK)
    assert (frame.type, frame.flags, frame.stream_id, frame.frame_id) == (FrameType.ACK, FLAG_FIN, 1, 1)
    assert frame.actions() == [("set-var", Scope.TXN, "lease", 30000), ("unset-var", Scope.SESS, "x")]


def test_agent_disconnect_decodes(codec):
    [frame] = read_frames(codec, AGENT_DISCONNECT)
    assert (frame.type, frame.stream_id, frame.frame_id) == (FrameType.AGENT_DISCONNECT, 0, 0)
    assert frame.kv() == {"status-code": 0, "message": "normal"}


def test_empty_notify_has_no_messages(codec):
    # HAProxy 3.1.0-3.2.x bug (spop.md 2.3): the agent must still ACK it.
    [frame] = read_frames(codec, EMPTY_NOTIFY)
    assert frame.type == FrameType.NOTIFY
    assert frame.payload == b""
    assert frame.messages() == []


def test_empty_kv_and_action_lists(codec):
    frame = payload_of(codec, b"")
    assert frame.kv() == {}
    assert frame.actions() == []  # an empty ACK is valid


# -- golden frames: encoding --------------------------------------------------------


def test_write_healthcheck_hello(codec):
    writer = codec.FrameWriter()
    length = frames.write_haproxy_hello(writer, DEFAULT_MAX_FRAME_SIZE, "", healthcheck=True)
    assert writer.take() == HEALTHCHECK_HELLO
    assert length == len(HEALTHCHECK_HELLO) - 4


def test_write_captured_haproxy_hello(codec):
    writer = codec.FrameWriter()
    frames.write_haproxy_hello(
        writer, DEFAULT_MAX_FRAME_SIZE, "pipelining", engine_id="4127d137-5a2a-4557-9048-49eca30b54f9"
    )
    assert writer.take() == HAPROXY_HELLO_WITH_ENGINE_ID


def test_write_agent_hello(codec):
    writer = codec.FrameWriter()
    assert frames.write_agent_hello(writer, DEFAULT_MAX_FRAME_SIZE, ["pipelining"]) == 64
    assert writer.take() == AGENT_HELLO


def test_write_notify(codec):
    writer = codec.FrameWriter()
    frames.write_notify(writer, 1, 1, [("conn", [("ip", IPv4Address("192.0.2.10")), ("port", 51234)])])
    assert writer.take() == NOTIFY


def test_write_ack_with_set_var_and_unset_var(codec):
    writer = codec.FrameWriter()
    writer.begin_frame(FrameType.ACK, 1, 1)
    writer.set_var(Scope.TXN, "lease", 30000)
    writer.unset_var(Scope.SESS, "x")
    assert writer.end_frame() == 25
    assert writer.take() == ACK


def test_write_agent_disconnect(codec):
    writer = codec.FrameWriter()
    frames.write_disconnect(writer, FrameType.AGENT_DISCONNECT, Status.NORMAL, "normal")
    assert writer.take() == AGENT_DISCONNECT


def test_write_empty_notify(codec):
    writer = codec.FrameWriter()
    frames.write_notify(writer, 1, 1, [])
    assert writer.take() == EMPTY_NOTIFY


def test_disconnect_message_is_cut_to_255_bytes_on_a_character_boundary(codec):
    # HAProxy 2.x rejects longer messages; a 2-byte character must not be split.
    writer = codec.FrameWriter()
    frames.write_disconnect(writer, FrameType.AGENT_DISCONNECT, Status.INVALID, "é" * 200)
    [frame] = read_frames(codec, writer.take())
    message = frame.kv()["message"]
    assert message == "é" * 127  # 254 bytes: the 128th "é" would straddle byte 255
    assert frame.kv()["status-code"] == Status.INVALID


# -- varint ----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "encoding"), VARINT_VECTORS)
def test_varint_table_matches_the_spec_formula(value, encoding):
    # Guards the hand-written table itself (no codec involved).
    assert spec_varint_value(unhex(encoding)) == value


@pytest.mark.parametrize(("value", "encoding"), VARINT_VECTORS)
def test_encode_varint(codec, value, encoding):
    assert codec.encode_varint(value) == unhex(encoding)


@pytest.mark.parametrize(("value", "encoding"), VARINT_VECTORS)
def test_decode_varint(codec, value, encoding):
    data = unhex(encoding)
    assert codec.decode_varint(data, 0, len(data)) == (value, len(data))
    # Mid-buffer, with bytes on both sides: stops exactly after the varint.
    padded = b"\xaa" + data + b"\xbb\xcc"
    assert codec.decode_varint(padded, 1, len(padded)) == (value, 1 + len(data))


@pytest.mark.parametrize(("nbytes", "first", "last"), VARINT_LENGTH_RANGES)
def test_varint_length_boundaries(codec, nbytes, first, last):
    for value in (first, last):
        encoded = codec.encode_varint(value)
        assert len(encoded) == nbytes, value
        assert spec_varint_value(encoded) == value
        assert codec.decode_varint(encoded, 0, nbytes) == (value, nbytes)
    if first > 0:
        assert len(codec.encode_varint(first - 1)) == nbytes - 1


def test_masking_leb128_decoder_trap(codec):
    # HAProxy adds each byte *with* its 0x80 bit; a LEB128 decoder that masks
    # b & 0x7F reads f0 80 00 as 240.
    assert codec.decode_varint(b"\xf0\x80\x00", 0, 3) == (2288, 3)
    assert codec.decode_varint(b"\xff\xff\x7f", 0, 3) == (264431, 3)


@pytest.mark.parametrize("value", [-1, 2**64, 2**70])
def test_encode_varint_out_of_range(codec, value):
    with pytest.raises(OverflowError):
        codec.encode_varint(value)


@pytest.mark.parametrize(
    "encoding",
    [
        pytest.param("", id="empty"),
        pytest.param("f0", id="marker-only"),
        pytest.param("f0 80", id="continuation-then-end"),
        pytest.param("ff" + " 80" * 8, id="nine-bytes-all-continuing"),
    ],
)
def test_truncated_varint(codec, encoding):
    data = unhex(encoding)
    with pytest.raises(SpopError) as excinfo:
        codec.decode_varint(data, 0, len(data))
    assert_spop_error(excinfo, Status.INVALID, E_TRUNCATED_VARINT)


def test_varint_stops_at_end_not_at_buffer_end(codec):
    # The bound is `end`, not len(buf): a varint that continues past `end`
    # is truncated even though the buffer holds its last byte.
    with pytest.raises(SpopError) as excinfo:
        codec.decode_varint(b"\xf0\x80\x00", 0, 2)
    assert_spop_error(excinfo, Status.INVALID, E_TRUNCATED_VARINT)


@pytest.mark.parametrize(
    "encoding",
    [
        # 11 bytes: the 10th byte (shift 60) still has its continuation bit.
        pytest.param("f0" + " 80" * 9 + " 00", id="eleven-bytes"),
        # 10 bytes, the 10th >= 16: its bits land at 2^64 and above.
        pytest.param("f0" + " 80" * 8 + " 10", id="tenth-byte-16"),
        pytest.param("f0" + " 80" * 8 + " 7f", id="tenth-byte-127"),
        # 10th byte < 16 but the sum passes 2^64-1 by one step of 2^60.
        pytest.param("ff f0 fe fe fe fe fe fe fe 0f", id="sum-overflows"),
    ],
)
def test_overlong_varint(codec, encoding):
    data = unhex(encoding)
    with pytest.raises(SpopError) as excinfo:
        codec.decode_varint(data, 0, len(data))
    assert_spop_error(excinfo, Status.INVALID, E_VARINT_TOO_LONG)


# -- typed data --------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "encoding"), TYPED_VECTORS)
def test_put_typed(codec, value, encoding):
    writer = codec.FrameWriter()
    writer.put_typed(value)
    assert writer.take() == unhex(encoding)


@pytest.mark.parametrize(("value", "encoding"), TYPED_VECTORS)
def test_decode_typed(codec, value, encoding):
    decoded = decode_typed(codec, unhex(encoding))
    assert decoded == value
    assert type(decoded) is type(value)  # bool stays bool, bytes stays bytes


@pytest.mark.parametrize(("encoding", "value"), DECODE_ONLY_VECTORS)
def test_decode_only_typed(codec, encoding, value):
    decoded = decode_typed(codec, unhex(encoding))
    assert decoded == value
    assert type(decoded) is type(value)


def test_put_typed_binary_accepts_bytes_like(codec):
    writer = codec.FrameWriter()
    writer.put_typed(bytearray(b"ab"))
    writer.put_typed(memoryview(b"abcd")[::2])  # non-contiguous view
    assert writer.take() == b"\x09\x02ab" b"\x09\x02ac"


@pytest.mark.parametrize(
    ("dtype", "value", "encoding"),
    [
        (DataType.UINT32, 16380, "03 fc f0 06"),
        (DataType.UINT32, 2**32 - 1, "03 ff f0 fe fe 7e"),
        (DataType.UINT64, U64_MAX, "05 ff f0 fe fe fe fe fe fe fe 0e"),
        # Negative INT32 still goes out as 64-bit two's complement (spop.md 2.1).
        (DataType.INT32, -1, "02 ff f0 fe fe fe fe fe fe fe 0e"),
        (DataType.INT32, 2**31 - 1, "02 ff f0 fe fe 3e"),
        (DataType.INT64, -(2**63), "04 f0 f1 fe fe fe fe fe fe fe 06"),
        (DataType.STRING, "", "08 00"),
        (DataType.BINARY, b"\x01", "09 01 01"),
        (DataType.BOOL, True, "11"),
        (DataType.BOOL, False, "01"),
        (DataType.NULL, None, "00"),
        (DataType.IPV4, IPv4Address("10.0.0.1"), "06 0a 00 00 01"),
    ],
)
def test_put_typed_as(codec, dtype, value, encoding):
    writer = codec.FrameWriter()
    writer.put_typed_as(dtype, value)
    assert writer.take() == unhex(encoding)
    if dtype in (DataType.INT32, DataType.UINT32, DataType.INT64, DataType.UINT64):
        # Guards the hand-written literal: 64-bit two's complement per the spec.
        assert spec_varint_value(unhex(encoding)[1:]) == value % 2**64


@pytest.mark.parametrize(
    ("dtype", "value", "error"),
    [
        (DataType.INT32, 2**31, OverflowError),
        (DataType.INT32, -(2**31) - 1, OverflowError),
        (DataType.UINT32, 2**32, OverflowError),
        (DataType.UINT32, -1, OverflowError),
        (DataType.INT64, 2**63, OverflowError),
        (DataType.UINT64, 2**64, OverflowError),
        (DataType.BOOL, 1, TypeError),
        (DataType.STRING, b"bytes", TypeError),
        (DataType.IPV6, IPv4Address("10.0.0.1"), TypeError),
        (10, 1, ValueError),
    ],
)
def test_put_typed_as_rejects(codec, dtype, value, error):
    writer = codec.FrameWriter()
    with pytest.raises(error):
        writer.put_typed_as(dtype, value)
    assert len(writer) == 0  # these checks all run before the first byte is written


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 1.5, object(), {"a": 1}])
def test_put_typed_rejects(codec, value):
    writer = codec.FrameWriter()
    with pytest.raises((OverflowError, TypeError)):
        writer.put_typed(value)
    assert len(writer) == 0


# -- decoding errors -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", range(10, 16))
def test_unknown_data_type(codec, dtype):
    # In a KV-LIST, a message argument and a set-var value alike.
    for payload, decode in (
        (b"\x01k" + bytes([dtype]), "kv"),
        (b"\x01m\x01\x01a" + bytes([dtype]), "messages"),
        (b"\x01\x03\x02\x01v" + bytes([dtype]), "actions"),
    ):
        with pytest.raises(SpopError) as excinfo:
            getattr(payload_of(codec, payload), decode)()
        assert_spop_error(excinfo, Status.INVALID, E_UNKNOWN_DATA_TYPE)


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        pytest.param(b"\x01k\x08\x05abc", E_TRUNCATED_STRING, id="string-value-past-end"),
        pytest.param(b"\x01k\x09\xf0\x01", E_TRUNCATED_STRING, id="binary-256-bytes-missing"),
        pytest.param(b"\x05ab", E_TRUNCATED_STRING, id="key-past-end"),
        pytest.param(b"\x01k", E_TRUNCATED_DATA, id="key-without-value"),
        pytest.param(b"\x01k\x06\xc0\x00\x02", E_TRUNCATED_DATA, id="ipv4-3-bytes"),
        pytest.param(b"\x01k\x07" + bytes(15), E_TRUNCATED_DATA, id="ipv6-15-bytes"),
        pytest.param(b"\x01k\x04\xf0", E_TRUNCATED_VARINT, id="int-varint-cut"),
        pytest.param(b"\x01k\x03" + unhex("f0" + " 80" * 9 + " 00"), E_VARINT_TOO_LONG, id="int-overlong"),
        pytest.param(b"\xf0", E_TRUNCATED_VARINT, id="key-length-cut"),
    ],
)
def test_kv_errors(codec, payload, detail):
    with pytest.raises(SpopError) as excinfo:
        payload_of(codec, payload).kv()
    assert_spop_error(excinfo, Status.INVALID, detail)


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        pytest.param(b"\x04conn", E_TRUNCATED_MESSAGE, id="no-nb-args"),
        pytest.param(b"\x04con", E_TRUNCATED_STRING, id="name-past-end"),
        pytest.param(b"\x04conn\x02\x02ip\x00", E_TRUNCATED_VARINT, id="second-arg-missing"),
        pytest.param(b"\x04conn\x01\x02ip", E_TRUNCATED_DATA, id="arg-value-missing"),
        pytest.param(b"\x04conn\x01\x05ip", E_TRUNCATED_STRING, id="arg-name-past-end"),
        # A valid first message does not excuse a broken second one.
        pytest.param(b"\x04conn\x00\x04ping", E_TRUNCATED_MESSAGE, id="second-message-cut"),
    ],
)
def test_truncated_message(codec, payload, detail):
    with pytest.raises(SpopError) as excinfo:
        payload_of(codec, payload).messages()
    assert_spop_error(excinfo, Status.INVALID, detail)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x03\x03\x02\x01x\x00", id="unknown-type-3"),
        pytest.param(b"\x00\x03\x02\x01x\x00", id="type-0"),
        pytest.param(b"\x01\x02\x02\x01x\x00", id="set-var-with-2-args"),
        pytest.param(b"\x02\x03\x02\x01x", id="unset-var-with-3-args"),
        pytest.param(b"\x01\x03", id="two-bytes"),
        pytest.param(b"\x02\x02\x01\x01x" b"\x01", id="valid-then-one-byte"),
    ],
)
def test_bad_action(codec, payload):
    with pytest.raises(SpopError) as excinfo:
        payload_of(codec, payload).actions()
    assert_spop_error(excinfo, Status.INVALID, E_BAD_ACTION)


def test_set_var_without_value(codec):
    with pytest.raises(SpopError) as excinfo:
        payload_of(codec, b"\x01\x03\x02\x05lease").actions()
    assert_spop_error(excinfo, Status.INVALID, E_TRUNCATED_DATA)


# -- FrameReader errors ---------------------------------------------------------------


def test_oversize_length_fails_on_the_prefix_alone(codec):
    # A 4 GB length prefix must be refused from its 4 bytes: the reader may
    # neither wait for the payload nor buffer anything beyond the prefix.
    reader = codec.FrameReader(DEFAULT_MAX_FRAME_SIZE)
    for byte in b"\xff\xff\xff":
        reader.feed(bytes([byte]))
        assert reader.next_frame() is None
    reader.feed(b"\xff")
    with pytest.raises(SpopError) as excinfo:
        reader.next_frame()
    assert_spop_error(excinfo, Status.TOO_BIG, E_FRAME_TOO_BIG)
    assert reader.buffered == 4


@pytest.mark.parametrize("max_frame_size", [7, 256, DEFAULT_MAX_FRAME_SIZE])
def test_max_frame_size_is_inclusive(codec, max_frame_size):
    payload_size = max_frame_size - 7
    frame = max_frame_size.to_bytes(4, "big") + b"\x03\x00\x00\x00\x01\x01\x01" + bytes(payload_size)
    [decoded] = read_frames(codec, frame, max_frame_size)
    assert decoded.payload_length == payload_size

    too_big = (max_frame_size + 1).to_bytes(4, "big")
    reader = codec.FrameReader(max_frame_size)
    reader.feed(too_big)
    with pytest.raises(SpopError) as excinfo:
        reader.next_frame()
    assert_spop_error(excinfo, Status.TOO_BIG, E_FRAME_TOO_BIG)


@pytest.mark.parametrize("length", range(7))
def test_length_below_minimum(codec, length):
    # Refused from the prefix too: HAProxy rejects frames under 7 bytes.
    reader = codec.FrameReader(DEFAULT_MAX_FRAME_SIZE)
    reader.feed(length.to_bytes(4, "big"))
    with pytest.raises(SpopError) as excinfo:
        reader.next_frame()
    assert_spop_error(excinfo, Status.INVALID, E_FRAME_TOO_SHORT)


@pytest.mark.parametrize(
    ("frame", "detail"),
    [
        # length 7: stream-id f0 80 needs a third byte, which is past the frame
        pytest.param(b"\x00\x00\x00\x07\x03\x00\x00\x00\x01\xf0\x80", E_TRUNCATED_VARINT, id="stream-id-cut"),
        # length 7: stream-id f0 00 (240) leaves no byte for the frame-id
        pytest.param(b"\x00\x00\x00\x07\x03\x00\x00\x00\x01\xf0\x00", E_TRUNCATED_VARINT, id="frame-id-missing"),
        # length 16: an 11-byte stream-id
        pytest.param(
            b"\x00\x00\x00\x10\x03\x00\x00\x00\x01" + unhex("f0" + " 80" * 9 + " 00"),
            E_VARINT_TOO_LONG,
            id="stream-id-overlong",
        ),
    ],
)
def test_bad_header_varints(codec, frame, detail):
    reader = codec.FrameReader(DEFAULT_MAX_FRAME_SIZE)
    reader.feed(frame)
    with pytest.raises(SpopError) as excinfo:
        reader.next_frame()
    assert_spop_error(excinfo, Status.INVALID, detail)


def test_max_ids_in_header(codec):
    frame = (
        b"\x00\x00\x00\x19"  # length 25
        b"\x03"  # NOTIFY
        b"\xff\xff\xff\xff"  # every flag bit (reserved ones included) is kept
        b"\xff\xf0\xfe\xfe\xfe\xfe\xfe\xfe\xfe\x0e"  # stream-id 2^64-1
        b"\xff\xf0\xfe\xfe\xfe\xfe\xfe\xfe\xfe\x0e"  # frame-id 2^64-1
    )
    [decoded] = read_frames(codec, frame)
    assert (decoded.flags, decoded.stream_id, decoded.frame_id) == (0xFFFFFFFF, U64_MAX, U64_MAX)
    assert decoded.messages() == []


def test_incomplete_frame_returns_none(codec):
    reader = codec.FrameReader(DEFAULT_MAX_FRAME_SIZE)
    assert reader.next_frame() is None
    reader.feed(NOTIFY[:-1])
    assert reader.next_frame() is None
    assert reader.buffered == len(NOTIFY) - 1
    reader.feed(NOTIFY[-1:])
    assert header_and_payload(reader.next_frame())[:4] == (FrameType.NOTIFY, FLAG_FIN, 1, 1)
    assert reader.buffered == 0
    assert reader.next_frame() is None


# -- fragmentation -----------------------------------------------------------------------


def build_stream(codec) -> tuple[bytes, list]:
    """Many frames back to back, and the (header, payload) tuples expected."""
    writer = codec.FrameWriter()
    frames.write_notify(writer, 2**64 - 1, 2288, [("big", [("s", "x" * 400), ("n", -1)])])
    frames.write_notify(writer, 239, 240, [("m", [("", None)]), ("z", [])])
    generated = writer.take()
    stream = HEALTHCHECK_HELLO + AGENT_HELLO + NOTIFY + EMPTY_NOTIFY + ACK + generated + AGENT_DISCONNECT
    expected = [
        (FrameType.HAPROXY_HELLO, FLAG_FIN, 0, 0, HEALTHCHECK_HELLO[11:]),
        (FrameType.AGENT_HELLO, FLAG_FIN, 0, 0, AGENT_HELLO[11:]),
        (FrameType.NOTIFY, FLAG_FIN, 1, 1, NOTIFY[11:]),
        (FrameType.NOTIFY, FLAG_FIN, 1, 1, b""),
        (FrameType.ACK, FLAG_FIN, 1, 1, ACK[11:]),
        (FrameType.NOTIFY, FLAG_FIN, 2**64 - 1, 2288, None),  # payload checked via messages()
        (FrameType.NOTIFY, FLAG_FIN, 239, 240, None),
        (FrameType.AGENT_DISCONNECT, FLAG_FIN, 0, 0, AGENT_DISCONNECT[11:]),
    ]
    return stream, expected


def check_stream_frames(decoded: list, expected: list) -> None:
    assert len(decoded) == len(expected)
    for frame, want in zip(decoded, expected):
        got = header_and_payload(frame)
        assert got[:4] == want[:4]
        if want[4] is not None:
            assert got[4] == want[4]
    assert decoded[5].messages()[0].items() == [("s", "x" * 400), ("n", -1)]
    assert [(m.name, m.items()) for m in decoded[6].messages()] == [("m", [("", None)]), ("z", [])]


def feed_in_chunks(reader, data: bytes, sizes) -> list:
    """Feed consecutive chunks of the given sizes, draining after each one."""
    out, pos = [], 0
    for size in sizes:
        reader.feed(data[pos : pos + size])
        pos += size
        out.extend(drain(reader))
    assert pos >= len(data)
    return out


def test_whole_stream_at_once(codec):
    stream, expected = build_stream(codec)
    check_stream_frames(read_frames(codec, stream), expected)


def test_byte_by_byte(codec):
    stream, expected = build_stream(codec)
    reader = codec.FrameReader(DEFAULT_MAX_FRAME_SIZE)
    decoded = feed_in_chunks(reader, stream, [1] * len(stream))
    check_stream_frames(decoded, expected)
    assert reader.buffered == 0


def test_every_two_way_split(codec):
    # Covers a chunk boundary inside every prefix, varint, name and value.
    stream, expected = build_stream(codec)
    for cut in range(len(stream) + 1):
        reader = codec.FrameReader(DEFAULT_MAX_FRAME_SIZE)
        decoded = feed_in_chunks(reader, stream, [cut, len(stream) - cut])
        check_stream_frames(decoded, expected)


@pytest.mark.parametrize("seed", range(25))
def test_random_fragmentation(codec, seed):
    stream, expected = build_stream(codec)
    rng = random.Random(seed)  # seeded: a failure names its seed and replays
    sizes = []
    while sum(sizes) < len(stream):
        sizes.append(rng.choice([0, 1, 2, 3, 5, 11, 64, 200, 1000]))
    reader = codec.FrameReader(DEFAULT_MAX_FRAME_SIZE)
    check_stream_frames(feed_in_chunks(reader, stream, sizes), expected)


def test_feeding_without_draining(codec):
    # Several feeds before the first next_frame(): nothing is lost or reordered.
    stream, expected = build_stream(codec)
    reader = codec.FrameReader(DEFAULT_MAX_FRAME_SIZE)
    for start in range(0, len(stream), 7):
        reader.feed(stream[start : start + 7])
    assert reader.buffered == len(stream)
    check_stream_frames(drain(reader), expected)


def test_feed_accepts_bytes_like(codec):
    reader = codec.FrameReader(DEFAULT_MAX_FRAME_SIZE)
    reader.feed(bytearray(NOTIFY[:10]))
    reader.feed(memoryview(NOTIFY)[10:20])
    reader.feed(NOTIFY[20:])
    [frame] = drain(reader)
    assert frame.payload == NOTIFY[11:]


def test_frames_survive_later_feeds(codec):
    # The compiled reader decodes in place from the receive chunk; frames and
    # messages handed out earlier must not see later chunks.
    stream, expected = build_stream(codec)
    reader = codec.FrameReader(DEFAULT_MAX_FRAME_SIZE)
    reader.feed(NOTIFY + NOTIFY[:5])
    [first] = drain(reader)
    [message] = first.messages()
    reader.feed(NOTIFY[5:] + stream)
    later = drain(reader)
    assert len(later) == 1 + len(expected)
    assert first.payload == NOTIFY[11:]
    assert message.items() == [("ip", IPv4Address("192.0.2.10")), ("port", 51234)]


# -- messages() --------------------------------------------------------------------------

DUPLICATES = (
    b"\x05check"  # message name
    b"\x06"  # 6 args
    b"\x01a" b"\x04\x01"  # a = 1
    b"\x01a" b"\x04\x02"  # a = 2 (duplicate name)
    b"\x00" b"\x08\x01x"  # unnamed = "x"
    b"\x00" b"\x08\x01y"  # unnamed = "y"
    b"\x01b" b"\x00"  # b = NULL
    b"\x02\xc3\xa9" b"\x11"  # "é" = true
)


def test_duplicate_and_unnamed_args(codec):
    [message] = payload_of(codec, DUPLICATES).messages()
    assert message.name == "check"
    assert message.nargs == len(message) == 6
    # items() keeps everything, in wire order
    assert message.items() == [("a", 1), ("a", 2), ("", "x"), ("", "y"), ("b", None), ("é", True)]
    # get() and args agree: the first of a duplicated name wins
    assert message.get("a") == 1
    assert message.get("") == "x"
    assert message.args == {"a": 1, "": "x", "b": None, "é": True}
    # a present NULL is None, not the default; an absent name is the default
    assert message.get("b", "default") is None
    assert message.get("missing", "default") == "default"
    assert message.get("missing") is None
    assert message.get("é") is True


def test_zero_arg_messages(codec):
    payload = b"\x04ping\x00" b"\x04pong\x00"
    messages = payload_of(codec, payload).messages()
    assert [m.name for m in messages] == ["ping", "pong"]
    for message in messages:
        assert (message.nargs, len(message), message.items(), message.args) == (0, 0, [], {})
        assert message.get("x", 7) == 7


def test_255_args(codec):
    # NB-ARGS is one byte: 255 is the most a message can carry.
    args = [(f"a{i}", i) for i in range(255)]
    writer = codec.FrameWriter()
    frames.write_notify(writer, 1, 1, [("many", args)])
    [frame] = read_frames(codec, writer.take())
    [message] = frame.messages()
    assert message.nargs == 255
    assert message.items() == args
    assert message.get("a254") == 254


def test_kv_later_keys_win(codec):
    payload = b"\x01k\x04\x01" b"\x01k\x04\x02"
    assert payload_of(codec, payload).kv() == {"k": 2}


# -- FrameWriter ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        pytest.param("v", object(), TypeError, id="unencodable-value"),
        pytest.param("v", 1.5, TypeError, id="float-value"),
        pytest.param(None, 1, TypeError, id="none-name"),
        pytest.param("v", 2**64, OverflowError, id="int-above-uint64"),
        pytest.param("v", -(2**63) - 1, OverflowError, id="int-below-int64"),
        # fails in the middle of the value, after its type byte
        pytest.param("v", "\ud800", UnicodeEncodeError, id="lone-surrogate-value"),
        pytest.param("\ud800", 1, UnicodeEncodeError, id="lone-surrogate-name"),
    ],
)
def test_set_var_rolls_back_on_error(codec, name, value, error):
    writer = codec.FrameWriter()
    writer.begin_frame(FrameType.ACK, 1, 1)
    writer.set_var(Scope.TXN, "lease", 30000)
    before = len(writer)
    with pytest.raises(error):
        writer.set_var(Scope.TXN, name, value)
    assert len(writer) == before
    # The frame is still usable and holds only the good action.
    writer.unset_var(Scope.SESS, "x")
    writer.end_frame()
    assert writer.take() == ACK


def test_unset_var_rolls_back_on_error(codec):
    writer = codec.FrameWriter()
    writer.begin_frame(FrameType.ACK, 1, 1)
    with pytest.raises(UnicodeEncodeError):
        writer.unset_var(Scope.SESS, "\udfff")
    with pytest.raises(TypeError):
        writer.unset_var(Scope.SESS, None)
    assert writer.frame_length() == 7
    writer.end_frame()
    assert writer.take() == EMPTY_ACK


def test_set_var_none_is_a_null_value(codec):
    # HAProxy turns a NULL set-var into an unset (spop.md 2.2).
    writer = codec.FrameWriter()
    writer.set_var(Scope.REQ, "v", None)
    assert writer.take() == b"\x01\x03\x03\x01v\x00"


@pytest.mark.parametrize("scope", [-1, 5, 255, 2**64])
def test_scope_out_of_range(codec, scope):
    writer = codec.FrameWriter()
    with pytest.raises(ValueError):
        writer.set_var(scope, "v", 1)
    with pytest.raises(ValueError):
        writer.unset_var(scope, "v")
    assert len(writer) == 0


def test_scope_bounds_are_inclusive(codec):
    writer = codec.FrameWriter()
    writer.set_var(Scope.PROC, "a", 1)
    writer.unset_var(Scope.RES, "b")
    assert writer.take() == b"\x01\x03\x00\x01a\x04\x01" b"\x02\x02\x04\x01b"


def test_truncate_inside_the_open_frame(codec):
    writer = codec.FrameWriter()
    writer.begin_frame(FrameType.ACK, 1, 1)
    writer.set_var(Scope.TXN, "lease", 30000)
    mark = writer.mark()
    writer.set_var(Scope.TXN, "discarded", "value")
    writer.truncate(mark)
    assert writer.mark() == mark
    writer.truncate(mark)  # truncating to the current end is a no-op
    writer.unset_var(Scope.SESS, "x")
    assert writer.end_frame() == 25
    assert writer.take() == ACK


def test_truncate_to_the_payload_start(codec):
    writer = codec.FrameWriter()
    writer.begin_frame(FrameType.ACK, 1, 1)
    start = writer.mark()
    writer.set_var(Scope.TXN, "v", 1)
    writer.truncate(start)
    assert writer.frame_length() == 7
    writer.end_frame()
    assert writer.take() == EMPTY_ACK


def test_truncate_rules(codec):
    writer = codec.FrameWriter()
    # no open frame
    with pytest.raises(ValueError):
        writer.truncate(0)
    writer.begin_frame(FrameType.NOTIFY, 1, 1)
    writer.end_frame()
    first_frame_end = writer.mark()
    with pytest.raises(ValueError):
        writer.truncate(first_frame_end)  # the frame is closed
    writer.begin_frame(FrameType.ACK, 1, 1)
    # into a closed frame, or into the open frame's length prefix
    for mark in (0, first_frame_end, first_frame_end + 4):
        with pytest.raises(ValueError):
            writer.truncate(mark)
    # past the end
    with pytest.raises(ValueError):
        writer.truncate(writer.mark() + 1)
    writer.end_frame()
    assert writer.take() == EMPTY_NOTIFY + EMPTY_ACK


def test_take_with_an_open_frame_raises(codec):
    writer = codec.FrameWriter()
    writer.begin_frame(FrameType.ACK, 1, 1)
    with pytest.raises(RuntimeError):
        writer.take()
    writer.end_frame()
    assert len(writer.take()) == 11
    assert len(writer) == 0
    assert writer.take() == b""


def test_frame_state_errors(codec):
    writer = codec.FrameWriter()
    for call in (writer.end_frame, writer.abort_frame, writer.frame_length):
        with pytest.raises(RuntimeError):
            call()
    writer.begin_frame(FrameType.ACK, 1, 1)
    with pytest.raises(RuntimeError):
        writer.begin_frame(FrameType.ACK, 1, 2)
    assert writer.frame_length() == 7


def test_abort_frame_keeps_earlier_frames(codec):
    writer = codec.FrameWriter()
    frames.write_notify(writer, 1, 1, [])
    writer.begin_frame(FrameType.ACK, 5, 5)
    writer.set_var(Scope.TXN, "v", 1)
    writer.abort_frame()
    assert writer.take() == EMPTY_NOTIFY


@pytest.mark.parametrize(
    ("ftype", "stream_id", "frame_id", "flags"),
    [
        (256, 0, 0, FLAG_FIN),
        (-1, 0, 0, FLAG_FIN),
        (FrameType.ACK, 0, 0, 2**32),
        (FrameType.ACK, 0, 0, -1),
        (FrameType.ACK, 2**64, 0, FLAG_FIN),
        (FrameType.ACK, 0, -1, FLAG_FIN),
    ],
)
def test_begin_frame_out_of_range(codec, ftype, stream_id, frame_id, flags):
    writer = codec.FrameWriter()
    with pytest.raises(OverflowError):
        writer.begin_frame(ftype, stream_id, frame_id, flags)
    assert len(writer) == 0
    writer.begin_frame(FrameType.ACK, 1, 1)  # no frame was left half-open


def test_primitives(codec):
    writer = codec.FrameWriter()
    writer.put_uint8(0)
    writer.put_uint8(255)
    writer.put_varint(2288)
    writer.put_name("key")
    writer.put_name(b"\xff")
    writer.put_name("\udcff")  # surrogateescape: the same single byte
    assert writer.take() == b"\x00\xff" b"\xf0\x80\x00" b"\x03key" b"\x01\xff" b"\x01\xff"
    for bad in (256, -1):
        with pytest.raises(OverflowError):
            writer.put_uint8(bad)
    with pytest.raises(OverflowError):
        writer.put_varint(2**64)
    assert len(writer) == 0


def test_large_frame_and_writer_reuse(codec):
    # Past the compiled writer's 64 KiB shrink threshold, then reused: the
    # grow / shrink-on-take paths must keep the bytes right.
    writer = codec.FrameWriter()
    big = "x" * 100_000
    for _ in range(2):
        writer.begin_frame(FrameType.NOTIFY, 3, 4)
        writer.put_name("m")
        writer.put_uint8(1)
        writer.put_name("s")
        writer.put_typed(big)
        length = writer.end_frame()
        data = writer.take()
        assert len(data) == length + 4
        [frame] = read_frames(codec, data, max_frame_size=length)
        assert frame.messages()[0].get("s") == big
    frames.write_notify(writer, 1, 1, [])
    assert writer.take() == EMPTY_NOTIFY


def test_from_payload_copies_its_input(codec):
    payload = bytearray(b"\x01k\x04\x01")
    frame = codec.Frame.from_payload(FrameType.AGENT_HELLO, FLAG_FIN, 0, 0, payload)
    payload[3] = 2
    assert frame.kv() == {"k": 1}
    assert (frame.type, frame.flags, frame.stream_id, frame.frame_id) == (FrameType.AGENT_HELLO, FLAG_FIN, 0, 0)


def test_put_typed_is_all_or_nothing(codec):
    # A value that fails half-way must leave no stray type byte behind.
    writer = codec.FrameWriter()
    with pytest.raises(UnicodeEncodeError):
        writer.put_typed("\ud800")
    with pytest.raises(TypeError):
        writer.put_typed_as(DataType.UINT32, 1.5)
    assert len(writer) == 0


def test_put_name_refuses_integers(codec):
    # bytes(5) would be five NUL bytes: a name must be str or bytes-like.
    writer = codec.FrameWriter()
    with pytest.raises(TypeError):
        writer.put_name(5)
    with pytest.raises(TypeError):
        writer.set_var(Scope.TXN, 5, 1)
    assert len(writer) == 0


def test_get_address_gives_text(codec):
    writer = codec.FrameWriter()
    frames.write_notify(writer, 1, 1, [("m", [
        ("v4", IPv4Address("192.0.2.254")), ("v6", IPv6Address("2001:db8::1")), ("s", "text"), ("i", 7),
        ("edge", IPv4Address("255.255.255.255")),
    ])])
    reader = codec.FrameReader(16380)
    reader.feed(writer.take())
    message = reader.next_frame().messages()[0]
    assert message.get_address("v4") == "192.0.2.254"
    assert message.get_address("edge") == "255.255.255.255"
    assert message.get_address("v6") == "2001:db8::1"
    assert message.get_address("s") == "text"  # not an address: as get() returns it
    assert message.get_address("i") == 7
    assert message.get_address("absent", "dflt") == "dflt"
    with pytest.raises(TypeError):
        message.get_address(b"v4")


@given(st.binary(min_size=16, max_size=16) | st.sampled_from([
    bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1]),  # IPv4-mapped
    bytes(12) + bytes([192, 0, 2, 1]),  # IPv4-compatible (deprecated)
    bytes(15) + b"\x01", bytes(16), b"\x20\x01\x0d\xb8" + bytes(2) + b"\x00\x01" + bytes(8)]))
@settings(max_examples=300, deadline=None)
def test_get_address_ipv6_is_inet_ntop_text(codec, raw):
    # Both twins print IPv6 as glibc's inet_ntop does (the text the kernel
    # sampler and unpack_key use), not as ipaddress' str() would.
    writer = codec.FrameWriter()
    frames.write_notify(writer, 1, 1, [("m", [("v6", IPv6Address(raw))])])
    reader = codec.FrameReader(16380)
    reader.feed(writer.take())
    assert reader.next_frame().messages()[0].get_address("v6") == socket.inet_ntop(socket.AF_INET6, raw)


def test_get_addresses_is_get_address_per_name_in_one_pass(codec):
    writer = codec.FrameWriter()
    frames.write_notify(writer, 1, 1, [("m", [
        ("v4", IPv4Address("192.0.2.254")), ("v6", IPv6Address("2001:db8::1")), ("s", "text"), ("i", 7),
        ("s", "second"),  # a duplicated name: the first wins, as in get()
    ])])
    reader = codec.FrameReader(16380)
    reader.feed(writer.take())
    message = reader.next_frame().messages()[0]
    names = ("i", "absent", "v6", "s", "v4", "s")
    assert message.get_addresses(names) == [message.get_address(n) for n in names]
    assert message.get_addresses(names) == [7, None, "2001:db8::1", "text", "192.0.2.254", "text"]
    assert message.get_addresses(()) == []
    with pytest.raises(TypeError):
        message.get_addresses(["v4"])  # a tuple: the handler's constant
    with pytest.raises(TypeError):
        message.get_addresses((b"v4",))
    with pytest.raises(ValueError):
        message.get_addresses(("v4",) * 17)


def test_put_raw_appends_encoded_actions(codec):
    cached = codec.FrameWriter()
    cached.begin_frame(FrameType.ACK, 0, 0)
    start = cached.mark()
    cached.set_var(Scope.SESS, "duration_ms", 30000)
    cached.end_frame()
    actions = cached.take()[start:]
    direct, raw = codec.FrameWriter(), codec.FrameWriter()
    for writer in (direct, raw):
        writer.begin_frame(FrameType.ACK, 1, 2)
    direct.set_var(Scope.SESS, "duration_ms", 30000)
    raw.put_raw(actions)
    for writer in (direct, raw):
        writer.set_var(Scope.TXN, "seq", 1)
        writer.end_frame()
    assert raw.take() == direct.take()
    with pytest.raises(TypeError):
        raw.put_raw(bytearray(b"x"))
