# cython: language_level=3
"""SPOP codec, compiled. Same API and behaviour as spoa/spop/_codec_py.py.

Decoding reads straight from the receive chunk through C pointers (no slices
until a value is asked for); encoding appends to one malloc'd buffer and
back-fills each frame's length prefix.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.stdio cimport snprintf
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from spoa._netbytes cimport address_text, load_be32, store_be32

from ipaddress import IPv4Address, IPv6Address
from operator import index

from spoa.spop.constants import Status
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

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t *size) except NULL


cdef enum:
    PREFIX = 4            # length prefix size
    MIN_FRAME = 7         # type + flags + two one-byte varints
    FLAG_FIN = 1
    TYPE_MASK = 0x0F
    BOOL_TRUE = 0x10
    INITIAL_CAPACITY = 1024
    # take() gives memory back when a burst grew the buffer past this
    SHRINK_ABOVE = 65536

cdef object STATUS_INVALID = Status.INVALID
cdef object STATUS_TOO_BIG = Status.TOO_BIG


cdef inline invalid(str detail):
    return SpopError(STATUS_INVALID, detail)


# Argument checks, as in the twin: integers must be real integers (a float is
# a TypeError, never truncated), in range (OverflowError), and buffer offsets
# inside the buffer (ValueError).

cdef object _uint(object value, int bits):
    value = index(value)
    if not 0 <= value < (<object>1 << bits):
        raise OverflowError(f"value out of range for an unsigned {bits}-bit field")
    return value


cdef int _scope(object value) except -1:
    value = index(value)
    if not 0 <= value <= 4:
        raise ValueError("scope must be 0..4 (proc, sess, txn, req, res)")
    return value


cdef inline bytes _as_bytes(object data):
    """Bytes of a bytes-like object; anything else (int, str) is a TypeError."""
    return data if type(data) is bytes else bytes(memoryview(data))


# -- varint ------------------------------------------------------------------
# See the twin for the scheme. Only the 10th byte (shift 60) can overflow
# 64 bits: the sum of nine bytes stays below 2^61.

cdef inline int read_varint(const uint8_t *p, Py_ssize_t *pos, Py_ssize_t end,
                            uint64_t *out) except -1:
    cdef Py_ssize_t i = pos[0]
    cdef uint64_t value, term
    cdef uint8_t byte
    cdef int shift = 4
    cdef int n
    if i >= end:
        raise invalid(E_TRUNCATED_VARINT)
    value = p[i]
    i += 1
    if value >= 240:
        for n in range(9):
            if i >= end:
                raise invalid(E_TRUNCATED_VARINT)
            byte = p[i]
            i += 1
            if shift == 60:
                if byte >= 16:
                    raise invalid(E_VARINT_TOO_LONG)
                term = (<uint64_t>byte) << 60
                if value > 0xFFFFFFFFFFFFFFFFULL - term:
                    raise invalid(E_VARINT_TOO_LONG)
                value += term
                break
            value += (<uint64_t>byte) << shift
            if byte < 128:
                break
            shift += 7
    pos[0] = i
    out[0] = value
    return 0


def encode_varint(value):
    cdef FrameWriter w = FrameWriter()
    w._put_varint(_as_u64(value, "varint value out of range [0, 2^64-1]"))
    return w.take()


def decode_varint(buf, Py_ssize_t pos, Py_ssize_t end):
    """Return (value, next position); SpopError on truncation or overflow."""
    cdef bytes data = _as_bytes(buf)
    cdef uint64_t value
    if end > PyBytes_GET_SIZE(data) or pos < 0:
        raise IndexError("position out of range")
    read_varint(<const uint8_t *>PyBytes_AS_STRING(data), &pos, end, &value)
    return value, pos


cdef inline uint64_t _as_u64(object value, str message) except? 0xFFFFFFFFFFFFFFFF:
    if value < 0 or value > 0xFFFFFFFFFFFFFFFF:
        raise OverflowError(message)
    return PyLong_AsUnsignedLongLong(value)


# -- typed data ---------------------------------------------------------------

cdef inline int read_name(const uint8_t *p, Py_ssize_t *pos, Py_ssize_t end,
                          Py_ssize_t *start) except -1:
    """Bounds of an untyped string: start in *start, end in *pos."""
    cdef uint64_t length
    read_varint(p, pos, end, &length)
    if length > <uint64_t>(end - pos[0]):
        raise invalid(E_TRUNCATED_STRING)
    start[0] = pos[0]
    pos[0] += <Py_ssize_t>length
    return 0


cdef inline str text(const uint8_t *p, Py_ssize_t start, Py_ssize_t stop):
    return PyUnicode_DecodeUTF8(<const char *>p + start, stop - start, "surrogateescape")


cdef object decode_typed(const uint8_t *p, Py_ssize_t *pos, Py_ssize_t end):
    cdef Py_ssize_t i = pos[0]
    cdef Py_ssize_t start
    cdef uint64_t value
    cdef uint8_t tag, dtype
    if i >= end:
        raise invalid(E_TRUNCATED_DATA)
    tag = p[i]
    dtype = tag & TYPE_MASK
    pos[0] = i + 1
    if dtype == T_NULL:
        return None
    if dtype == T_BOOL:
        return (tag & BOOL_TRUE) != 0
    if dtype == T_INT32 or dtype == T_INT64:
        read_varint(p, pos, end, &value)
        return <long long>value
    if dtype == T_UINT32 or dtype == T_UINT64:
        read_varint(p, pos, end, &value)
        return value
    if dtype == T_IPV4:
        if end - pos[0] < 4:
            raise invalid(E_TRUNCATED_DATA)
        pos[0] += 4
        return IPv4Address(PyBytes_FromStringAndSize(<const char *>p + i + 1, 4))
    if dtype == T_IPV6:
        if end - pos[0] < 16:
            raise invalid(E_TRUNCATED_DATA)
        pos[0] += 16
        return IPv6Address(PyBytes_FromStringAndSize(<const char *>p + i + 1, 16))
    if dtype == T_STRING or dtype == T_BINARY:
        read_name(p, pos, end, &start)
        if dtype == T_STRING:
            return text(p, start, pos[0])
        return PyBytes_FromStringAndSize(<const char *>p + start, pos[0] - start)
    raise invalid(E_UNKNOWN_DATA_TYPE)


cdef int skip_typed(const uint8_t *p, Py_ssize_t *pos, Py_ssize_t end) except -1:
    """Validate and step over one typed value without building it."""
    cdef Py_ssize_t start
    cdef uint64_t value
    cdef uint8_t dtype
    if pos[0] >= end:
        raise invalid(E_TRUNCATED_DATA)
    dtype = p[pos[0]] & TYPE_MASK
    pos[0] += 1
    if dtype == T_NULL or dtype == T_BOOL:
        return 0
    if T_INT32 <= dtype <= T_UINT64:
        return read_varint(p, pos, end, &value)
    if dtype == T_IPV4 or dtype == T_IPV6:
        if end - pos[0] < (4 if dtype == T_IPV4 else 16):
            raise invalid(E_TRUNCATED_DATA)
        pos[0] += 4 if dtype == T_IPV4 else 16
        return 0
    if dtype == T_STRING or dtype == T_BINARY:
        return read_name(p, pos, end, &start)
    raise invalid(E_UNKNOWN_DATA_TYPE)


cdef const char *utf8_of(object name, Py_ssize_t *size) except NULL:
    """UTF-8 of an argument name without a new object: CPython caches it in the str.

    Names with lone surrogates (never in HAProxy configs) take the twin's
    surrogateescape encoding, kept alive in a small cache.
    """
    if not isinstance(name, str):
        raise TypeError("argument names are str")
    try:
        return PyUnicode_AsUTF8AndSize(name, size)
    except UnicodeEncodeError:
        encoded = _ESCAPED_NAMES.get(name)
        if encoded is None:
            if len(_ESCAPED_NAMES) >= 1024:  # bounded: such names are a caller's oddity
                _ESCAPED_NAMES.clear()
            encoded = _ESCAPED_NAMES[name] = (<str>name).encode("utf-8", "surrogateescape")
        size[0] = PyBytes_GET_SIZE(encoded)
        return PyBytes_AS_STRING(encoded)


cdef dict _ESCAPED_NAMES = {}


cdef inline const uint8_t *data_of(bytes buf):
    return <const uint8_t *>PyBytes_AS_STRING(buf)


cdef enum:
    # Names one Message.get_addresses() call may ask for (C arrays on the stack).
    MAX_LOOKUP = 16


cdef object decode_address(const uint8_t *p, Py_ssize_t *pos, Py_ssize_t end):
    """The typed value at pos, an IPv4/IPv6 address as its text (what
    get_address() returns): pos is left after it."""
    cdef char text[16]  # "255.255.255.255" and its NUL
    cdef Py_ssize_t i = pos[0]
    cdef int n
    if i < end and (p[i] & TYPE_MASK) == T_IPV4 and end - i >= 5:
        n = snprintf(text, sizeof(text), "%u.%u.%u.%u", p[i + 1], p[i + 2], p[i + 3], p[i + 4])
        pos[0] = i + 5
        return PyUnicode_DecodeASCII(text, n, NULL)
    if i < end and (p[i] & TYPE_MASK) == T_IPV6 and end - i >= 17:
        # inet_ntop, as the twin does: an IPv6Address object and its
        # str() would cost ~5 us per message on IPv6 listeners.
        pos[0] = i + 17
        return address_text(p + i + 1, False)
    return decode_typed(p, pos, end)


cdef int view_typed(const uint8_t *p, Py_ssize_t *pos, Py_ssize_t end, ArgView *v) except -1:
    """Step over the typed value at pos (skip_typed: its checks, its errors), noting where it lies."""
    cdef Py_ssize_t at = pos[0]
    cdef Py_ssize_t i = at + 1
    cdef Py_ssize_t start
    skip_typed(p, pos, end)
    v.dtype = p[at] & TYPE_MASK
    v.at = at
    v.data = NULL
    v.size = 0
    v.value = 0
    if T_INT32 <= v.dtype <= T_UINT64:
        read_varint(p, &i, end, &v.value)
    elif v.dtype == T_IPV4 or v.dtype == T_IPV6:
        v.data = p + i
        v.size = pos[0] - i
    elif v.dtype == T_STRING or v.dtype == T_BINARY:
        read_name(p, &i, end, &start)
        v.data = p + start
        v.size = i - start
    return 0


cdef int find_args(Message message, const char **names, const Py_ssize_t *sizes, Py_ssize_t count,
                   ArgView *out) except -1:
    cdef const uint8_t *p = data_of(message._buf)
    cdef Py_ssize_t pos = message._start
    cdef Py_ssize_t start, length, j
    cdef Py_ssize_t missing = count
    cdef Py_ssize_t first
    cdef int i
    for j in range(count):
        out[j].dtype = -1
    for i in range(message.nargs):
        if not missing:
            break  # what follows is not read: a malformed tail fails no lookup, as in get()
        read_name(p, &pos, message._end, &start)
        length = pos - start
        first = -1
        for j in range(count):
            if out[j].dtype < 0 and length == sizes[j] and memcmp(p + start, names[j], length) == 0:
                if first < 0:
                    view_typed(p, &pos, message._end, &out[j])
                    first = j
                else:
                    out[j] = out[first]  # the same name asked twice
                missing -= 1
        if first < 0:
            skip_typed(p, &pos, message._end)
    return 0


# -- decoded objects ------------------------------------------------------------

cdef class Message:
    """One SPOE message of a NOTIFY; arguments are decoded on access."""

    def __init__(self, str name not None, nargs, bytes buf not None, start, end):
        self.name = name
        self.nargs = _uint(nargs, 8)
        self._buf = buf
        start, end = index(start), index(end)
        if not 0 <= start <= end <= len(buf):
            raise ValueError("offsets outside the buffer")
        self._start = start
        self._end = end

    def get(self, name, default=None):
        """Value of the first argument called `name` (default if absent)."""
        cdef Py_ssize_t wlen
        cdef const char *w = utf8_of(name, &wlen)
        cdef const uint8_t *p = data_of(self._buf)
        cdef Py_ssize_t pos = self._start
        cdef Py_ssize_t start
        cdef int i
        for i in range(self.nargs):
            read_name(p, &pos, self._end, &start)
            if pos - start == wlen and memcmp(p + start, w, wlen) == 0:
                return decode_typed(p, &pos, self._end)
            skip_typed(p, &pos, self._end)
        return default

    def get_address(self, name, default=None):
        """The first argument called `name` as address text ("192.0.2.1", "2001:db8::1").

        Cheaper than str(get(name)) for the per-message identity arguments;
        an argument that is not an IP address is returned as get() would.
        """
        cdef Py_ssize_t wlen
        cdef const char *w = utf8_of(name, &wlen)
        cdef const uint8_t *p = data_of(self._buf)
        cdef Py_ssize_t pos = self._start
        cdef Py_ssize_t start
        cdef int i
        for i in range(self.nargs):
            read_name(p, &pos, self._end, &start)
            if pos - start == wlen and memcmp(p + start, w, wlen) == 0:
                return decode_address(p, &pos, self._end)
            skip_typed(p, &pos, self._end)
        return default

    def get_addresses(self, tuple names not None):
        """[get_address(name) for name in names] (None for an absent one) in
        one pass over the arguments instead of one per name (find_args)."""
        cdef Py_ssize_t count = len(names)
        cdef Py_ssize_t wlen[MAX_LOOKUP]
        cdef const char *w[MAX_LOOKUP]
        cdef ArgView views[MAX_LOOKUP]
        cdef list out = [None] * count
        cdef const uint8_t *p = data_of(self._buf)
        cdef Py_ssize_t j, at
        if count > MAX_LOOKUP:
            raise ValueError(f"at most {MAX_LOOKUP} names per get_addresses()")
        if len(_ESCAPED_NAMES) + count >= 1024:
            _ESCAPED_NAMES.clear()  # now, not between two names: it would free the first's bytes
        for j in range(count):
            w[j] = utf8_of(names[j], &wlen[j])
        find_args(self, w, wlen, count, views)
        for j in range(count):
            if views[j].dtype >= 0:
                at = views[j].at
                out[j] = decode_address(p, &at, self._end)
        return out

    def items(self):
        """Every argument in order, duplicates and unnamed ones included."""
        cdef list out = []
        cdef const uint8_t *p = data_of(self._buf)
        cdef Py_ssize_t pos = self._start
        cdef Py_ssize_t start
        cdef str key
        cdef int i
        for i in range(self.nargs):
            read_name(p, &pos, self._end, &start)
            key = text(p, start, pos)
            out.append((key, decode_typed(p, &pos, self._end)))
        return out

    @property
    def args(self):
        """Arguments by name; the first of duplicated names wins, as in get()."""
        cdef dict args
        if self._args is None:
            args = {}
            for key, value in self.items():
                args.setdefault(key, value)
            self._args = args
        return self._args

    def __len__(self):
        return self.nargs

    def __repr__(self):
        return f"Message({self.name!r}, {self.items()!r})"


cdef Message new_message(str name, int nargs, bytes buf, Py_ssize_t start, Py_ssize_t end):
    """The decoder's constructor: its offsets are known good, no checks."""
    cdef Message m = Message.__new__(Message)
    m.name = name
    m.nargs = nargs
    m._buf = buf
    m._start = start
    m._end = end
    return m


