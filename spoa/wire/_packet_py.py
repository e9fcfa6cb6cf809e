"""Connection publishing packet v1, pure Python: the reference twin of cext/spoa/wire/_packet.pyx.

Both twins expose the same API and must behave identically (same datagrams,
same records, same exceptions with the same messages); tests/wire/test_packet.py
holds them to it. The wire format is documented byte by byte in
docs/publishing-packet.md; the numbers below are its single source of truth
for Python code (the compiled twin imports PacketError and the error-message
helpers from here, so both raise the very same exception classes and texts).

A logical packet (one PacketHeader, all of a server node's connections) is
split into UDP datagrams; each datagram is self-contained: its own header,
whole connection records only, its own HMAC. A receiver can process every
datagram on its own, or reassemble by (node_id, sequence, index, count).
ColumnBatch decodes datagrams into numpy columns instead of records (the LB
node's path; docs/publishing-packet.md §12).
"""

from __future__ import annotations

import hmac
import operator
import socket
import struct
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from .records import V4_MAPPED, ConnectionRecord, PacketHeader, SegmentRecord

try:
    import _hashlib
except ImportError:  # pragma: no cover - CPython built without OpenSSL
    _hashlib = None

MAGIC = b"CPUB"  # "Connection PUBlishing", 43 50 55 42
VERSION = 1
HEADER_SIZE = 42  # fixed datagram header
TAG_SIZE = 16  # truncated HMAC-SHA256 trailer
OVERHEAD = HEADER_SIZE + TAG_SIZE  # 58 bytes per datagram
CONN_SIZE = 84  # fixed part of a connection record (frontend name and segments follow)
SEG_SIZE = 42  # one granularity-array entry
MAX_DATAGRAM = 65507  # largest UDP payload over IPv4 (65535 - 20 - 8)
MIN_MTU = OVERHEAD + CONN_SIZE  # 142: one record, no frontend name, no segment
DEFAULT_MTU = 1400
MAX_FRONTEND = 255  # bytes of UTF-8
MAX_DATAGRAMS = 65535  # datagram index/count are u16
MIN_KEY_SIZE = 16
FAMILY_IPV4 = 4
FAMILY_IPV6 = 6
MAX_WINDOW = 4096  # ReplayGuard: sequences remembered per node, at most

REASONS = ("truncated", "oversized", "bad_magic", "bad_version", "bad_hmac", "malformed", "replayed")

_U8 = 0xFF
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF

# magic, version, flags, datagram_length, node_id, sequence, timestamp_ms,
# interval_ms, datagram_index, datagram_count, record_count
_HEADER = struct.Struct(">4sBBHQQQIHHH")
# conn_id, bytes_in_total, bytes_out_total, src, dst, src_port, dst_port,
# requested_lease_ms, predicted_lease_ms, family, flags, counter_source,
# lease_source, granularity_level, frontend_length, segment_count
_CONN = struct.Struct(">16sQQ16s16sHHIIBBBBbBH")
# direction, level, start_byte_offset, byte_count, bytes_transferred,
# packets_transferred, timestamp_last_activity_ms
_SEG = struct.Struct(">BbQQQQQ")
assert (_HEADER.size, _CONN.size, _SEG.size) == (HEADER_SIZE, CONN_SIZE, SEG_SIZE)


