# cython: language_level=3
"""Connection publishing packet v1, compiled. Same API and behaviour as spoa/wire/_packet_py.py.

Encoding serializes every record into one malloc'd scratch buffer through C
pointers, then cuts it into datagrams at record boundaries, each written
straight into its bytes object and signed in place. Decoding reads the
datagram through a pointer after every length check.

HMAC-SHA256 is computed here on OpenSSL's SHA256_Init/Update/Final (the
libcrypto Python's hashlib already loaded, found with dlopen(RTLD_NOLOAD)),
from inner/outer states precomputed for the last key: ~1 µs for a 1400-byte
datagram against ~2.6 µs through a Python HMAC object, whose EVP layer costs
~0.9 µs per call in OpenSSL 3. It is checked at import against RFC 4231;
without it (another libcrypto, or a mismatch) the twin's cached HMAC objects
are used. The tag is compared in constant time here. ColumnBatch decodes into numpy columns
through raw pointers (docs/publishing-packet.md §12). Error messages are never built
here: on any invalid input the compiled path calls the twin's validation
helper for that field, which raises the very same exception the twin raises.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.buffer cimport PyBUF_READ
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int8_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from spoa._netbytes cimport (address_chars, address_text, is_v4_mapped, load_be16, load_be32, load_be64,
                             pton_ipv4, pton_ipv6, store_be16, store_be32, store_be64)
from spoa.wire._record_builder cimport new_connection, new_header, new_segment

import numpy as np
from collections import OrderedDict

from spoa.wire._packet_py import (
    CONN_COLUMNS,
    CONN_SIZE as _CONN_SIZE,
    DEFAULT_MTU,
    HEADER_SIZE as _HEADER_SIZE,
    MAGIC,
    MAX_DATAGRAM as _MAX_DATAGRAM,
    MAX_INTERNED,
    MIN_MTU,
    OVERHEAD as _OVERHEAD,
    REASONS,
    SEG_COLUMNS,
    SEG_SIZE as _SEG_SIZE,
    TAG_SIZE as _TAG_SIZE,
    VERSION as _VERSION,
    PacketError,
    _addresses,
    _check_conn_id,
    _check_guard_args,
    _check_key,
    _check_mtu,
    _frontend_bytes,
    _header_fields,
    _int_field,
    _keyed,
    _record_too_big,
    _too_many_datagrams,
    max_segments,
)
from spoa.wire.records import ConnectionRecord, PacketHeader, SegmentRecord

CONN_SIZE = _CONN_SIZE
HEADER_SIZE = _HEADER_SIZE
MAX_DATAGRAM = _MAX_DATAGRAM
OVERHEAD = _OVERHEAD
SEG_SIZE = _SEG_SIZE
TAG_SIZE = _TAG_SIZE
VERSION = _VERSION

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t *size) except NULL


cdef enum:
    C_HEADER = 42         # datagram header
    C_TAG = 16            # truncated HMAC-SHA256
    C_OVERHEAD = 58       # header + tag
    C_CONN = 84           # fixed part of a connection record
    C_SEG = 42            # one segment
    C_MAX_DATAGRAM = 65507
    C_MAX_FRONTEND = 255
    C_MAX_DATAGRAMS = 65535
    C_MIN_KEY = 16
    C_VERSION = 1
    FAMILY_IPV4 = 4
    FAMILY_IPV6 = 6

cdef uint64_t U64_MAX = 0xFFFFFFFFFFFFFFFFULL
cdef const uint8_t *C_MAGIC = <const uint8_t *>b"CPUB"
assert MAGIC == b"CPUB" and (_HEADER_SIZE, _TAG_SIZE, _CONN_SIZE, _SEG_SIZE, _VERSION) == (42, 16, 84, 42, 1)


# -- integer fields: C fast path, the twin's checker on anything unusual -----------

cdef inline bint as_u64(object value, uint64_t *out):
    """True and *out set when value is an int in [0, 2^64-1]."""
    cdef int overflow
    cdef long long v
    if not isinstance(value, int):
        return False
    v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow == 0:
        if v < 0:
            return False
        out[0] = <uint64_t>v
        return True
    if overflow < 0:
        return False
    try:
        out[0] = PyLong_AsUnsignedLongLong(value)
    except OverflowError:
        return False
    return True


cdef uint64_t get_u(object value, uint64_t hi, str field, Py_ssize_t i, Py_ssize_t j) except? 0xFFFFFFFFFFFFFFFF:
    """value as an unsigned int <= hi; else the twin's _int_field raises."""
    cdef uint64_t v = 0
    if as_u64(value, &v) and v <= hi:
        return v
    return _int_field(value, 0, hi, field, i, j)  # raises, or accepts an __index__ object


cdef int get_i8(object value, str field, Py_ssize_t i, Py_ssize_t j) except -1000:
    cdef int overflow
    cdef long long v
    if isinstance(value, int):
        v = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0 and -128 <= v <= 127:
            return <int>v
    return _int_field(value, -128, 127, field, i, j)


# -- addresses ------------------------------------------------------------------------