cdef Frame new_frame(int ftype, uint32_t flags, uint64_t stream_id, uint64_t frame_id, bytes buf,
                     Py_ssize_t start, Py_ssize_t end):
    """The reader's constructor: its offsets are known good, no checks."""
    cdef Frame f = Frame.__new__(Frame)
    f.type = ftype
    f.flags = flags
    f.stream_id = stream_id
    f.frame_id = frame_id
    f._buf = buf
    f._start = start
    f._end = end
    return f


cdef class Frame:
    """A frame whose header is decoded; the payload stays in the receive buffer."""

    def __init__(self, ftype, flags, stream_id, frame_id, bytes buf not None, start, end):
        self.type = _uint(ftype, 8)
        self.flags = _uint(flags, 32)
        self.stream_id = _uint(stream_id, 64)
        self.frame_id = _uint(frame_id, 64)
        start, end = index(start), index(end)
        if not 0 <= start <= end <= len(buf):
            raise ValueError("offsets outside the buffer")
        self._buf = buf
        self._start = start
        self._end = end

    @classmethod
    def from_payload(cls, ftype, flags, stream_id, frame_id, payload):
        """A frame over a standalone payload (e.g. reassembled fragments)."""
        cdef bytes data = _as_bytes(payload)
        return cls(ftype, flags, stream_id, frame_id, data, 0, len(data))

    @property
    def payload(self):
        return PyBytes_FromStringAndSize(PyBytes_AS_STRING(self._buf) + self._start,
                                         self._end - self._start)

    @property
    def payload_length(self):
        return self._end - self._start

    def kv(self):
        """Decode a KV-LIST payload (HELLO, DISCONNECT); later keys win."""
        cdef dict out = {}
        cdef const uint8_t *p = data_of(self._buf)
        cdef Py_ssize_t pos = self._start
        cdef Py_ssize_t start
        cdef str key
        while pos < self._end:
            read_name(p, &pos, self._end, &start)
            key = text(p, start, pos)
            out[key] = decode_typed(p, &pos, self._end)
        return out

    def messages(self):
        """Decode a LIST-OF-MESSAGES payload (NOTIFY), validating every argument."""
        cdef list out = []
        cdef const uint8_t *p = data_of(self._buf)
        cdef Py_ssize_t pos = self._start
        cdef Py_ssize_t end = self._end
        cdef Py_ssize_t name_start, name_end, args_start, arg_start
        cdef int nargs, i
        while pos < end:
            read_name(p, &pos, end, &name_start)
            if pos >= end:
                raise invalid(E_TRUNCATED_MESSAGE)
            name_end = pos
            nargs = p[pos]
            pos += 1
            args_start = pos
            for i in range(nargs):
                read_name(p, &pos, end, &arg_start)
                skip_typed(p, &pos, end)
            out.append(new_message(text(p, name_start, name_end), nargs, self._buf, args_start, pos))
        return out

    def actions(self):
        """Decode a LIST-OF-ACTIONS payload (ACK), as HAProxy reads it."""
        cdef list out = []
        cdef const uint8_t *p = data_of(self._buf)
        cdef Py_ssize_t pos = self._start
        cdef Py_ssize_t end = self._end
        cdef Py_ssize_t start
        cdef uint8_t atype, nargs, scope
        cdef str name
        while pos < end:
            if end - pos < 3:
                raise invalid(E_BAD_ACTION)
            atype = p[pos]
            nargs = p[pos + 1]
            scope = p[pos + 2]
            pos += 3
            if atype == A_SET_VAR and nargs == 3:
                read_name(p, &pos, end, &start)
                name = text(p, start, pos)
                out.append(("set-var", scope, name, decode_typed(p, &pos, end)))
            elif atype == A_UNSET_VAR and nargs == 2:
                read_name(p, &pos, end, &start)
                out.append(("unset-var", scope, text(p, start, pos)))
            else:
                raise invalid(E_BAD_ACTION)
        return out

    def __repr__(self):
        return (f"Frame(type={self.type}, flags={self.flags:#x}, stream_id={self.stream_id}, "
                f"frame_id={self.frame_id}, payload={self._end - self._start}B)")