class PacketError(ValueError):
    """A datagram was refused; `reason` is one of REASONS, `detail` says why."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown PacketError reason {reason!r}")
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason

    def __repr__(self) -> str:
        return f"PacketError({self.reason!r}, {self.detail!r})"


def max_segments(mtu: int = DEFAULT_MTU, frontend_bytes: int = 0) -> int:
    """Most segments one connection record can carry in a datagram of `mtu` bytes."""
    return max(0, (mtu - OVERHEAD - CONN_SIZE - frontend_bytes) // SEG_SIZE)


# -- validation helpers (the compiled twin calls these on its error paths) -----------


def _field_name(field: str, i: int = -1, j: int = -1) -> str:
    if i < 0:
        return field
    if j < 0:
        return f"connections[{i}].{field}"
    return f"connections[{i}].segments[{j}].{field}"


def _int_field(value: object, lo: int, hi: int, field: str, i: int = -1, j: int = -1) -> int:
    """`value` as an int in [lo, hi], else TypeError/ValueError naming the field."""
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{_field_name(field, i, j)} must be an integer, not {type(value).__name__}") from None
    if number < lo or number > hi:
        raise ValueError(f"{_field_name(field, i, j)} out of range [{lo}, {hi}]: {number}")
    return number


def _check_key(key: object) -> None:
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(f"key must be bytes, not {type(key).__name__}")
    if len(key) < MIN_KEY_SIZE:
        raise ValueError(f"key must be at least {MIN_KEY_SIZE} bytes, got {len(key)}")


def _check_mtu(mtu: object) -> int:
    return _int_field(mtu, MIN_MTU, MAX_DATAGRAM, "mtu")


def _header_fields(header: PacketHeader) -> tuple[int, int, int, int, int]:
    return (
        _int_field(header.node_id, 0, _U64, "header.node_id"),
        _int_field(header.sequence, 0, _U64, "header.sequence"),
        _int_field(header.timestamp_ms, 0, _U64, "header.timestamp_ms"),
        _int_field(header.interval_ms, 0, _U32, "header.interval_ms"),
        _int_field(header.flags, 0, _U8, "header.flags"),
    )


def _check_conn_id(conn_id: object, i: int) -> bytes:
    if not isinstance(conn_id, bytes):
        raise TypeError(f"connections[{i}].conn_id must be bytes, not {type(conn_id).__name__}")
    if len(conn_id) != 16:
        raise ValueError(f"connections[{i}].conn_id must be 16 bytes, got {len(conn_id)}")
    return conn_id


def _pton(family: int, text: str) -> bytes | None:
    if "\x00" in text:
        return None
    try:
        return socket.inet_pton(family, text)
    except (OSError, UnicodeEncodeError):
        return None


def _check_address_type(value: object, field: str, i: int) -> str:
    if not isinstance(value, str):
        raise TypeError(f"connections[{i}].{field} must be a str, not {type(value).__name__}")
    return value


def _src_error(src: str, i: int) -> ValueError:
    return ValueError(f"connections[{i}].src is not an IPv4 or IPv6 address: {src!r}")


def _dst_error(dst: str, family: int, i: int) -> ValueError:
    return ValueError(f"connections[{i}].dst is not an IPv{family} address like src: {dst!r}")


def _addresses(src: object, dst: object, i: int) -> tuple[int, bytes, bytes]:
    """(family, src, dst) with both addresses as 16 bytes (IPv4 as ::ffff:a.b.c.d)."""
    src = _check_address_type(src, "src", i)
    packed = _pton(socket.AF_INET, src)
    if packed is not None:
        dst = _check_address_type(dst, "dst", i)
        other = _pton(socket.AF_INET, dst)
        if other is None:
            raise _dst_error(dst, FAMILY_IPV4, i)
        return FAMILY_IPV4, V4_MAPPED + packed, V4_MAPPED + other
    packed = _pton(socket.AF_INET6, src)
    if packed is None:
        raise _src_error(src, i)
    dst = _check_address_type(dst, "dst", i)
    other = _pton(socket.AF_INET6, dst)
    if other is None:
        raise _dst_error(dst, FAMILY_IPV6, i)
    return FAMILY_IPV6, packed, other


def _frontend_bytes(name: object, i: int) -> bytes:
    if not isinstance(name, str):
        raise TypeError(f"connections[{i}].frontend must be a str, not {type(name).__name__}")
    try:
        data = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"connections[{i}].frontend is not encodable as UTF-8: {name!r}") from None
    if len(data) > MAX_FRONTEND:
        raise ValueError(f"connections[{i}].frontend is {len(data)} bytes of UTF-8, at most {MAX_FRONTEND} allowed")
    return data


def _record_too_big(i: int, flen: int, nseg: int, mtu: int) -> ValueError:
    size = CONN_SIZE + flen + nseg * SEG_SIZE
    return ValueError(
        f"connections[{i}] is {size} bytes ({nseg} segments, {flen}-byte frontend name) but a "
        f"datagram of mtu={mtu} holds one record of at most {mtu - OVERHEAD} bytes: at most "
        f"{max_segments(mtu, flen)} segments with this frontend name; raise mtu or coarsen the granularity"
    )


def _too_many_datagrams(count: int) -> ValueError:
    return ValueError(f"the packet needs {count} datagrams, at most {MAX_DATAGRAMS} allowed; raise mtu")


def _check_record_ints(rec: ConnectionRecord, i: int) -> None:
    """Find and raise the first out-of-range integer of a record, in wire order."""
    _int_field(rec.bytes_in_total, 0, _U64, "bytes_in_total", i)
    _int_field(rec.bytes_out_total, 0, _U64, "bytes_out_total", i)
    _int_field(rec.src_port, 0, _U16, "src_port", i)
    _int_field(rec.dst_port, 0, _U16, "dst_port", i)
    _int_field(rec.requested_lease_ms, 0, _U32, "requested_lease_ms", i)
    _int_field(rec.predicted_lease_ms, 0, _U32, "predicted_lease_ms", i)
    _int_field(rec.flags, 0, _U8, "flags", i)
    _int_field(rec.counter_source, 0, _U8, "counter_source", i)
    _int_field(rec.lease_source, 0, _U8, "lease_source", i)
    _int_field(rec.granularity_level, -128, 127, "granularity_level", i)


def _check_segment_ints(seg: SegmentRecord, i: int, j: int) -> None:
    """Same for a segment; its direction was checked already."""
    _int_field(seg.level, -128, 127, "level", i, j)
    _int_field(seg.start_byte_offset, 0, _U64, "start_byte_offset", i, j)
    _int_field(seg.byte_count, 0, _U64, "byte_count", i, j)
    _int_field(seg.bytes_transferred, 0, _U64, "bytes_transferred", i, j)
    _int_field(seg.packets_transferred, 0, _U64, "packets_transferred", i, j)
    _int_field(seg.timestamp_last_activity_ms, 0, _U64, "timestamp_last_activity_ms", i, j)


def _unreachable(where: str) -> AssertionError:
    return AssertionError(f"{where}: struct refused a value the range checks accept")


# -- encoding -----------------------------------------------------------------------------


def _encode_record(rec: ConnectionRecord, i: int, mtu: int) -> bytes:
    """One record's bytes. Checks run in a fixed order (conn_id, addresses,
    frontend, size, integers in wire order, then each segment) that the compiled
    twin follows too, so both report the same first problem."""
    conn_id = _check_conn_id(rec.conn_id, i)
    family, src, dst = _addresses(rec.src, rec.dst, i)
    frontend = _frontend_bytes(rec.frontend, i)
    segments = rec.segments
    nseg = len(segments)
    if type(segments) is not tuple:
        segments = tuple(segments)
        if len(segments) != nseg:
            raise ValueError(f"connections[{i}].segments: len() gave {nseg}, iteration {len(segments)}")
    flen = len(frontend)
    if CONN_SIZE + flen + nseg * SEG_SIZE > mtu - OVERHEAD:
        raise _record_too_big(i, flen, nseg, mtu)
    try:
        fixed = _CONN.pack(
            conn_id, rec.bytes_in_total, rec.bytes_out_total, src, dst, rec.src_port, rec.dst_port,
            rec.requested_lease_ms, rec.predicted_lease_ms, family, rec.flags, rec.counter_source,
            rec.lease_source, rec.granularity_level, flen, nseg,
        )  # fmt: skip
    except struct.error:
        _check_record_ints(rec, i)
        raise _unreachable(f"connections[{i}]") from None
    if not nseg:
        return fixed + frontend
    parts = [fixed, frontend]
    pack = _SEG.pack
    for j, seg in enumerate(segments):
        direction = _int_field(seg.direction, 0, 1, "direction", i, j)
        try:
            parts.append(
                pack(
                    direction, seg.level, seg.start_byte_offset, seg.byte_count, seg.bytes_transferred,
                    seg.packets_transferred, seg.timestamp_last_activity_ms,
                )  # fmt: skip
            )
        except struct.error:
            _check_segment_ints(seg, i, j)
            raise _unreachable(f"connections[{i}].segments[{j}]") from None
    return b"".join(parts)


# key -> HMAC-SHA256 object with the key already absorbed: copying it skips
# the per-message key setup (two SHA-256 blocks and OpenSSL's digest lookup),
# about 30% of the cost of hmac.digest() on a 1400-byte datagram.
_KEYED: dict[bytes, hmac.HMAC] = {}
_KEYED_MAX = 16


def _keyed(key: bytes | bytearray) -> hmac.HMAC:
    if type(key) is not bytes:
        key = bytes(key)
    mac = _KEYED.get(key)
    if mac is None:
        if len(_KEYED) >= _KEYED_MAX:
            _KEYED.clear()
        mac = _KEYED[key] = _new_hmac(key)
    return mac


def _new_hmac(key: bytes) -> hmac.HMAC:
    """A keyed HMAC-SHA256 object: OpenSSL's own when Python has it.

    hmac.HMAC wraps it in Python code whose copy() costs ~0.9 us more per
    datagram, a quarter of a 1400-byte datagram's whole HMAC time; the C
    object has the same copy/update/digest methods.
    """
    try:
        return _hashlib.hmac_new(key, digestmod="sha256")
    except (AttributeError, ValueError):  # no OpenSSL (or no sha256 in it)
        return hmac.new(key, digestmod="sha256")


def datagram_tag(key: bytes | bytearray, signed: bytes | memoryview) -> bytes:
    """HMAC-SHA256(key, signed) truncated to TAG_SIZE bytes: the trailer of
    every publishing and hint datagram (spoa.wire.hints signs with it too)."""
    mac = _keyed(key).copy()
    mac.update(signed)
    return mac.digest()[:TAG_SIZE]


def encode_packet(
    header: PacketHeader, connections: Sequence[ConnectionRecord], key: bytes, mtu: int = DEFAULT_MTU
) -> list[bytes]:
    """Encode one logical packet as datagrams of at most `mtu` bytes each.

    Records keep their order and are packed greedily; each datagram carries
    whole records, the header (with its index and the datagram count) and its
    own HMAC. No connections gives one datagram with zero records (a
    heartbeat). ValueError/TypeError name the offending field.
    """
    _check_key(key)
    mtu = _check_mtu(mtu)
    fields = _header_fields(header)
    return _datagrams([_encode_record(rec, i, mtu) for i, rec in enumerate(connections)], fields, key, mtu)


def _datagrams(bodies: list[bytes], fields: tuple[int, ...], key: bytes, mtu: int) -> list[bytes]:
    """Records already encoded (each fits one datagram) as the packet's signed datagrams."""
    node_id, sequence, timestamp_ms, interval_ms, flags = fields
    limit = mtu - OVERHEAD
    groups = []
    start = size = 0
    for k, body in enumerate(bodies):
        if size + len(body) > limit:  # never for k == start: a record alone fits
            groups.append((start, k))
            start, size = k, 0
        size += len(body)
    groups.append((start, len(bodies)))
    count = len(groups)
    if count > MAX_DATAGRAMS:
        raise _too_many_datagrams(count)
    out = []
    for index, (first, stop) in enumerate(groups):
        payload = b"".join(bodies[first:stop])
        length = HEADER_SIZE + len(payload) + TAG_SIZE
        signed = (
            _HEADER.pack(MAGIC, VERSION, flags, length, node_id, sequence, timestamp_ms, interval_ms, index, count,
                         stop - first)
            + payload
        )  # fmt: skip
        out.append(signed + datagram_tag(key, signed))
    return out