cdef int parse_addr(object text, int family, uint8_t *out) except -1:
    """1 and the 16-byte form in out when text is an address of that family, else 0."""
    cdef const char *s = address_chars(text)
    if s is NULL:
        return 0
    if family == FAMILY_IPV4:
        return pton_ipv4(s, out)
    return pton_ipv6(s, out)


cdef int put_addresses(object src, object dst, Py_ssize_t i, uint8_t *out_src, uint8_t *out_dst) except -1:
    """Same checks, order and errors as the twin's _addresses; returns the family."""
    if not isinstance(src, str) or not isinstance(dst, str):
        _addresses(src, dst, i)  # raises the twin's TypeError/ValueError
        raise AssertionError("unreachable")
    if parse_addr(src, FAMILY_IPV4, out_src):
        if not parse_addr(dst, FAMILY_IPV4, out_dst):
            _addresses(src, dst, i)
            raise AssertionError("unreachable")
        return FAMILY_IPV4
    if parse_addr(src, FAMILY_IPV6, out_src) and parse_addr(dst, FAMILY_IPV6, out_dst):
        return FAMILY_IPV6
    _addresses(src, dst, i)
    raise AssertionError("unreachable")


# -- scratch buffer ---------------------------------------------------------------------

cdef int scratch_reserve(Scratch *s, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap = s.cap
    cdef uint8_t *data
    cdef Py_ssize_t *ends
    if s.len + extra > cap:
        while s.len + extra > cap:
            cap = cap * 2 if cap else 4096
        data = <uint8_t *>PyMem_Realloc(s.data, cap)
        if data == NULL:
            raise MemoryError()
        s.data = data
        s.cap = cap
    if s.nrec == s.rcap:
        cap = s.rcap * 2 if s.rcap else 64
        ends = <Py_ssize_t *>PyMem_Realloc(s.ends, cap * sizeof(Py_ssize_t))
        if ends == NULL:
            raise MemoryError()
        s.ends = ends
        s.rcap = cap
    return 0


cdef int put_record(Scratch *s, object rec, Py_ssize_t i, Py_ssize_t mtu) except -1:
    """Append one record; checks in the twin's order (see _encode_record)."""
    cdef uint8_t src[16]
    cdef uint8_t dst[16]
    cdef const char *fe
    cdef Py_ssize_t flen, nseg, size, j
    cdef int family
    cdef uint8_t *p
    cdef object conn_id = rec.conn_id
    cdef object frontend
    cdef object segments
    cdef tuple segs
    if not isinstance(conn_id, bytes) or PyBytes_GET_SIZE(conn_id) != 16:
        _check_conn_id(conn_id, i)
        raise AssertionError("unreachable")
    family = put_addresses(rec.src, rec.dst, i, src, dst)
    frontend = rec.frontend
    if not isinstance(frontend, str):
        _frontend_bytes(frontend, i)
        raise AssertionError("unreachable")
    try:
        fe = PyUnicode_AsUTF8AndSize(frontend, &flen)
    except UnicodeEncodeError:
        _frontend_bytes(frontend, i)
        raise AssertionError("unreachable")
    if flen > C_MAX_FRONTEND:
        _frontend_bytes(frontend, i)
        raise AssertionError("unreachable")
    segments = rec.segments
    nseg = len(segments)
    if type(segments) is tuple:
        segs = <tuple>segments
    else:
        segs = tuple(segments)
        if len(segs) != nseg:
            raise ValueError(f"connections[{i}].segments: len() gave {nseg}, iteration {len(segs)}")
    size = C_CONN + flen + nseg * C_SEG
    if size > mtu - C_OVERHEAD:
        raise _record_too_big(i, flen, nseg, mtu)
    scratch_reserve(s, size)
    p = s.data + s.len
    memcpy(p, PyBytes_AS_STRING(conn_id), 16)
    store_be64(p + 16, get_u(rec.bytes_in_total, U64_MAX, "bytes_in_total", i, -1))
    store_be64(p + 24, get_u(rec.bytes_out_total, U64_MAX, "bytes_out_total", i, -1))
    memcpy(p + 32, src, 16)
    memcpy(p + 48, dst, 16)
    store_be16(p + 64, get_u(rec.src_port, 0xFFFF, "src_port", i, -1))
    store_be16(p + 66, get_u(rec.dst_port, 0xFFFF, "dst_port", i, -1))
    store_be32(p + 68, get_u(rec.requested_lease_ms, 0xFFFFFFFF, "requested_lease_ms", i, -1))
    store_be32(p + 72, get_u(rec.predicted_lease_ms, 0xFFFFFFFF, "predicted_lease_ms", i, -1))
    p[76] = family
    p[77] = <uint8_t>get_u(rec.flags, 0xFF, "flags", i, -1)
    p[78] = <uint8_t>get_u(rec.counter_source, 0xFF, "counter_source", i, -1)
    p[79] = <uint8_t>get_u(rec.lease_source, 0xFF, "lease_source", i, -1)
    p[80] = <uint8_t><int8_t>get_i8(rec.granularity_level, "granularity_level", i, -1)
    p[81] = <uint8_t>flen
    store_be16(p + 82, nseg)
    memcpy(p + C_CONN, fe, flen)
    p += C_CONN + flen
    for j in range(nseg):
        seg = segs[j]
        p[0] = <uint8_t>get_u(seg.direction, 1, "direction", i, j)
        p[1] = <uint8_t><int8_t>get_i8(seg.level, "level", i, j)
        store_be64(p + 2, get_u(seg.start_byte_offset, U64_MAX, "start_byte_offset", i, j))
        store_be64(p + 10, get_u(seg.byte_count, U64_MAX, "byte_count", i, j))
        store_be64(p + 18, get_u(seg.bytes_transferred, U64_MAX, "bytes_transferred", i, j))
        store_be64(p + 26, get_u(seg.packets_transferred, U64_MAX, "packets_transferred", i, j))
        store_be64(p + 34, get_u(seg.timestamp_last_activity_ms, U64_MAX, "timestamp_last_activity_ms", i, j))
        p += C_SEG
    s.len += size
    s.ends[s.nrec] = s.len
    s.nrec += 1
    return 0


# -- encoding ---------------------------------------------------------------------------

def encode_packet(header, connections, key, mtu=DEFAULT_MTU):
    """Encode one logical packet as datagrams of at most `mtu` bytes each.

    Records keep their order and are packed greedily; each datagram carries
    whole records, the header (with its index and the datagram count) and its
    own HMAC. No connections gives one datagram with zero records (a
    heartbeat). ValueError/TypeError name the offending field.
    """
    cdef Scratch s
    cdef Py_ssize_t cmtu
    cdef uint64_t fields[5]
    _check_key(key)
    cmtu = _check_mtu(mtu)
    fields[0], fields[1], fields[2], fields[3], fields[4] = _header_fields(header)
    s.data = NULL
    s.ends = NULL
    s.len = s.cap = s.nrec = s.rcap = 0
    try:
        for k, rec in enumerate(connections):
            put_record(&s, rec, k, cmtu)
        return cut_datagrams(&s, 0, s.nrec, fields, key, cmtu - C_OVERHEAD)
    finally:
        PyMem_Free(s.data)
        PyMem_Free(s.ends)


cdef inline Py_ssize_t record_start(Scratch *s, Py_ssize_t k) noexcept nogil:
    """Offset of record k in s.data (records are back to back: where record k - 1 ends)."""
    return s.ends[k - 1] if k > 0 else 0


cdef list cut_datagrams(Scratch *s, Py_ssize_t a, Py_ssize_t b, uint64_t *fields, object key, Py_ssize_t limit):
    """Records [a, b) of s (each at most `limit` bytes) as signed datagrams of at most
    `limit` payload bytes each, packed greedily in order; fields: the header's node_id,
    sequence, timestamp_ms, interval_ms, flags."""
    cdef Py_ssize_t base = record_start(s, a)
    cdef Py_ssize_t k, first, start, count, index, length, payload
    cdef uint8_t *p
    cdef list out = []
    cdef bytes datagram
    # Pass 1: count the datagrams (greedy, records in order).
    count = 1
    start = base
    for k in range(a, b):
        if s.ends[k] - start > limit:
            count += 1
            start = s.ends[k - 1]
    if count > C_MAX_DATAGRAMS:
        raise _too_many_datagrams(count)
    # Pass 2: write them.
    index = 0
    first = a
    start = base
    k = a
    while True:
        while k < b and s.ends[k] - start <= limit:
            k += 1
        payload = (s.ends[k - 1] if k > first else start) - start
        length = C_HEADER + payload + C_TAG
        datagram = PyBytes_FromStringAndSize(NULL, length)
        p = <uint8_t *>PyBytes_AS_STRING(datagram)
        memcpy(p, C_MAGIC, 4)
        p[4] = C_VERSION
        p[5] = <uint8_t>fields[4]
        store_be16(p + 6, length)
        store_be64(p + 8, fields[0])
        store_be64(p + 16, fields[1])
        store_be64(p + 24, fields[2])
        store_be32(p + 32, fields[3])
        store_be16(p + 36, index)
        store_be16(p + 38, count)
        store_be16(p + 40, k - first)
        if payload:
            memcpy(p + C_HEADER, s.data + start, payload)
        # The bytes object is ours alone until returned: sign it in place.
        hmac_tag(key, p, length - C_TAG, p + length - C_TAG)
        out.append(datagram)
        index += 1
        if k >= b:
            break
        first = k
        start += payload
    return out


# -- records in wire form ---------------------------------------------------------------

cdef class RecordBatch:
    """Connection records in their wire form, in order (the twin's docstring says what for).
    The compiled tracker writes records straight into its scratch (reserve, then commit)."""

    def __cinit__(self):
        self.s.data = NULL
        self.s.ends = NULL
        self.s.len = self.s.cap = self.s.nrec = self.s.rcap = 0

    def __dealloc__(self):
        PyMem_Free(self.s.data)
        PyMem_Free(self.s.ends)

    @classmethod
    def from_records(cls, records):
        cdef RecordBatch batch = RecordBatch.__new__(RecordBatch)
        batch.add_records(records)
        return batch

    def add_records(self, records):
        """Append records; on an invalid one (TypeError/ValueError naming it by its index in the
        batch, connections[i]) none of them is added."""
        cdef Py_ssize_t length = self.s.len, nrec = self.s.nrec
        try:
            for rec in records:
                put_record(&self.s, rec, self.s.nrec, C_MAX_DATAGRAM)
        except BaseException:
            self.s.len, self.s.nrec = length, nrec
            raise

    cdef uint8_t *reserve(self, Py_ssize_t size) except NULL:
        scratch_reserve(&self.s, size)
        return self.s.data + self.s.len

    cdef void commit(self, Py_ssize_t size) noexcept:
        self.s.len += size
        self.s.ends[self.s.nrec] = self.s.len
        self.s.nrec += 1

    def __len__(self):
        return self.s.nrec

    def conn_ids(self):
        """The records' 16-byte connection ids, back to back (what routing hashes)."""
        cdef bytes out = PyBytes_FromStringAndSize(NULL, 16 * self.s.nrec)
        cdef uint8_t *p = <uint8_t *>PyBytes_AS_STRING(out)
        cdef Py_ssize_t k
        for k in range(self.s.nrec):
            memcpy(p + 16 * k, self.s.data + record_start(&self.s, k), 16)
        return out

    def take(self, indices):
        """A new batch of the records at `indices` (ints, e.g. a numpy array), in that order."""
        cdef RecordBatch out = RecordBatch.__new__(RecordBatch)
        cdef Py_ssize_t i, begin, size, n = self.s.nrec
        for index in indices:
            i = index
            if i < 0:
                i += n
            if not 0 <= i < n:
                raise IndexError("list index out of range")
            begin = record_start(&self.s, i)
            size = self.s.ends[i] - begin
            memcpy(out.reserve(size), self.s.data + begin, size)
            out.commit(size)
        return out


def encode_batch(header, batch, key, mtu=DEFAULT_MTU, start=0, stop=None):
    """encode_packet for records already encoded: batch's records [start:stop] (slice
    semantics) as one packet's datagrams. ValueError names a record too big for the mtu by
    its index in the batch."""
    cdef Py_ssize_t cmtu, limit, a, b, k, begin
    cdef uint64_t fields[5]
    cdef const uint8_t *p
    cdef RecordBatch records
    _check_key(key)
    cmtu = _check_mtu(mtu)
    fields[0], fields[1], fields[2], fields[3], fields[4] = _header_fields(header)
    if not isinstance(batch, RecordBatch):
        raise TypeError(f"batch must be a RecordBatch, not {type(batch).__name__}")
    records = batch
    a, b, _ = slice(start, stop).indices(records.s.nrec)
    b = max(a, b)
    limit = cmtu - C_OVERHEAD
    for k in range(a, b):
        begin = record_start(&records.s, k)
        if records.s.ends[k] - begin > limit:
            p = records.s.data + begin
            raise _record_too_big(k, p[81], load_be16(p + 82), cmtu)
    return cut_datagrams(&records.s, a, b, fields, key, limit)


# -- decoding ---------------------------------------------------------------------------

cdef inline malformed(str detail):
    return PacketError("malformed", detail)


# -- HMAC-SHA256 -----------------------------------------------------------------------

cdef extern from "<dlfcn.h>":
    void *dlopen(const char *filename, int flag)
    void *dlsym(void *handle, const char *symbol)
    int RTLD_NOW
    int RTLD_NOLOAD

ctypedef int (*sha_init_f)(void *ctx) noexcept nogil
ctypedef int (*sha_update_f)(void *ctx, const void *data, size_t n) noexcept nogil
ctypedef int (*sha_final_f)(unsigned char *md, void *ctx) noexcept nogil

cdef enum:
    CTX_BYTES = 256  # room for a SHA256_CTX (112 bytes in OpenSSL 1.1 and 3.x)
    SHA_BLOCK = 64
    SHA_DIGEST = 32

cdef sha_init_f sha_init = NULL
cdef sha_update_f sha_update = NULL
cdef sha_final_f sha_final = NULL
cdef uint8_t key_inner[CTX_BYTES]  # SHA-256 state after (last_key xor ipad)
cdef uint8_t key_outer[CTX_BYTES]  # SHA-256 state after (last_key xor opad)
cdef object last_key = None  # the key those states (or last_mac) belong to: a
cdef object last_mac = None  # receiver verifies everything with one key


cdef void absorb_key(const uint8_t *key, Py_ssize_t n) noexcept:
    """key_inner/key_outer for `key` (RFC 2104: a key longer than a block is hashed first)."""
    cdef uint8_t block[SHA_BLOCK]
    cdef uint8_t pad[SHA_BLOCK]
    cdef uint8_t ctx[CTX_BYTES]
    cdef int i
    memset(block, 0, SHA_BLOCK)
    if n > SHA_BLOCK:
        sha_init(ctx)
        sha_update(ctx, key, n)
        sha_final(block, ctx)
    else:
        memcpy(block, key, n)
    for i in range(SHA_BLOCK):
        pad[i] = block[i] ^ 0x36
    sha_init(key_inner)
    sha_update(key_inner, pad, SHA_BLOCK)
    for i in range(SHA_BLOCK):
        pad[i] = block[i] ^ 0x5C
    sha_init(key_outer)
    sha_update(key_outer, pad, SHA_BLOCK)


cdef void sha_hmac(const uint8_t *data, Py_ssize_t n, uint8_t *out) noexcept nogil:
    """HMAC-SHA256 of data under the absorbed key, 32 bytes into out."""
    cdef uint8_t ctx[CTX_BYTES]
    cdef uint8_t inner[SHA_DIGEST]
    memcpy(ctx, key_inner, CTX_BYTES)
    sha_update(ctx, data, n)
    sha_final(inner, ctx)
    memcpy(ctx, key_outer, CTX_BYTES)
    sha_update(ctx, inner, SHA_DIGEST)
    sha_final(out, ctx)


cdef int hmac_tag(object key, const uint8_t *data, Py_ssize_t n, uint8_t *out) except -1:
    """The C_TAG-byte tag of data into out; key already checked by _check_key."""
    global last_key, last_mac
    cdef bytes tag
    cdef uint8_t full[SHA_DIGEST]
    if type(key) is not bytes:  # a bytearray could change under the cache
        key = bytes(key)
    if key is not last_key:
        if sha_init is not NULL:
            absorb_key(<const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
        else:
            last_mac = _keyed(key)
        last_key = key
    if sha_init is not NULL:
        sha_hmac(data, n, full)
        memcpy(out, full, C_TAG)
        return 0
    mac = last_mac.copy()
    mac.update(PyMemoryView_FromMemory(<char *>data, n, PyBUF_READ))
    tag = mac.digest()
    memcpy(out, PyBytes_AS_STRING(tag), C_TAG)
    return 0


def _use_libcrypto(bint on):
    """Compute HMACs with libcrypto's SHA-256 primitives (True: if found and
    correct) or through the twin's HMAC objects (False). Returns whether the
    primitives are in use. Tests drive both paths; import calls it with True."""
    global sha_init, sha_update, sha_final, last_key
    cdef void *lib = NULL
    cdef uint8_t out[SHA_DIGEST]
    sha_init, sha_update, sha_final, last_key = NULL, NULL, NULL, None
    if not on:
        return False
    import _hashlib  # noqa: F401  (loads the libcrypto Python itself uses)
    for name in (b"libcrypto.so.3", b"libcrypto.so.1.1"):
        lib = dlopen(name, RTLD_NOW | RTLD_NOLOAD)
        if lib is not NULL:
            break
    if lib is NULL:
        return False
    sha_init = <sha_init_f>dlsym(lib, "SHA256_Init")
    sha_update = <sha_update_f>dlsym(lib, "SHA256_Update")
    sha_final = <sha_final_f>dlsym(lib, "SHA256_Final")
    if sha_init is NULL or sha_update is NULL or sha_final is NULL:
        sha_init = NULL
        return False
    # RFC 4231 test case 2: wrong primitives must never sign a packet.
    absorb_key(<const uint8_t *>b"Jefe", 4)
    sha_hmac(<const uint8_t *>b"what do ya want for nothing?", 28, out)
    if PyBytes_FromStringAndSize(<char *>out, SHA_DIGEST) != bytes.fromhex(
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"):
        sha_init = NULL
        return False
    return True


USES_LIBCRYPTO = _use_libcrypto(True)


cdef inline bint same_tag(const uint8_t *a, const uint8_t *b) noexcept nogil:
    """Constant-time comparison of two C_TAG-byte tags (as hmac.compare_digest)."""
    cdef uint8_t diff = 0
    cdef int k
    for k in range(C_TAG):
        diff |= a[k] ^ b[k]
    return diff == 0


cdef bytes as_datagram(object data, object key):
    """data as bytes (a bytes-like copied once); a bad key fails first, as in the twin."""
    if isinstance(data, bytes):
        return data
    if not (isinstance(key, bytes) and PyBytes_GET_SIZE(key) >= C_MIN_KEY):
        _check_key(key)
    return bytes(data)


cdef object verify(bytes data, object key, uint16_t *index, uint16_t *count, Py_ssize_t *nrec):
    """Checks 1-8 of docs/publishing-packet.md §9, up to and including the HMAC;
    the header, and index, count and record count through the pointers."""
    cdef const uint8_t *p
    cdef Py_ssize_t n, end
    cdef uint16_t length
    cdef uint8_t tag[C_TAG]
    if not (isinstance(key, bytes) and PyBytes_GET_SIZE(key) >= C_MIN_KEY):
        _check_key(key)
    n = PyBytes_GET_SIZE(data)
    p = <const uint8_t *>PyBytes_AS_STRING(data)
    if n > C_MAX_DATAGRAM:
        raise PacketError("oversized", f"{n} bytes; a UDP datagram carries at most {C_MAX_DATAGRAM}")
    if n < 5:
        raise PacketError("truncated", f"{n} bytes; too short for magic and version")
    if memcmp(p, C_MAGIC, 4) != 0:
        raise PacketError("bad_magic", f"magic {data[:4].hex()}, expected {MAGIC.hex()}")
    if p[4] != C_VERSION:
        raise PacketError("bad_version", f"version {p[4]}, this decoder reads {C_VERSION}")
    if n < C_OVERHEAD:
        raise PacketError("truncated", f"{n} bytes; a version {C_VERSION} datagram has at least {C_OVERHEAD}")
    length = load_be16(p + 6)
    if length > n:
        raise PacketError("truncated", f"{n} bytes; the header announces {length}")
    if length < n:
        raise malformed(f"{n} bytes; the header announces {length}")
    end = n - C_TAG
    hmac_tag(key, p, end, tag)
    if not same_tag(tag, p + end):
        raise PacketError("bad_hmac", "HMAC-SHA256 mismatch: wrong key or altered datagram")
    index[0] = load_be16(p + 36)
    count[0] = load_be16(p + 38)
    nrec[0] = load_be16(p + 40)
    if index[0] >= count[0]:
        raise malformed(f"datagram index {index[0]} not below count {count[0]}")
    return new_header(load_be64(p + 8), load_be64(p + 16), load_be64(p + 24), load_be32(p + 32), p[5])


cdef int check_record(const uint8_t *r, Py_ssize_t left, Py_ssize_t i, Py_ssize_t nrec) except -1:
    """Check 9 for record i at r (left: bytes before the HMAC) up to its frontend name."""
    cdef uint8_t family
    cdef Py_ssize_t flen, nseg
    if left < C_CONN:
        raise malformed(f"record {i} of {nrec} runs past the end")
    family = r[76]
    flen = r[81]
    nseg = load_be16(r + 82)
    if left - C_CONN < flen + nseg * C_SEG:
        raise malformed(f"record {i} of {nrec}: its {flen}-byte frontend name and {nseg} segments run past the end")
    if family == FAMILY_IPV4:
        if not is_v4_mapped(r + 32) or not is_v4_mapped(r + 48):
            raise malformed(f"record {i}: IPv4 address outside ::ffff:0:0/96")
    elif family != FAMILY_IPV6:
        raise malformed(f"record {i}: address family {family}, expected 4 or 6")
    return 0


cdef str frontend_text(const uint8_t *name, Py_ssize_t flen, Py_ssize_t i):
    try:
        return PyUnicode_DecodeUTF8(<const char *>name, flen, NULL)
    except UnicodeDecodeError:
        raise malformed(f"record {i}: frontend name is not valid UTF-8") from None


def decode_datagram(data, key):
    """(header, datagram index, datagram count, records) of one datagram.

    Checks, in this order: size, magic, version, length field, HMAC (before any
    record is parsed), then every record's bounds and values. Any defect raises
    PacketError with its reason; no other exception escapes for any bytes.
    """
    cdef const uint8_t *p
    cdef const uint8_t *r
    cdef const uint8_t *sp
    cdef Py_ssize_t end, pos, i, j, nrec, flen, nseg
    cdef Py_ssize_t prev_fe = -1, prev_flen = -1
    cdef Py_ssize_t prev_dst = -1
    cdef uint16_t index, count
    cdef uint8_t family, prev_family = 0, direction
    cdef list records = []
    cdef list segments
    cdef str frontend = None, dst_text = None, src_text
    data = as_datagram(data, key)
    header = verify(data, key, &index, &count, &nrec)
    p = <const uint8_t *>PyBytes_AS_STRING(data)
    end = PyBytes_GET_SIZE(data) - C_TAG
    pos = C_HEADER
    for i in range(nrec):
        r = p + pos
        check_record(r, end - pos, i, nrec)
        family = r[76]
        flen = r[81]
        nseg = load_be16(r + 82)
        src_text = address_text(r + 32, family == FAMILY_IPV4)
        # Records of one datagram mostly share the frontend address and name.
        if prev_dst < 0 or family != prev_family or memcmp(r + 48, p + prev_dst, 16) != 0:
            dst_text = address_text(r + 48, family == FAMILY_IPV4)
            prev_family = family
        prev_dst = pos + 48
        pos += C_CONN
        if flen != prev_flen or memcmp(p + pos, p + prev_fe, flen) != 0:
            frontend = frontend_text(p + pos, flen, i)
            prev_fe = pos
            prev_flen = flen
        pos += flen
        segments = []
        for j in range(nseg):
            sp = p + pos
            direction = sp[0]
            if direction > 1:
                raise malformed(f"record {i} segment {j}: direction {direction}, expected 0 or 1")
            segments.append(new_segment(direction, load_be64(sp + 2), load_be64(sp + 10), load_be64(sp + 18), load_be64(sp + 26),
                                        load_be64(sp + 34), <int8_t>sp[1]))
            pos += C_SEG
        records.append(new_connection((
            PyBytes_FromStringAndSize(<const char *>r, 16), src_text, load_be16(r + 64), dst_text, load_be16(r + 66),
            frontend, r[77], r[78], <int8_t>r[80], load_be32(r + 68), load_be32(r + 72), r[79], load_be64(r + 16), load_be64(r + 24),
            tuple(segments))))
    if pos != end:
        raise malformed(f"{end - pos} bytes after the last of {nrec} records")
    return header, index, count, records


# -- columnar decoding -----------------------------------------------------------------------

assert tuple(name for name, _ in CONN_COLUMNS)[K_FRONTEND] == "frontend" and len(CONN_COLUMNS) == N_CONN_COLUMNS
assert tuple(name for name, _ in SEG_COLUMNS)[S_LAST_ACTIVITY] == "timestamp_last_activity_ms"
assert len(SEG_COLUMNS) == N_SEG_COLUMNS


cdef uint8_t *data_of(object array):
    """Address of a C-contiguous numpy array's first byte (it has at least one)."""
    cdef uint8_t[::1] view = array.reshape(-1).view(np.uint8)
    return &view[0]


cdef list grown(list arrays, tuple columns, Py_ssize_t rows):
    """Copies of the arrays with `rows` rows (rows written past n/nseg by an
    append in progress are kept too)."""
    out = []
    for old, (_, dtype) in zip(arrays, columns):
        new = np.empty(rows, dtype)
        new[:len(old)] = old
        out.append(new)
    return out


cdef inline void put8(uint8_t *column, Py_ssize_t k, uint8_t v) noexcept nogil:
    column[k] = v

cdef inline void put16(uint8_t *column, Py_ssize_t k, uint16_t v) noexcept nogil:
    (<uint16_t *>column)[k] = v

cdef inline void put32(uint8_t *column, Py_ssize_t k, uint32_t v) noexcept nogil:
    (<uint32_t *>column)[k] = v

cdef inline void put64(uint8_t *column, Py_ssize_t k, uint64_t v) noexcept nogil:
    (<uint64_t *>column)[k] = v


cdef class ColumnBatch:
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

    def __init__(self):
        self.frontends = []
        self._names = {}
        self.cap = self.seg_cap = 0
        self._conn_arrays = [np.empty(0, dtype) for _, dtype in CONN_COLUMNS]
        self._seg_arrays = [np.empty(0, dtype) for _, dtype in SEG_COLUMNS]
        self._seg_start_array = np.zeros(1, np.int64)
        self.reserve(64, 128)
        self.clear()

    def clear(self):
        """Forget every record (frontend names stay interned)."""
        self.n = self.nseg = self.datagrams = 0
        self.has_last = False
        if len(self.frontends) > MAX_INTERNED:
            self.frontends = []
            self._names = {}

    cdef int reserve(self, Py_ssize_t records, Py_ssize_t segments) except -1:
        """Room for that many more records and segments."""
        cdef Py_ssize_t k, rows
        if self.n + records > self.cap:
            rows = max(2 * self.cap, self.n + records)
            self._conn_arrays = grown(self._conn_arrays, CONN_COLUMNS, rows)
            starts = np.empty(rows + 1, np.int64)
            starts[:self.cap + 1] = self._seg_start_array
            self._seg_start_array = starts
            for k in range(N_CONN_COLUMNS):
                self.conn[k] = data_of(self._conn_arrays[k])
            self.seg_start = <int64_t *>data_of(starts)
            self.cap = rows
        if self.nseg + segments > self.seg_cap:
            rows = max(2 * self.seg_cap, self.nseg + segments)
            self._seg_arrays = grown(self._seg_arrays, SEG_COLUMNS, rows)
            for k in range(N_SEG_COLUMNS):
                self.seg[k] = data_of(self._seg_arrays[k])
            self.seg_cap = rows
        return 0

    def append_datagram(self, data, key):
        """Verify one datagram and append its records: (header, datagram index, datagram count)."""
        cdef const uint8_t *p
        cdef const uint8_t *r
        cdef const uint8_t *sp
        cdef const uint8_t *prev_name = NULL
        cdef Py_ssize_t end, pos, i, j, nrec, flen, nseg, k, m
        cdef Py_ssize_t prev_flen = -1
        cdef uint32_t frontend = 0
        cdef uint16_t index, count
        cdef uint64_t node_id
        cdef uint8_t **c = self.conn
        cdef uint8_t **s = self.seg
        data = as_datagram(data, key)
        header = verify(data, key, &index, &count, &nrec)
        p = <const uint8_t *>PyBytes_AS_STRING(data)
        end = PyBytes_GET_SIZE(data) - C_TAG
        node_id = load_be64(p + 8)
        self.reserve(min(nrec, (end - C_HEADER) // C_CONN), 0)  # a record takes C_CONN bytes at least
        k = self.n
        m = self.nseg
        pos = C_HEADER
        for i in range(nrec):
            r = p + pos
            check_record(r, end - pos, i, nrec)
            flen = r[81]
            nseg = load_be16(r + 82)
            pos += C_CONN
            # Records of one datagram mostly share their frontend name.
            if flen != prev_flen or memcmp(p + pos, prev_name, flen) != 0:
                frontend = <uint32_t>self.intern(p + pos, flen, i)
                prev_name = p + pos
                prev_flen = flen
            pos += flen
            self.reserve(0, m + nseg - self.nseg)
            s = self.seg
            for j in range(nseg):
                sp = p + pos
                if sp[0] > 1:
                    raise malformed(f"record {i} segment {j}: direction {sp[0]}, expected 0 or 1")
                put8(s[S_DIRECTION], m, sp[0])
                put8(s[S_LEVEL], m, sp[1])
                put64(s[S_START], m, load_be64(sp + 2))
                put64(s[S_BYTE_COUNT], m, load_be64(sp + 10))
                put64(s[S_TRANSFERRED], m, load_be64(sp + 18))
                put64(s[S_PACKETS], m, load_be64(sp + 26))
                put64(s[S_LAST_ACTIVITY], m, load_be64(sp + 34))
                m += 1
                pos += C_SEG
            put64(c[K_NODE_ID], k, node_id)
            memcpy(c[K_CONN_ID] + 16 * k, r, 16)
            put64(c[K_BYTES_IN], k, load_be64(r + 16))
            put64(c[K_BYTES_OUT], k, load_be64(r + 24))
            memcpy(c[K_SRC] + 16 * k, r + 32, 16)
            memcpy(c[K_DST] + 16 * k, r + 48, 16)
            put16(c[K_SRC_PORT], k, load_be16(r + 64))
            put16(c[K_DST_PORT], k, load_be16(r + 66))
            put32(c[K_REQUESTED], k, load_be32(r + 68))
            put32(c[K_PREDICTED], k, load_be32(r + 72))
            put8(c[K_FAMILY], k, r[76])
            put8(c[K_FLAGS], k, r[77])
            put8(c[K_COUNTER_SOURCE], k, r[78])
            put8(c[K_LEASE_SOURCE], k, r[79])
            put8(c[K_LEVEL], k, r[80])
            put32(c[K_FRONTEND], k, frontend)
            k += 1
            self.seg_start[k] = m
        if pos != end:
            raise malformed(f"{end - pos} bytes after the last of {nrec} records")
        self.last_n = self.n
        self.last_nseg = self.nseg
        self.has_last = True
        self.n = k
        self.nseg = m
        self.datagrams += 1
        return header, index, count

    cdef long long intern(self, const uint8_t *name, Py_ssize_t flen, Py_ssize_t i) except -1:
        raw = PyBytes_FromStringAndSize(<const char *>name, flen)
        index = self._names.get(raw)
        if index is None:
            text = frontend_text(name, flen, i)
            index = self._names[raw] = len(self.frontends)
            self.frontends.append(text)
        return index

    def drop_last(self):
        """Take back the last appended datagram (a replayed one); once only."""
        if not self.has_last:
            raise ValueError("no datagram to drop")
        self.n = self.last_n
        self.nseg = self.last_nseg
        self.datagrams -= 1
        self.has_last = False

    def __getattr__(self, str name):
        cdef Py_ssize_t k
        if name == "seg_start":
            view = self._seg_start_array[:self.n + 1]
        else:
            for k, (column, _) in enumerate(CONN_COLUMNS):
                if column == name:
                    view = self._conn_arrays[k][:self.n]
                    break
            else:
                for k, (column, _) in enumerate(SEG_COLUMNS):
                    if column == name:
                        view = self._seg_arrays[k][:self.nseg]
                        break
                else:
                    raise AttributeError(f"ColumnBatch has no column {name!r}")
        view.flags.writeable = False
        return view


# -- replay detection ---------------------------------------------------------------------

cdef class _NodeWindow:
    pass


cdef class ReplayGuard:
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

    def __init__(self, window=64, max_nodes=4096):
        self.window, self.max_nodes = _check_guard_args(window, max_nodes)
        self.evictions = 0
        self._nodes = OrderedDict()

    def __len__(self):
        return len(self._nodes)

    def __contains__(self, node_id):
        return node_id in self._nodes

    def check(self, header, index):
        """Record the datagram as seen, or raise PacketError("replayed")."""
        cdef uint64_t node = get_u(header.node_id, U64_MAX, "header.node_id", -1, -1)
        cdef uint64_t seq = get_u(header.sequence, U64_MAX, "header.sequence", -1, -1)
        cdef uint64_t idx = get_u(index, C_MAX_DATAGRAMS - 1, "index", -1, -1)
        cdef uint64_t behind
        cdef _NodeWindow state
        cdef object bit = 1
        cdef object mask
        cdef object node_key = node
        cdef object seq_key = seq
        cdef dict seen
        bit <<= idx
        nodes = self._nodes
        state = nodes.get(node_key)
        if state is None:
            if len(nodes) >= self.max_nodes:
                nodes.popitem(last=False)
                self.evictions += 1
            state = _NodeWindow.__new__(_NodeWindow)
            state.highest = seq
            state.seen = {seq_key: bit}
            nodes[node_key] = state
            return
        seen = state.seen
        if seq > state.highest:
            state.highest = seq
            for old in [s for s in seen if seq - <uint64_t>s >= <uint64_t>self.window]:
                del seen[old]
            seen[seq_key] = bit
        else:
            behind = state.highest - seq
            if behind >= <uint64_t>self.window:
                raise PacketError(
                    "replayed",
                    f"node {node} sequence {seq} is {behind} behind {state.highest}, outside the {self.window}-sequence window",
                )
            mask = seen.get(seq_key, 0)
            if mask & bit:
                raise PacketError("replayed", f"node {node} sequence {seq} datagram {idx} was accepted already")
            seen[seq_key] = mask | bit
        nodes.move_to_end(node_key)


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
    "ReplayGuard",
    "decode_datagram",
    "encode_packet",
    "max_segments",
]