cdef class FrameReader:
    """Cuts a byte stream into frames, checking each length before buffering it."""

    def __init__(self, Py_ssize_t max_frame_size):
        self.max_frame_size = max_frame_size
        self._buf = b""
        self._pos = 0
        self._acc = None

    def feed(self, data):
        cdef bytes chunk = _as_bytes(data)
        if self._acc is None:
            if self._pos >= PyBytes_GET_SIZE(self._buf):
                self._buf = chunk
                self._pos = 0
                return
            # A frame straddles chunks: gather it (amortized linear, even
            # when fed a byte at a time) instead of re-joining every chunk.
            self._acc = bytearray(self._buf[self._pos:])
            self._buf = b""
            self._pos = 0
        self._acc += chunk
        self._settle()

    cdef int _settle(self) except -1:
        """Hand gathered bytes back to in-place decoding once a verdict is possible."""
        cdef Py_ssize_t have = len(self._acc)
        cdef uint32_t length
        if have < PREFIX:
            return 0
        length = load_be32(<const uint8_t *>(<char *>self._acc))
        if length > self.max_frame_size or length < MIN_FRAME or have >= PREFIX + <Py_ssize_t>length:
            self._buf = bytes(self._acc)
            self._acc = None
        return 0

    @property
    def buffered(self):
        """Bytes received and not yet returned as frames."""
        return PyBytes_GET_SIZE(self._buf) - self._pos + (len(self._acc) if self._acc is not None else 0)

    def next_frame(self):
        """The next complete frame, or None until more bytes arrive."""
        cdef const uint8_t *p
        cdef Py_ssize_t pos, end, avail
        cdef uint32_t length, flags
        cdef uint64_t sid, fid
        cdef int ftype
        if self._acc is not None:
            self._settle()
            if self._acc is not None:
                return None
        avail = PyBytes_GET_SIZE(self._buf) - self._pos
        if avail < PREFIX:
            return None
        p = data_of(self._buf)
        pos = self._pos
        length = load_be32(p + pos)
        if length > self.max_frame_size:
            raise SpopError(STATUS_TOO_BIG, E_FRAME_TOO_BIG)
        if length < MIN_FRAME:
            raise invalid(E_FRAME_TOO_SHORT)
        if avail < PREFIX + <Py_ssize_t>length:
            return None
        pos += PREFIX
        end = pos + length
        self._pos = end
        ftype = p[pos]
        flags = load_be32(p + pos + 1)
        pos += 5
        read_varint(p, &pos, end, &sid)
        read_varint(p, &pos, end, &fid)
        return new_frame(ftype, flags, sid, fid, self._buf, pos, end)