class RecordBatch:
    """Connection records in their wire form (docs/publishing-packet.md §4), in order, not yet
    cut into datagrams: what the server node's tracker publishes each interval
    (SegmentTracker.publish_batch writes its records straight into one, no record object per
    connection), what Router.split divides by owner (take), and what encode_batch cuts into a
    packet's datagrams. Records are checked as encode_packet checks them when they are added,
    except their size against the mtu, which encode_batch checks (the mtu is the packet's)."""

    __slots__ = ("_bodies",)

    def __init__(self) -> None:
        self._bodies: list[bytes] = []

    @classmethod
    def from_records(cls, records: Sequence[ConnectionRecord]) -> RecordBatch:
        batch = cls()
        batch.add_records(records)
        return batch

    def add_records(self, records: Sequence[ConnectionRecord]) -> None:
        """Append records; on an invalid one (TypeError/ValueError naming it by its index in the
        batch, connections[i]) none of them is added."""
        start = len(self._bodies)
        self._bodies.extend([_encode_record(rec, start + i, MAX_DATAGRAM) for i, rec in enumerate(records)])

    def __len__(self) -> int:
        return len(self._bodies)

    def conn_ids(self) -> bytes:
        """The records' 16-byte connection ids, back to back (what routing hashes)."""
        return b"".join([body[:16] for body in self._bodies])

    def take(self, indices: Sequence[int]) -> RecordBatch:
        """A new batch of the records at `indices` (ints, e.g. a numpy array), in that order."""
        bodies = self._bodies
        out = RecordBatch()
        out._bodies = [bodies[operator.index(i)] for i in indices]
        return out


