"""Pure-Python SPOP codec: the reference twin of cext/_codec.pyx.

Both twins expose the same API and must behave identically (same values,
same bytes, same errors); tests/spop/test_codec_twins.py holds them to it. This one
is the readable reference, used when SPOA_NO_EXTENSIONS=1 or when the
extension is not built.
"""

from __future__ import annotations

import logging
import socket
from ipaddress import IPv4Address, IPv6Address
from operator import index
from typing import Any

from .constants import (
    FLAG_FIN,
    LENGTH_PREFIX_SIZE,
    MAX_VARINT_BYTES,
    MIN_FRAME_LENGTH,
    ActionType,
    DataType,
    FrameType,
    Status,
)
from .errors import (
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

_U64_MAX = (1 << 64) - 1
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_TYPE_MASK = 0x0F
_BOOL_TRUE = 0x10

_SET_VAR = int(ActionType.SET_VAR)
_UNSET_VAR = int(ActionType.UNSET_VAR)
_NULL = int(DataType.NULL)
_BOOL = int(DataType.BOOL)
_INT32 = int(DataType.INT32)
_UINT32 = int(DataType.UINT32)
_INT64 = int(DataType.INT64)
_UINT64 = int(DataType.UINT64)
_IPV4 = int(DataType.IPV4)
_IPV6 = int(DataType.IPV6)
_STRING = int(DataType.STRING)
_BINARY = int(DataType.BINARY)


def _invalid(detail: str) -> SpopError:
    return SpopError(Status.INVALID, detail)


# Argument checks shared by both twins: integers must be real integers
# (operator.index: a float is a TypeError, never truncated), in range
# (OverflowError), and buffer offsets inside the buffer (ValueError).


def _uint(value: Any, bits: int) -> int:
    value = index(value)
    if not 0 <= value < (1 << bits):
        raise OverflowError(f"value out of range for an unsigned {bits}-bit field")
    return value


def _scope(value: Any) -> int:
    value = index(value)
    if not 0 <= value <= 4:
        raise ValueError("scope must be 0..4 (proc, sess, txn, req, res)")
    return value


def _check_span(buf: Any, start: Any, end: Any) -> tuple[int, int]:
    start, end = index(start), index(end)
    if not 0 <= start <= end <= len(buf):
        raise ValueError("offsets outside the buffer")
    return start, end


def _as_bytes(data: Any) -> bytes:
    """Bytes of a bytes-like object; anything else (int, str) is a TypeError."""
    return data if type(data) is bytes else bytes(memoryview(data))


# -- varint ------------------------------------------------------------------
# HAProxy's scheme (include/haproxy/intops.h): values < 240 fit one byte; else
# the first byte carries 4 bits with the 0xF0 marker and each following byte 7
# bits. The decoder adds every byte *with* its 0x80 continuation bit; the
# encoder's "- 240" and "- 128" compensate. A LEB128 decoder is wrong >= 2288.


def encode_varint(value: int) -> bytes:
    value = index(value)
    if value < 0 or value > _U64_MAX:
        raise OverflowError("varint value out of range [0, 2^64-1]")
    if value < 240:
        return bytes((value,))
    out = bytearray(((value & 0x0F) | 0xF0,))
    value = (value - 240) >> 4
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value = (value - 128) >> 7
    out.append(value)
    return bytes(out)


def decode_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Return (value, next position); SpopError on truncation or overflow."""
    buf = _as_bytes(buf)
    if index(pos) < 0 or index(end) > len(buf):
        raise IndexError("position out of range")
    return _decode_varint(buf, pos, end)


def _decode_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos >= end:
        raise _invalid(E_TRUNCATED_VARINT)
    value = buf[pos]
    pos += 1
    if value < 240:
        return value, pos
    shift = 4
    for _ in range(MAX_VARINT_BYTES - 1):
        if pos >= end:
            raise _invalid(E_TRUNCATED_VARINT)
        byte = buf[pos]
        pos += 1
        value += byte << shift
        if byte < 128:
            if value > _U64_MAX:
                raise _invalid(E_VARINT_TOO_LONG)
            return value, pos
        shift += 7
    raise _invalid(E_VARINT_TOO_LONG)


# -- typed data and names ------------------------------------------------------


def _read_name(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Bounds of a varint-prefixed (untyped) string: (start, stop)."""
    length, pos = _decode_varint(buf, pos, end)
    if length > end - pos:
        raise _invalid(E_TRUNCATED_STRING)
    return pos, pos + length


def _text(buf: bytes, start: int, stop: int) -> str:
    # surrogateescape: HAProxy strings are bytes; no input may kill decoding.
    return buf[start:stop].decode("utf-8", "surrogateescape")


def _as_signed(value: int) -> int:
    return value - (1 << 64) if value > _I64_MAX else value


def _decode_typed(buf: bytes, pos: int, end: int) -> tuple[Any, int]:
    if pos >= end:
        raise _invalid(E_TRUNCATED_DATA)
    tag = buf[pos]
    dtype = tag & _TYPE_MASK
    pos += 1
    if dtype == _NULL:
        return None, pos
    if dtype == _BOOL:
        return bool(tag & _BOOL_TRUE), pos
    if dtype == _INT32 or dtype == _INT64:
        value, pos = _decode_varint(buf, pos, end)
        return _as_signed(value), pos
    if dtype == _UINT32 or dtype == _UINT64:
        return _decode_varint(buf, pos, end)
    if dtype == _IPV4:
        if end - pos < 4:
            raise _invalid(E_TRUNCATED_DATA)
        return IPv4Address(buf[pos : pos + 4]), pos + 4
    if dtype == _IPV6:
        if end - pos < 16:
            raise _invalid(E_TRUNCATED_DATA)
        return IPv6Address(buf[pos : pos + 16]), pos + 16
    if dtype == _STRING or dtype == _BINARY:
        start, stop = _read_name(buf, pos, end)
        if dtype == _STRING:
            return _text(buf, start, stop), stop
        return bytes(buf[start:stop]), stop
    raise _invalid(E_UNKNOWN_DATA_TYPE)


def _skip_typed(buf: bytes, pos: int, end: int) -> int:
    return _decode_typed(buf, pos, end)[1]


# -- decoded objects ---------------------------------------------------------------


# Names one Message.get_addresses() call may ask for (the compiled twin's stack arrays).
MAX_LOOKUP = 16


def _address_text(value: Any) -> Any:
    """An IPv4/IPv6 address as its text (what get_address() returns), any other value as it is."""
    if isinstance(value, IPv6Address):
        return socket.inet_ntop(socket.AF_INET6, value.packed)  # glibc's text, as the compiled twin
    return str(value) if isinstance(value, IPv4Address) else value


class Message:
    """One SPOE message of a NOTIFY; arguments are decoded on access."""

    __slots__ = ("name", "nargs", "_buf", "_start", "_end", "_args")

    def __init__(self, name: str, nargs: int, buf: bytes, start: int, end: int) -> None:
        if not isinstance(name, str) or not isinstance(buf, bytes):
            raise TypeError("Message(name: str, nargs, buf: bytes, start, end)")
        self.name = name
        self.nargs = _uint(nargs, 8)
        self._buf = buf
        self._start, self._end = _check_span(buf, start, end)
        self._args: dict[str, Any] | None = None

    def get(self, name: str, default: Any = None) -> Any:
        """Value of the first argument called `name` (default if absent)."""
        if not isinstance(name, str):
            raise TypeError("argument names are str")
        want = name.encode("utf-8", "surrogateescape")
        buf, pos, end = self._buf, self._start, self._end
        for _ in range(self.nargs):
            start, stop = _read_name(buf, pos, end)
            if buf[start:stop] == want:
                return _decode_typed(buf, stop, end)[0]
            pos = _skip_typed(buf, stop, end)
        return default

    def get_address(self, name: str, default: Any = None) -> Any:
        """The first argument called `name` as address text ("192.0.2.1", "2001:db8::1").

        Cheaper than str(get(name)) for the per-message identity arguments;
        an argument that is not an IP address is returned as get() would.
        """
        return _address_text(self.get(name, default))

    def get_addresses(self, names: tuple) -> list:
        """[get_address(name) for name in names] (None for an absent one) in
        one pass over the arguments instead of one per name: the lease
        handler reads 5 identity arguments per message."""
        if not isinstance(names, tuple):
            raise TypeError("get_addresses takes a tuple of names")
        if len(names) > MAX_LOOKUP:
            raise ValueError(f"at most {MAX_LOOKUP} names per get_addresses()")
        wanted = {}
        for j, name in enumerate(names):
            if not isinstance(name, str):
                raise TypeError("argument names are str")
            wanted.setdefault(name.encode("utf-8", "surrogateescape"), []).append(j)
        out: list = [None] * len(names)
        buf, pos, end = self._buf, self._start, self._end
        for _ in range(self.nargs):
            if not wanted:
                break
            start, stop = _read_name(buf, pos, end)
            slots = wanted.pop(buf[start:stop], None)
            if slots is None:
                pos = _skip_typed(buf, stop, end)
                continue
            value, pos = _decode_typed(buf, stop, end)
            for j in slots:
                out[j] = _address_text(value)
        return out

    def items(self) -> list[tuple[str, Any]]:
        """Every argument in order, duplicates and unnamed ones included."""
        out = []
        buf, pos, end = self._buf, self._start, self._end
        for _ in range(self.nargs):
            start, stop = _read_name(buf, pos, end)
            value, pos = _decode_typed(buf, stop, end)
            out.append((_text(buf, start, stop), value))
        return out

    @property
    def args(self) -> dict[str, Any]:
        """Arguments by name; the first of duplicated names wins, as in get()."""
        if self._args is None:
            args: dict[str, Any] = {}
            for key, value in self.items():
                args.setdefault(key, value)
            self._args = args
        return self._args

    def __len__(self) -> int:
        return self.nargs

    def __repr__(self) -> str:
        return f"Message({self.name!r}, {self.items()!r})"


class Frame:
    """A frame whose header is decoded; payload views stay in the receive buffer."""

    __slots__ = ("_type", "_flags", "_stream_id", "_frame_id", "_buf", "_start", "_end")

    def __init__(
        self, ftype: int, flags: int, stream_id: int, frame_id: int, buf: bytes, start: int, end: int
    ) -> None:
        if not isinstance(buf, bytes):
            raise TypeError("Frame buffers are bytes")
        self._type = _uint(ftype, 8)
        self._flags = _uint(flags, 32)
        self._stream_id = _uint(stream_id, 64)
        self._frame_id = _uint(frame_id, 64)
        self._buf = buf
        self._start, self._end = _check_span(buf, start, end)

    # Read-only, as the compiled twin's fields are.
    type = property(lambda self: self._type)
    flags = property(lambda self: self._flags)
    stream_id = property(lambda self: self._stream_id)
    frame_id = property(lambda self: self._frame_id)

    @classmethod
    def from_payload(cls, ftype: int, flags: int, stream_id: int, frame_id: int, payload: bytes) -> Frame:
        """A frame over a standalone payload (e.g. reassembled fragments)."""
        payload = _as_bytes(payload)
        return cls(ftype, flags, stream_id, frame_id, payload, 0, len(payload))

    @property
    def payload(self) -> bytes:
        return bytes(self._buf[self._start : self._end])

    @property
    def payload_length(self) -> int:
        return self._end - self._start

    def kv(self) -> dict[str, Any]:
        """Decode a KV-LIST payload (HELLO, DISCONNECT); later keys win."""
        out: dict[str, Any] = {}
        buf, pos, end = self._buf, self._start, self._end
        while pos < end:
            start, stop = _read_name(buf, pos, end)
            out[_text(buf, start, stop)], pos = _decode_typed(buf, stop, end)
        return out

    def messages(self) -> list[Message]:
        """Decode a LIST-OF-MESSAGES payload (NOTIFY), validating every argument."""
        out = []
        buf, pos, end = self._buf, self._start, self._end
        while pos < end:
            start, stop = _read_name(buf, pos, end)
            if stop >= end:
                raise _invalid(E_TRUNCATED_MESSAGE)
            nargs = buf[stop]
            args_start = pos = stop + 1
            for _ in range(nargs):
                pos = _skip_typed(buf, _read_name(buf, pos, end)[1], end)
            out.append(Message(_text(buf, start, stop), nargs, buf, args_start, pos))
        return out

    def actions(self) -> list[tuple]:
        """Decode a LIST-OF-ACTIONS payload (ACK), as HAProxy reads it.

        Returns ("set-var", scope, name, value) and ("unset-var", scope, name)
        tuples.
        """
        out: list[tuple] = []
        buf, pos, end = self._buf, self._start, self._end
        while pos < end:
            if end - pos < 3:
                raise _invalid(E_BAD_ACTION)
            atype, nargs, scope = buf[pos], buf[pos + 1], buf[pos + 2]
            if atype == _SET_VAR and nargs == 3:
                start, stop = _read_name(buf, pos + 3, end)
                value, pos = _decode_typed(buf, stop, end)
                out.append(("set-var", scope, _text(buf, start, stop), value))
            elif atype == _UNSET_VAR and nargs == 2:
                start, pos = _read_name(buf, pos + 3, end)
                out.append(("unset-var", scope, _text(buf, start, pos)))
            else:
                raise _invalid(E_BAD_ACTION)
        return out

    def __repr__(self) -> str:
        return (
            f"Frame(type={self.type}, flags={self.flags:#x}, stream_id={self.stream_id}, "
            f"frame_id={self.frame_id}, payload={self.payload_length}B)"
        )


def _parse_frame(buf: bytes, start: int, end: int) -> Frame:
    """Decode the header of the frame in buf[start:end] (after the prefix)."""
    ftype = buf[start]
    flags = int.from_bytes(buf[start + 1 : start + 5], "big")
    stream_id, pos = _decode_varint(buf, start + 5, end)
    frame_id, pos = _decode_varint(buf, pos, end)
    return Frame(ftype, flags, stream_id, frame_id, buf, pos, end)


class FrameReader:
    """Cuts a byte stream into frames, checking each length before buffering it."""

    __slots__ = ("max_frame_size", "_buf", "_pos")

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = index(max_frame_size)
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        data = _as_bytes(data)
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return len(self._buf) - self._pos

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < LENGTH_PREFIX_SIZE:
            return None
        length = int.from_bytes(buf[pos : pos + LENGTH_PREFIX_SIZE], "big")
        if length > self.max_frame_size:
            raise SpopError(Status.TOO_BIG, E_FRAME_TOO_BIG)
        if length < MIN_FRAME_LENGTH:
            raise _invalid(E_FRAME_TOO_SHORT)
        if len(buf) - pos < LENGTH_PREFIX_SIZE + length:
            return None
        frame = bytes(buf[pos + LENGTH_PREFIX_SIZE : pos + LENGTH_PREFIX_SIZE + length])
        self._pos = pos + LENGTH_PREFIX_SIZE + length
        return _parse_frame(frame, 0, length)


# -- encoding -----------------------------------------------------------------------


class FrameWriter:
    """Builds outgoing frames in one buffer, back-filling each length prefix.

    Handlers receive it as their action writer: set_var() / unset_var()
    append to the ACK frame the server has opened.
    """

    __slots__ = ("_buf", "_frame_start")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._frame_start = -1

    def __len__(self) -> int:
        return len(self._buf)

    def take(self) -> bytes:
        """Everything written so far; the writer is left empty."""
        if self._frame_start >= 0:
            raise RuntimeError("a frame is still open")
        out = bytes(self._buf)
        del self._buf[:]
        return out

    # frame structure
    def begin_frame(self, ftype: int, stream_id: int, frame_id: int, flags: int = FLAG_FIN) -> None:
        if self._frame_start >= 0:
            raise RuntimeError("a frame is already open")
        ftype, flags = _uint(ftype, 8), _uint(flags, 32)
        head = bytearray(LENGTH_PREFIX_SIZE)
        head.append(ftype)
        head += flags.to_bytes(4, "big")
        head += encode_varint(stream_id)
        head += encode_varint(frame_id)
        self._frame_start = len(self._buf)
        self._buf += head

    def frame_length(self) -> int:
        """Length of the open frame as its prefix will count it."""
        if self._frame_start < 0:
            raise RuntimeError("no frame is open")
        return len(self._buf) - self._frame_start - LENGTH_PREFIX_SIZE

    def end_frame(self) -> int:
        """Close the open frame, back-fill its length and return that length."""
        length = self.frame_length()
        if length > 0xFFFFFFFF:
            raise OverflowError("frame longer than 2^32-1 bytes")
        start = self._frame_start
        self._buf[start : start + LENGTH_PREFIX_SIZE] = length.to_bytes(4, "big")
        self._frame_start = -1
        return length

    def abort_frame(self) -> None:
        """Drop the open frame, as if it had never been begun."""
        if self._frame_start < 0:
            raise RuntimeError("no frame is open")
        del self._buf[self._frame_start :]
        self._frame_start = -1

    def mark(self) -> int:
        return len(self._buf)

    def truncate(self, mark: int) -> None:
        """Drop what was written after mark() (inside the open frame only)."""
        if self._frame_start < 0 or not self._frame_start + LENGTH_PREFIX_SIZE < mark <= len(self._buf):
            raise ValueError("mark is not inside the open frame")
        del self._buf[mark:]

    # primitives
    def put_uint8(self, value: int) -> None:
        self._buf.append(_uint(value, 8))

    def put_varint(self, value: int) -> None:
        self._buf += encode_varint(value)

    def put_name(self, name: str | bytes) -> None:
        """An untyped string: varint length + bytes (keys, names)."""
        data = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else _as_bytes(name)
        self._buf += encode_varint(len(data))
        self._buf += data

    def put_raw(self, data: bytes) -> None:
        """Bytes already encoded, appended as they are: e.g. a run of actions
        built once and cached by a handler (an answer that repeats)."""
        if not isinstance(data, bytes):
            raise TypeError(f"put_raw takes bytes, not {type(data).__name__}")
        self._buf += data

    def put_typed(self, value: Any) -> None:
        """Typed data with the type inferred from the Python value (all or nothing)."""
        mark = len(self._buf)
        try:
            self._put_typed(value)
        except BaseException:
            del self._buf[mark:]
            raise

    def _put_typed(self, value: Any) -> None:
        if value is None:
            self._buf.append(_NULL)
        elif value is True or value is False:
            self._buf.append(_BOOL | (_BOOL_TRUE if value else 0))
        elif isinstance(value, int):
            if _I64_MIN <= value <= _I64_MAX:
                self._buf.append(_INT64)
                self._buf += encode_varint(value & _U64_MAX)
            elif _I64_MAX < value <= _U64_MAX:
                self._buf.append(_UINT64)
                self._buf += encode_varint(value)
            else:
                raise OverflowError("integer out of the SPOP range [-2^63, 2^64-1]")
        elif isinstance(value, str):
            self._buf.append(_STRING)
            self.put_name(value)
        elif isinstance(value, (bytes, bytearray, memoryview)):
            self._buf.append(_BINARY)
            self.put_name(value)
        elif isinstance(value, IPv4Address):
            self._buf.append(_IPV4)
            self._buf += value.packed
        elif isinstance(value, IPv6Address):
            self._buf.append(_IPV6)
            self._buf += value.packed
        else:
            raise TypeError(f"cannot encode {type(value).__name__} as SPOP typed data")

    def put_typed_as(self, dtype: int, value: Any) -> None:
        """Typed data of an explicit type, e.g. UINT32 in HELLO frames (all or nothing)."""
        mark = len(self._buf)
        try:
            self._put_typed_as(index(dtype), value)
        except BaseException:
            del self._buf[mark:]
            raise

    def _put_typed_as(self, dtype: int, value: Any) -> None:
        if dtype == _INT32 or dtype == _INT64:
            value = index(value)
            bits = 31 if dtype == _INT32 else 63
            if not -(1 << bits) <= value < (1 << bits):
                raise OverflowError("integer out of range for its SPOP type")
            # Negative values go out as 64-bit two's complement whatever the
            # type: HAProxy reads every integer type into an int64.
            self._buf.append(dtype)
            self._buf += encode_varint(value & _U64_MAX)
        elif dtype == _UINT32 or dtype == _UINT64:
            value = index(value)
            if not 0 <= value < (1 << (32 if dtype == _UINT32 else 64)):
                raise OverflowError("integer out of range for its SPOP type")
            self._buf.append(dtype)
            self._buf += encode_varint(value)
        elif dtype in (_NULL, _BOOL, _STRING, _BINARY, _IPV4, _IPV6):
            expected = {_NULL: type(None), _BOOL: bool, _STRING: str, _BINARY: bytes, _IPV4: IPv4Address, _IPV6: IPv6Address}[dtype]
            if not isinstance(value, expected):
                raise TypeError(f"SPOP type {dtype} needs a {expected.__name__}")
            self._put_typed(value)
        else:
            raise ValueError(f"unknown SPOP data type {dtype}")

    # actions (the handler API)
    def set_var(self, scope: int, name: str, value: Any) -> None:
        """Append a set-var action; a None value makes HAProxy unset the var."""
        scope = _scope(scope)
        mark = len(self._buf)
        self._buf += bytes((_SET_VAR, 3, scope))
        try:
            self.put_name(name)
            self._put_typed(value)
        except BaseException:
            del self._buf[mark:]
            raise

    def unset_var(self, scope: int, name: str) -> None:
        scope = _scope(scope)
        mark = len(self._buf)
        self._buf += bytes((_UNSET_VAR, 2, scope))
        try:
            self.put_name(name)
        except BaseException:
            del self._buf[mark:]
            raise


# -- answering NOTIFY frames -----------------------------------------------------------------
# The agent's per-message loop lives with the codec so that the compiled twin runs it in C
# next to the reader and writer it drives (issue 14); spoa/spop/protocol.py calls it.

_NOTIFY = int(FrameType.NOTIFY)
_ACK = int(FrameType.ACK)
_TXN = 2  # Scope.TXN
# An ACK must never be empty (HAProxy 3.1.0 stalls on it until `timeout processing`):
# handlers that set nothing get this harmless unset-var.
NOOP_VAR = "noop"
_agent_log = logging.getLogger("spoa.spop.agent")
_protocol_log = logging.getLogger("spoa.spop.protocol")


def _run_handler(handler: Any, message: Any, out: Any, stats: Any) -> None:
    """One message's synchronous handler writing its actions into `out`: a failing one loses
    only its own actions (counted handler_errors, logged)."""
    mark = out.mark()
    try:
        handler(message, out)
    except Exception:
        stats.handler_errors += 1
        _agent_log.exception("handler for message %r failed", message.name)
        out.truncate(mark)


def end_ack(out: Any, start: int, stats: Any, max_frame_size: int, peer: str) -> None:
    """Close the ACK begun at `start`: one HAProxy would refuse (over max_frame_size) keeps no
    actions (counted acks_truncated); one with none carries the no-op unset-var."""
    if out.frame_length() > max_frame_size:
        stats.acks_truncated += 1
        _protocol_log.warning("ACK to %s exceeded max-frame-size %d: actions dropped", peer, max_frame_size)
        out.truncate(start)
    if out.mark() == start:
        out.unset_var(_TXN, NOOP_VAR)
    out.end_frame()
    stats.acks += 1
    stats.frames_out += 1


def write_ack(frame: Frame, messages: list, out: Any, handlers: dict, fallback: Any, stats: Any,
              max_frame_size: int, peer: str) -> None:
    """The ACK of one NOTIFY, its messages answered by synchronous handlers in order: each by its
    registered one (`handlers`: name -> handler), else by `fallback` (counted
    unknown_messages; None: no actions)."""
    out.begin_frame(_ACK, frame.stream_id, frame.frame_id)
    start = out.mark()
    for message in messages:
        handler = handlers.get(message.name)
        if handler is None:
            stats.unknown_messages += 1
            handler = fallback
            if handler is None:
                continue
        _run_handler(handler, message, out, stats)
    end_ack(out, start, stats, max_frame_size, peer)


def answer_notifies(reader: FrameReader, out: Any, handlers: dict, fallback: Any, stats: Any,
                    max_frame_size: int, peer: str) -> tuple[Frame | None, int]:
    """Answer the whole (FIN) NOTIFY frames buffered in `reader`, one ACK each into `out`
    (write_ack), until a frame of another kind comes (returned: the caller's general path takes
    it) or none is left (None); with the NOTIFYs answered: (frame or None, count).

    For a connection past its HELLO, no fragmented NOTIFY pending and every handler
    synchronous: the caller's conditions. A SpopError from decoding propagates (the ACKs already
    written stay in `out`). Counts frames_in, notify_frames, messages, acks, frames_out."""
    answered = 0
    while True:
        frame = reader.next_frame()
        if frame is None:
            return None, answered
        stats.frames_in += 1
        if frame.type != _NOTIFY or not frame.flags & FLAG_FIN:
            return frame, answered
        stats.notify_frames += 1
        messages = frame.messages()
        stats.messages += len(messages)
        write_ack(frame, messages, out, handlers, fallback, stats, max_frame_size, peer)
        answered += 1


__all__ = [
    "NOOP_VAR",
    "Frame",
    "FrameReader",
    "FrameType",
    "FrameWriter",
    "Message",
    "answer_notifies",
    "decode_varint",
    "encode_varint",
    "end_ack",
    "write_ack",
]