# -- encoding -------------------------------------------------------------------------

cdef class FrameWriter:
    """Builds outgoing frames in one buffer, back-filling each length prefix."""

    def __cinit__(self):
        self._data = <char *>PyMem_Malloc(INITIAL_CAPACITY)
        if self._data is NULL:
            raise MemoryError()
        self._cap = INITIAL_CAPACITY
        self._len = 0
        self._frame_start = -1

    def __dealloc__(self):
        PyMem_Free(self._data)

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self._len + extra
        cdef Py_ssize_t cap = self._cap
        cdef char *data
        if need <= cap:
            return 0
        while cap < need:
            cap *= 2
        data = <char *>PyMem_Realloc(self._data, cap)
        if data is NULL:
            raise MemoryError()
        self._data = data
        self._cap = cap
        return 0

    cdef int _put_raw(self, const char *data, Py_ssize_t size) except -1:
        self._reserve(size)
        memcpy(self._data + self._len, data, size)
        self._len += size
        return 0

    cdef int _put_byte(self, uint8_t value) except -1:
        self._reserve(1)
        self._data[self._len] = <char>value
        self._len += 1
        return 0

    cdef int _put_varint(self, uint64_t value) except -1:
        cdef uint8_t *out
        self._reserve(10)
        out = <uint8_t *>self._data + self._len
        if value < 240:
            out[0] = <uint8_t>value
            self._len += 1
            return 0
        out[0] = <uint8_t>((value & 0x0F) | 0xF0)
        out += 1
        value = (value - 240) >> 4
        while value >= 128:
            out[0] = <uint8_t>((value & 0x7F) | 0x80)
            out += 1
            value = (value - 128) >> 7
        out[0] = <uint8_t>value
        self._len = (<char *>out + 1) - self._data
        return 0

    cdef int _put_name(self, object name) except -1:
        cdef const char *p
        cdef Py_ssize_t size
        cdef bytes data
        if isinstance(name, str):
            try:
                p = PyUnicode_AsUTF8AndSize(name, &size)
            except UnicodeEncodeError:
                data = (<str>name).encode("utf-8", "surrogateescape")
                p = PyBytes_AS_STRING(data)
                size = PyBytes_GET_SIZE(data)
        else:
            data = _as_bytes(name)
            p = PyBytes_AS_STRING(data)
            size = PyBytes_GET_SIZE(data)
        self._put_varint(<uint64_t>size)
        return self._put_raw(p, size)

    cdef int _put_typed(self, object value) except -1:
        cdef long long as_signed
        cdef int overflow
        if value is None:
            return self._put_byte(T_NULL)
        if value is True or value is False:
            return self._put_byte(T_BOOL | (BOOL_TRUE if value is True else 0))
        if isinstance(value, int):
            as_signed = PyLong_AsLongLongAndOverflow(value, &overflow)
            if overflow == 0:
                self._put_byte(T_INT64)
                return self._put_varint(<uint64_t>as_signed)
            if overflow > 0 and value <= 0xFFFFFFFFFFFFFFFF:
                self._put_byte(T_UINT64)
                return self._put_varint(PyLong_AsUnsignedLongLong(value))
            raise OverflowError("integer out of the SPOP range [-2^63, 2^64-1]")
        if isinstance(value, str):
            self._put_byte(T_STRING)
            return self._put_name(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            self._put_byte(T_BINARY)
            return self._put_name(value)
        if isinstance(value, IPv4Address):
            self._put_byte(T_IPV4)
            return self._put_raw(value.packed, 4)
        if isinstance(value, IPv6Address):
            self._put_byte(T_IPV6)
            return self._put_raw(value.packed, 16)
        raise TypeError(f"cannot encode {type(value).__name__} as SPOP typed data")

    def __len__(self):
        return self._len

    def take(self):
        """Everything written so far; the writer is left empty."""
        cdef bytes out
        cdef char *data
        if self._frame_start >= 0:
            raise RuntimeError("a frame is still open")
        out = PyBytes_FromStringAndSize(self._data, self._len)
        self._len = 0
        if self._cap > SHRINK_ABOVE:
            data = <char *>PyMem_Realloc(self._data, INITIAL_CAPACITY)
            if data is not NULL:
                self._data = data
                self._cap = INITIAL_CAPACITY
        return out

    # frame structure
    def begin_frame(self, ftype, stream_id, frame_id, flags=FLAG_FIN):
        cdef uint64_t sid, fid
        cdef uint32_t fl
        cdef Py_ssize_t start = self._len
        if self._frame_start >= 0:
            raise RuntimeError("a frame is already open")
        cdef uint8_t ft = _uint(ftype, 8)
        fl = _uint(flags, 32)
        sid = _as_u64(stream_id, "varint value out of range [0, 2^64-1]")
        fid = _as_u64(frame_id, "varint value out of range [0, 2^64-1]")
        self._reserve(PREFIX + 5)
        self._len += PREFIX
        self._data[self._len] = <char>ft
        store_be32(<uint8_t *>self._data + self._len + 1, fl)
        self._len += 5
        self._put_varint(sid)
        self._put_varint(fid)
        self._frame_start = start

    def frame_length(self):
        """Length of the open frame as its prefix will count it."""
        if self._frame_start < 0:
            raise RuntimeError("no frame is open")
        return self._len - self._frame_start - PREFIX

    def end_frame(self):
        """Close the open frame, back-fill its length and return that length."""
        cdef Py_ssize_t length
        cdef uint8_t *p
        if self._frame_start < 0:
            raise RuntimeError("no frame is open")
        length = self._len - self._frame_start - PREFIX
        if length > 0xFFFFFFFF:
            raise OverflowError("frame longer than 2^32-1 bytes")
        p = <uint8_t *>self._data + self._frame_start
        store_be32(p, length)
        self._frame_start = -1
        return length

    def abort_frame(self):
        """Drop the open frame, as if it had never been begun."""
        if self._frame_start < 0:
            raise RuntimeError("no frame is open")
        self._len = self._frame_start
        self._frame_start = -1

    def mark(self):
        return self._len

    def truncate(self, Py_ssize_t mark):
        """Drop what was written after mark() (inside the open frame only)."""
        if self._frame_start < 0 or not self._frame_start + PREFIX < mark <= self._len:
            raise ValueError("mark is not inside the open frame")
        self._len = mark

    # primitives
    def put_uint8(self, value):
        self._put_byte(<uint8_t>_uint(value, 8))

    def put_varint(self, value):
        self._put_varint(_as_u64(value, "varint value out of range [0, 2^64-1]"))

    def put_name(self, name):
        """An untyped string: varint length + bytes (keys, names)."""
        self._put_name(name)

    def put_raw(self, bytes data not None):
        """Bytes already encoded, appended as they are: e.g. a run of actions
        built once and cached by a handler (an answer that repeats)."""
        self._put_raw(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))

    def put_typed(self, value):
        """Typed data with the type inferred from the Python value (all or nothing)."""
        cdef Py_ssize_t mark = self._len
        try:
            self._put_typed(value)
        except BaseException:
            self._len = mark
            raise

    def put_typed_as(self, dtype, value):
        """Typed data of an explicit type, e.g. UINT32 in HELLO frames (all or nothing)."""
        cdef Py_ssize_t mark = self._len
        try:
            self._put_typed_as(index(dtype), value)
        except BaseException:
            self._len = mark
            raise

    cdef int _put_typed_as(self, int dtype, object value) except -1:
        cdef object bits  # a Python int: 1 << 63 must not be C arithmetic
        if dtype == T_INT32 or dtype == T_INT64:
            value = index(value)
            bits = 31 if dtype == T_INT32 else 63
            if not -(1 << bits) <= value < (1 << bits):
                raise OverflowError("integer out of range for its SPOP type")
            # 64-bit two's complement whatever the type: HAProxy reads every
            # integer type into an int64.
            self._put_byte(<uint8_t>dtype)
            self._put_varint(<uint64_t>(<long long>value))
        elif dtype == T_UINT32 or dtype == T_UINT64:
            value = index(value)
            bits = 32 if dtype == T_UINT32 else 64
            if not 0 <= value < (1 << bits):
                raise OverflowError("integer out of range for its SPOP type")
            self._put_byte(<uint8_t>dtype)
            self._put_varint(PyLong_AsUnsignedLongLong(value))
        elif dtype in (T_NULL, T_BOOL, T_STRING, T_BINARY, T_IPV4, T_IPV6):
            expected = {T_NULL: type(None), T_BOOL: bool, T_STRING: str, T_BINARY: bytes,
                        T_IPV4: IPv4Address, T_IPV6: IPv6Address}[dtype]
            if not isinstance(value, expected):
                raise TypeError(f"SPOP type {dtype} needs a {expected.__name__}")
            self._put_typed(value)
        else:
            raise ValueError(f"unknown SPOP data type {dtype}")
        return 0

    # actions (the handler API)
    def set_var(self, scope, name, value):
        """Append a set-var action; a None value makes HAProxy unset the var."""
        cdef Py_ssize_t mark = self._len
        cdef int sc = _scope(scope)
        self._reserve(3)
        self._data[self._len] = A_SET_VAR
        self._data[self._len + 1] = 3
        self._data[self._len + 2] = <char>sc
        self._len += 3
        try:
            self._put_name(name)
            self._put_typed(value)
        except BaseException:
            self._len = mark
            raise

    def unset_var(self, scope, name):
        cdef Py_ssize_t mark = self._len
        cdef int sc = _scope(scope)
        self._reserve(3)
        self._data[self._len] = A_UNSET_VAR
        self._data[self._len + 1] = 2
        self._data[self._len + 2] = <char>sc
        self._len += 3
        try:
            self._put_name(name)
        except BaseException:
            self._len = mark
            raise