def encode_batch(header: PacketHeader, batch: RecordBatch, key: bytes, mtu: int = DEFAULT_MTU, start: int = 0,
                 stop: int | None = None) -> list[bytes]:
    """encode_packet for records already encoded: batch's records [start:stop] (slice
    semantics) as one packet's datagrams. ValueError names a record too big for the mtu by
    its index in the batch."""
    _check_key(key)
    mtu = _check_mtu(mtu)
    fields = _header_fields(header)
    if not isinstance(batch, RecordBatch):
        raise TypeError(f"batch must be a RecordBatch, not {type(batch).__name__}")
    first, last, _ = slice(start, stop).indices(len(batch))
    bodies = batch._bodies[first:last]
    limit = mtu - OVERHEAD
    for k, body in enumerate(bodies):
        if len(body) > limit:
            raise _record_too_big(first + k, body[81], int.from_bytes(body[82:84], "big"), mtu)
    return _datagrams(bodies, fields, key, mtu)


# -- decoding -----------------------------------------------------------------------------


def _malformed(detail: str) -> PacketError:
    return PacketError("malformed", detail)


def _verify(data: bytes, key: bytes) -> tuple[PacketHeader, int, int, int, int]:
    """Checks 1-8 of docs/publishing-packet.md §9, up to and including the HMAC:
    (header, datagram index, datagram count, record count, end of the records)."""
    _check_key(key)
    n = len(data)
    if n > MAX_DATAGRAM:
        raise PacketError("oversized", f"{n} bytes; a UDP datagram carries at most {MAX_DATAGRAM}")
    if n < 5:
        raise PacketError("truncated", f"{n} bytes; too short for magic and version")
    if data[:4] != MAGIC:
        raise PacketError("bad_magic", f"magic {data[:4].hex()}, expected {MAGIC.hex()}")
    if data[4] != VERSION:
        raise PacketError("bad_version", f"version {data[4]}, this decoder reads {VERSION}")
    if n < OVERHEAD:
        raise PacketError("truncated", f"{n} bytes; a version {VERSION} datagram has at least {OVERHEAD}")
    (_, _, flags, length, node_id, sequence, timestamp_ms, interval_ms, index, count, nrec) = _HEADER.unpack_from(data)
    if length > n:
        raise PacketError("truncated", f"{n} bytes; the header announces {length}")
    if length < n:
        raise _malformed(f"{n} bytes; the header announces {length}")
    end = n - TAG_SIZE
    if not hmac.compare_digest(datagram_tag(key, memoryview(data)[:end]), data[end:]):
        raise PacketError("bad_hmac", "HMAC-SHA256 mismatch: wrong key or altered datagram")
    if index >= count:
        raise _malformed(f"datagram index {index} not below count {count}")
    return PacketHeader(node_id, sequence, timestamp_ms, interval_ms, flags), index, count, nrec, end