# -- answering NOTIFY frames (the twin's docstrings say what each does) ------------------------
# The agent's per-message loop runs here, next to the reader and writer it drives: one Python
# call per read instead of a handful of Python frames per message (issue 14).

import logging

from spoa.spop.constants import FrameType

NOOP_VAR = "noop"  # an ACK must never be empty: HAProxy 3.1.0 stalls on it (the twin says more)
cdef int NOTIFY = FrameType.NOTIFY
cdef int ACK = FrameType.ACK
cdef int TXN = 2  # Scope.TXN
cdef object _agent_log = logging.getLogger("spoa.spop.agent")
cdef object _protocol_log = logging.getLogger("spoa.spop.protocol")


cdef class NativeHandler:
    """Base of the handlers answered in C (spoa.servernode._lease_answer): the loop below
    calls their answer() directly; from Python they are called like any handler."""

    cdef int answer(self, Message message, FrameWriter out) except -1:
        raise NotImplementedError(f"{type(self).__name__} does not define answer()")

    def __call__(self, Message message not None, FrameWriter out not None):
        self.answer(message, out)


cdef struct Counts:
    # what one call adds to the agent's stats, written back once when it returns
    Py_ssize_t frames_in, notify_frames, messages, acks, unknown_messages, handler_errors, acks_truncated


cdef void add_counts(object stats, Counts *c) except *:
    if c.frames_in:
        stats.frames_in += c.frames_in
    if c.notify_frames:
        stats.notify_frames += c.notify_frames
    if c.messages:
        stats.messages += c.messages
    if c.acks:
        stats.acks += c.acks
        stats.frames_out += c.acks
    if c.unknown_messages:
        stats.unknown_messages += c.unknown_messages
    if c.handler_errors:
        stats.handler_errors += c.handler_errors
    if c.acks_truncated:
        stats.acks_truncated += c.acks_truncated


cdef int _end_ack(FrameWriter out, Py_ssize_t start, Py_ssize_t max_frame_size, object peer, Counts *c) except -1:
    if out._len - out._frame_start - PREFIX > max_frame_size:
        c.acks_truncated += 1
        _protocol_log.warning("ACK to %s exceeded max-frame-size %d: actions dropped", peer, max_frame_size)
        out._len = start
    if out._len == start:
        out.unset_var(TXN, NOOP_VAR)
    out.end_frame()
    c.acks += 1
    return 0


cdef int _write_ack(Frame frame, list messages, FrameWriter out, dict handlers, object fallback,
                    Py_ssize_t max_frame_size, object peer, Counts *c) except -1:
    cdef Py_ssize_t start, mark
    cdef Message message
    out.begin_frame(ACK, frame.stream_id, frame.frame_id)
    start = out._len
    for message in messages:
        handler = handlers.get(message.name)
        if handler is None:
            c.unknown_messages += 1
            handler = fallback
            if handler is None:
                continue
        mark = out._len
        try:
            if isinstance(handler, NativeHandler):
                (<NativeHandler>handler).answer(message, out)
            else:
                handler(message, out)
        except Exception:
            c.handler_errors += 1
            _agent_log.exception("handler for message %r failed", message.name)
            out.truncate(mark)
    return _end_ack(out, start, max_frame_size, peer, c)