def _check_record(data: bytes, pos: int, end: int, i: int, nrec: int) -> tuple:
    """The fixed part of record i at pos, after the bounds and address checks
    (check 9 up to the frontend name): _CONN's fields."""
    if end - pos < CONN_SIZE:
        raise _malformed(f"record {i} of {nrec} runs past the end")
    fields = _CONN.unpack_from(data, pos)
    src, dst, family, flen, nseg = fields[3], fields[4], fields[9], fields[14], fields[15]
    if end - pos - CONN_SIZE < flen + nseg * SEG_SIZE:
        raise _malformed(f"record {i} of {nrec}: its {flen}-byte frontend name and {nseg} segments run past the end")
    if family == FAMILY_IPV4:
        if src[:12] != V4_MAPPED or dst[:12] != V4_MAPPED:
            raise _malformed(f"record {i}: IPv4 address outside ::ffff:0:0/96")
    elif family != FAMILY_IPV6:
        raise _malformed(f"record {i}: address family {family}, expected 4 or 6")
    return fields


def _frontend_text(raw: bytes, i: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(f"record {i}: frontend name is not valid UTF-8") from None


def _bad_direction(i: int, j: int, direction: int) -> PacketError:
    return _malformed(f"record {i} segment {j}: direction {direction}, expected 0 or 1")


def _trailing(end: int, pos: int, nrec: int) -> PacketError:
    return _malformed(f"{end - pos} bytes after the last of {nrec} records")


def decode_datagram(data: bytes, key: bytes) -> tuple[PacketHeader, int, int, list[ConnectionRecord]]:
    """(header, datagram index, datagram count, records) of one datagram.

    Checks, in this order: size, magic, version, length field, HMAC (before any
    record is parsed), then every record's bounds and values. Any defect raises
    PacketError with its reason; no other exception escapes for any bytes.
    """
    if not isinstance(data, bytes):
        _check_key(key)
        data = bytes(data)
    header, index, count, nrec, end = _verify(data, key)
    records = []
    pos = HEADER_SIZE
    ntop = socket.inet_ntop
    unpack_seg = _SEG.unpack_from
    for i in range(nrec):
        (conn_id, bytes_in, bytes_out, src, dst, src_port, dst_port, requested, predicted, family, cflags,
         counter_source, lease_source, level, flen, nseg) = _check_record(data, pos, end, i, nrec)  # fmt: skip
        pos += CONN_SIZE
        if family == FAMILY_IPV4:
            src_text = ntop(socket.AF_INET, src[12:])
            dst_text = ntop(socket.AF_INET, dst[12:])
        else:
            src_text = ntop(socket.AF_INET6, src)
            dst_text = ntop(socket.AF_INET6, dst)
        frontend = _frontend_text(data[pos : pos + flen], i)
        pos += flen
        segments = []
        for j in range(nseg):
            direction, seg_level, start, byte_count, transferred, packets, last = unpack_seg(data, pos)
            if direction > 1:
                raise _bad_direction(i, j, direction)
            segments.append(SegmentRecord(direction, start, byte_count, transferred, packets, last, seg_level))
            pos += SEG_SIZE
        records.append(
            ConnectionRecord(
                conn_id, src_text, src_port, dst_text, dst_port, frontend, cflags, counter_source, level,
                requested, predicted, lease_source, bytes_in, bytes_out, tuple(segments),
            )  # fmt: skip
        )
    if pos != end:
        raise _trailing(end, pos, nrec)
    return header, index, count, records


# -- columnar decoding ------------------------------------------------------------------------------

# ColumnBatch columns, (name, numpy dtype) in wire order: one row per
# connection record, then one per segment entry. Byte strings are "V16"
# (raw: numpy's "S16" would drop trailing zero bytes); addresses stay in
# their 16-byte wire form with `family`; `frontend` indexes
# ColumnBatch.frontends; `node_id` is the header's, so one batch can hold
# datagrams of many server nodes. Native byte order.
CONN_COLUMNS = (
    ("node_id", "=u8"), ("conn_id", "V16"), ("bytes_in_total", "=u8"), ("bytes_out_total", "=u8"), ("src", "V16"),
    ("dst", "V16"), ("src_port", "=u2"), ("dst_port", "=u2"), ("requested_lease_ms", "=u4"),
    ("predicted_lease_ms", "=u4"), ("family", "u1"), ("flags", "u1"), ("counter_source", "u1"),
    ("lease_source", "u1"), ("granularity_level", "i1"), ("frontend", "=u4"),
)  # fmt: skip
SEG_COLUMNS = (
    ("direction", "u1"), ("level", "i1"), ("start_byte_offset", "=u8"), ("byte_count", "=u8"),
    ("bytes_transferred", "=u8"), ("packets_transferred", "=u8"), ("timestamp_last_activity_ms", "=u8"),
)  # fmt: skip
MAX_INTERNED = 4096  # frontend names a batch keeps interned; clear() forgets them beyond


class ColumnBatch:
    """Connection records of many datagrams as numpy columns (a structure of arrays).

    append_datagram(data, key) verifies a datagram exactly as decode_datagram
    does (same checks, order and PacketErrors) and appends its records: each
    CONN_COLUMNS column gains a row per record, each SEG_COLUMNS column a row
    per segment; record k's segments are rows seg_start[k]:seg_start[k + 1]
    (CSR). A datagram is appended whole or, on any PacketError, not at all.
    Columns are attributes (batch.bytes_in_total, batch.seg_start, ...):
    read-only views of the n (nseg) rows, valid until the next append or
    clear. Frontend names are interned: `frontend` is an index into
    `frontends`, stable for the batch's life (forgotten by clear() once more
    than MAX_INTERNED accumulated).

    Decoding many small datagrams into one batch keeps the per-datagram cost
    to the parse itself: the numpy work happens once per batch.
    """

    def __init__(self) -> None:
        self.frontends: list[str] = []
        self._names: dict[bytes, int] = {}
        self.clear()

    def clear(self) -> None:
        """Forget every record (frontend names stay interned)."""
        self._conn: list[tuple] = []  # _CONN fields of each record, with node_id and frontend index
        self._segs: list[tuple] = []  # _SEG fields of each segment
        self._seg_start = [0]
        self._last: tuple[int, int, int] | None = None  # (records, segments, datagrams) before the last append
        self._arrays: dict[str, np.ndarray] | None = None
        self.datagrams = 0
        if len(self.frontends) > MAX_INTERNED:
            self.frontends = []
            self._names = {}

    @property
    def n(self) -> int:
        """Connection records held."""
        return len(self._conn)

    @property
    def nseg(self) -> int:
        """Segment entries held."""
        return len(self._segs)

    def append_datagram(self, data: bytes, key: bytes) -> tuple[PacketHeader, int, int]:
        """Verify one datagram and append its records: (header, datagram index, datagram count)."""
        if not isinstance(data, bytes):
            _check_key(key)
            data = bytes(data)
        header, index, count, nrec, end = _verify(data, key)
        conns, segs, seg_start = [], [], []
        nseg_total = len(self._segs)
        pos = HEADER_SIZE
        unpack_seg = _SEG.unpack_from
        for i in range(nrec):
            fields = _check_record(data, pos, end, i, nrec)
            flen, nseg = fields[14], fields[15]
            pos += CONN_SIZE
            raw = data[pos : pos + flen]
            frontend = self._names.get(raw)
            if frontend is None:
                name = _frontend_text(raw, i)
                frontend = self._names[raw] = len(self.frontends)
                self.frontends.append(name)
            pos += flen
            for j in range(nseg):
                seg = unpack_seg(data, pos)
                if seg[0] > 1:
                    raise _bad_direction(i, j, seg[0])
                segs.append(seg)
                pos += SEG_SIZE
            conns.append((header.node_id, *fields[:14], frontend))  # CONN_COLUMNS order
            nseg_total += nseg
            seg_start.append(nseg_total)
        if pos != end:
            raise _trailing(end, pos, nrec)
        self._last = (len(self._conn), len(self._segs), self.datagrams)
        self._conn += conns
        self._segs += segs
        self._seg_start += seg_start
        self.datagrams += 1
        self._arrays = None
        return header, index, count

    def drop_last(self) -> None:
        """Take back the last appended datagram (a replayed one); once only."""
        if self._last is None:
            raise ValueError("no datagram to drop")
        n, nseg, self.datagrams = self._last
        del self._conn[n:], self._segs[nseg:], self._seg_start[n + 1 :]
        self._last = None
        self._arrays = None

    def __getattr__(self, name: str) -> np.ndarray:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._arrays is None:
            self._arrays = self._build()
        try:
            return self._arrays[name]
        except KeyError:
            raise AttributeError(f"ColumnBatch has no column {name!r}") from None

    def _build(self) -> dict[str, np.ndarray]:
        arrays = {"seg_start": np.array(self._seg_start, np.int64)}
        for rows, columns in ((self._conn, CONN_COLUMNS), (self._segs, SEG_COLUMNS)):
            values = list(zip(*rows)) if rows else [()] * len(columns)
            for (name, dtype), column in zip(columns, values):
                arrays[name] = np.array(column, dtype)
        for a in arrays.values():
            a.flags.writeable = False
        return arrays


# -- replay detection -------------------------------------------------------------------------


def _check_guard_args(window: object, max_nodes: object) -> tuple[int, int]:
    return _int_field(window, 1, MAX_WINDOW, "window"), _int_field(max_nodes, 1, 1 << 24, "max_nodes")


def _check_index(index: object) -> int:
    return _int_field(index, 0, MAX_DATAGRAMS - 1, "index")


class ReplayGuard:
    """Accepts each (node_id, sequence, datagram index) once.

    Per node it keeps the highest sequence seen and, for the last `window`
    sequences (that one included), a bitmap of the datagram indexes accepted.
    Older sequences are refused as "replayed". At most `max_nodes` nodes are
    tracked; the least recently accepted one is forgotten first (`evictions`
    counts them). Memory is bounded by max_nodes x window x (one bitmap of at
    most 8 KiB, as indexes are u16; a few bytes in practice).

    A refused check leaves the state unchanged. Call it only after the HMAC
    verified: unauthenticated input must not move the window.
    """

    __slots__ = ("_window", "_max_nodes", "_evictions", "_nodes")

    def __init__(self, window: int = 64, max_nodes: int = 4096) -> None:
        self._window, self._max_nodes = _check_guard_args(window, max_nodes)
        self._evictions = 0
        # node_id -> [highest sequence, {sequence: bitmap of accepted indexes}]
        self._nodes: OrderedDict[int, list] = OrderedDict()

    @property
    def window(self) -> int:
        """Sequences remembered per node: older ones are refused."""
        return self._window

    @property
    def max_nodes(self) -> int:
        """Nodes tracked at most (LRU)."""
        return self._max_nodes

    @property
    def evictions(self) -> int:
        """Nodes forgotten so far to stay within max_nodes."""
        return self._evictions

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def check(self, header: PacketHeader, index: int) -> None:
        """Record the datagram as seen, or raise PacketError("replayed")."""
        node = _int_field(header.node_id, 0, _U64, "header.node_id")
        seq = _int_field(header.sequence, 0, _U64, "header.sequence")
        index = _check_index(index)
        bit = 1 << index
        nodes = self._nodes
        state = nodes.get(node)
        if state is None:
            if len(nodes) >= self._max_nodes:
                nodes.popitem(last=False)
                self._evictions += 1
            nodes[node] = [seq, {seq: bit}]
            return
        highest, seen = state
        if seq > highest:
            state[0] = seq
            for old in [s for s in seen if seq - s >= self._window]:
                del seen[old]
            seen[seq] = bit
        else:
            behind = highest - seq
            if behind >= self._window:
                raise PacketError(
                    "replayed",
                    f"node {node} sequence {seq} is {behind} behind {highest}, outside the {self._window}-sequence window",
                )
            mask = seen.get(seq, 0)
            if mask & bit:
                raise PacketError("replayed", f"node {node} sequence {seq} datagram {index} was accepted already")
            seen[seq] = mask | bit
        nodes.move_to_end(node)


__all__ = [
    "CONN_COLUMNS",
    "CONN_SIZE",
    "ColumnBatch",
    "DEFAULT_MTU",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_DATAGRAM",
    "MIN_MTU",
    "OVERHEAD",
    "REASONS",
    "SEG_COLUMNS",
    "SEG_SIZE",
    "TAG_SIZE",
    "VERSION",
    "PacketError",
    "RecordBatch",
    "ReplayGuard",
    "datagram_tag",
    "decode_datagram",
    "encode_batch",
    "encode_packet",
    "max_segments",
]