def end_ack(FrameWriter out not None, Py_ssize_t start, stats, Py_ssize_t max_frame_size, peer):
    cdef Counts c
    memset(&c, 0, sizeof(c))
    try:
        _end_ack(out, start, max_frame_size, peer, &c)
    finally:
        add_counts(stats, &c)


def write_ack(Frame frame not None, list messages not None, FrameWriter out not None, dict handlers not None,
              fallback, stats, Py_ssize_t max_frame_size, peer):
    cdef Counts c
    memset(&c, 0, sizeof(c))
    try:
        _write_ack(frame, messages, out, handlers, fallback, max_frame_size, peer, &c)
    finally:
        add_counts(stats, &c)


def answer_notifies(FrameReader reader not None, FrameWriter out not None, dict handlers not None, fallback, stats,
                    Py_ssize_t max_frame_size, peer):
    cdef Counts c
    cdef Frame frame
    cdef list messages
    cdef Py_ssize_t answered = 0
    memset(&c, 0, sizeof(c))
    try:
        while True:
            frame = reader.next_frame()
            if frame is None:
                return None, answered
            c.frames_in += 1
            if frame.type != NOTIFY or not frame.flags & FLAG_FIN:
                return frame, answered
            c.notify_frames += 1
            messages = frame.messages()
            c.messages += len(messages)
            _write_ack(frame, messages, out, handlers, fallback, max_frame_size, peer, &c)
            answered += 1
    finally:
        add_counts(stats, &c)
