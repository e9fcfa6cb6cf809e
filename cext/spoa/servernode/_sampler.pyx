# cython: language_level=3, cdivision=True
"""sock_diag dump parser, compiled. Same behaviour as spoa.servernode.sampler._parse_chunk_py.

Reads the receive chunk through a C pointer. Two costs dominate the Python
parser and are cut here: reading the fields (struct.unpack_from, slicing)
and building the frozen dataclass, whose generated __init__ calls
object.__setattr__ once per field (~5 us for 16 fields on the benchmark
machine). Here the sample is allocated with PyType_GenericAlloc and each
slot is filled the way CPython's member descriptor does it for a
T_OBJECT_EX slot (incref, store at the slot's offset: the object is new, so
there is no old value). configure() reads the offsets from the class's
member descriptors and checks them; if anything looks different it falls
back to PyObject_GenericSetAttr (object.__setattr__ without the Python
call, ~1.6x slower parsing). With direct stores the sample is also taken
off the cyclic GC's lists: it holds only bytes and int. spoa.servernode.sampler calls
configure() with its TcpSample and SamplerError before using parse_chunk().

The connection key (spoa.wire.records.pack_key) is copied from the message's raw
address and port bytes: no address text is made per socket. pack_key() here
is the compiled twin of spoa.wire.records.pack_key, for the per-message SPOE path.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_SetItem
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

import errno as _errno
import os
from types import MemberDescriptorType

from spoa._netbytes cimport address_chars, load_u32, load_u64, pton_ipv4, pton_ipv6, put_v4_mapped, store_be16

from spoa.wire.records import KEY_LEN as _KEY_LEN, pack_key as _pack_key_reference

cdef extern from "Python.h":
    ctypedef struct PyTypeObject:
        Py_ssize_t tp_basicsize
    ctypedef struct PyObject:
        pass
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member
    void Py_INCREF(object o)
    void PyObject_GC_UnTrack(void *o)
    bint PyObject_IS_GC(object o)
    object PyType_GenericAlloc(PyTypeObject *t, Py_ssize_t nitems)
    int PyObject_GenericSetAttr(object o, object name, object value) except -1
    bint PyUnicode_IS_ASCII(object o)
    long PyLong_AsLongAndOverflow(object o, int *overflow) except? -1

cdef extern from "<sys/socket.h>":
    enum:
        AF_INET
        AF_INET6

cdef enum:
    NLMSG_HDRLEN = 16
    INET_DIAG_MSG_LEN = 72
    SOCK_DIAG_BY_FAMILY = 20
    NLMSG_NOOP = 1
    NLMSG_ERROR = 2
    NLMSG_DONE = 3
    NLMSG_OVERRUN = 4
    NLA_TYPE_MASK = 0x3FFF
    INET_DIAG_INFO = 2
    FULL_INFO_LEN = 160
    NO_INFO = 0x7FFFFFFF
    N_FIELDS = 13
    KEY_LEN = 36  # spoa.wire.records.KEY_LEN, checked at import
    T_OBJECT_EX = 16  # structmember.h (Py_T_OBJECT_EX in 3.12+)

# Same texts as spoa/servernode/sampler.py (the twin tests compare them).
E_TRUNC_HDR = "truncated netlink message header"
E_BAD_LEN = "netlink message length out of bounds"
E_TRUNC_ERROR = "truncated NLMSG_ERROR message"
E_OVERRUN = "netlink reported an overrun (NLMSG_OVERRUN)"
E_BAD_TYPE = "unexpected netlink message type"
E_BAD_SEQ = "unexpected netlink sequence number"
E_TRUNC_DIAG = "truncated inet_diag_msg"
E_BAD_FAMILY = "unexpected address family in inet_diag_msg"
E_BAD_ATTR = "netlink attribute length out of bounds"

FIELDS = (
    "key", "state",
    "bytes_received", "bytes_acked", "segs_in", "segs_out",
    "data_segs_in", "data_segs_out", "last_data_recv_ms", "last_data_sent_ms",
    "rtt_us", "last_ack_recv_ms", "inode",
)

cdef object _sample_cls = None
cdef object _error_cls = None
cdef tuple _names = tuple(FIELDS)
cdef Py_ssize_t _offsets[N_FIELDS]
cdef bint _direct = False
cdef bint _untrack = False
if _KEY_LEN != KEY_LEN:
    raise ImportError("spoa.wire.records.KEY_LEN is %d, _sampler.pyx was built for %d" % (_KEY_LEN, KEY_LEN))


def configure(sample_cls, error_cls, bint direct=True):
    """Set the sample class (a slots dataclass with FIELDS, in order) and the error class.

    Returns True when slots are filled directly (offsets checked), False when
    the PyObject_GenericSetAttr fallback is used (direct=False forces it).
    """
    global _sample_cls, _error_cls, _direct, _untrack
    cdef PyMemberDef *member
    if not isinstance(sample_cls, type) or tuple(getattr(sample_cls, "__slots__", ())) != FIELDS:
        raise TypeError("sample class must define __slots__ == %r" % (FIELDS,))
    for name in FIELDS:
        if type(sample_cls.__dict__.get(name)) is not MemberDescriptorType:
            raise TypeError("%s.%s is not a slot" % (sample_cls.__name__, name))
    for i, name in enumerate(FIELDS):
        if not direct:
            break
        member = (<PyMemberDescrObject *>sample_cls.__dict__[name]).d_member
        if (member == NULL or member.type != T_OBJECT_EX or member.offset < <Py_ssize_t>sizeof(PyObject)
                or member.offset + <Py_ssize_t>sizeof(void *) > (<PyTypeObject *>sample_cls).tp_basicsize):
            direct = False
            break
        _offsets[i] = member.offset
    _direct = direct
    _untrack = PyObject_IS_GC(sample_cls.__new__(sample_cls)) if direct else False
    _sample_cls = sample_cls
    _error_cls = error_cls
    return direct


cdef inline uint32_t info32(const uint8_t *info, Py_ssize_t ilen, Py_ssize_t o) noexcept nogil:
    return load_u32(info + o) if ilen >= o + 4 else 0


cdef inline uint64_t info64(const uint8_t *info, Py_ssize_t ilen, Py_ssize_t o) noexcept nogil:
    return load_u64(info + o) if ilen >= o + 8 else 0


cdef inline void put_address(uint8_t *k, int family, const uint8_t *a) noexcept nogil:
    """16 bytes of a key from an inet_diag address: IPv4 mapped, IPv6 (mapped or not) as is."""
    if family == AF_INET:
        put_v4_mapped(k, a)
    else:
        memcpy(k, a, 16)


cdef inline int setf(object o, Py_ssize_t i, object v) except -1:
    if _direct:
        Py_INCREF(v)
        (<PyObject **>((<char *><PyObject *>o) + _offsets[i]))[0] = <PyObject *>v
        return 0
    return PyObject_GenericSetAttr(o, (<tuple>_names)[i], v)


def _strerror(code):
    """os.strerror, also for values outside a C int (as spoa.servernode.sampler._strerror)."""
    try:
        return os.strerror(code)
    except (ValueError, OverflowError):
        return "Unknown error %d" % code


cdef inline object err(int code, str text):
    return _error_cls(code, text)


def parse_chunk(data, dict out, long seq=-1):
    """See spoa.servernode.sampler._parse_chunk_py: returns (end, count, min_info_len, skipped)."""
    if _sample_cls is None:
        raise RuntimeError("spoa.servernode._sampler.configure() was not called")
    cdef const uint8_t[::1] view = data
    cdef Py_ssize_t n = view.shape[0]
    cdef const uint8_t *base = &view[0] if n > 0 else NULL
    cdef const uint8_t *p
    cdef const uint8_t *m
    cdef const uint8_t *info
    cdef Py_ssize_t off = 0, nxt, a, end, ilen
    cdef uint32_t mlen, rlen, mseq
    cdef uint16_t mtype, rtype, rlen16
    cdef int32_t errval
    cdef long long code
    cdef int family
    cdef long count = 0, skipped = 0, min_info = NO_INFO
    cdef uint32_t inode, last_sent, last_recv, last_ack, rtt, segs_out, segs_in, dsegs_in, dsegs_out
    cdef uint64_t acked, received
    cdef unsigned int state
    cdef object sample, key
    cdef uint8_t *k
    cdef PyTypeObject *cls = <PyTypeObject *>_sample_cls
    while off < n:
        if n - off < NLMSG_HDRLEN:
            raise err(_errno.EBADMSG, E_TRUNC_HDR)
        p = base + off
        mlen = load_u32(p)
        memcpy(&mtype, p + 4, 2)
        mseq = load_u32(p + 8)
        if mlen < NLMSG_HDRLEN or mlen > n - off:
            raise err(_errno.EBADMSG, E_BAD_LEN)
        if seq >= 0 and mseq != <uint32_t>seq:
            raise err(_errno.EBADMSG, E_BAD_SEQ)
        nxt = off + ((mlen + 3) & ~(<Py_ssize_t>3))
        if mtype != SOCK_DIAG_BY_FAMILY:
            if mtype == NLMSG_DONE:
                if mlen >= NLMSG_HDRLEN + 4:
                    errval = <int32_t>load_u32(p + NLMSG_HDRLEN)
                    if errval < 0:
                        code = -(<long long>errval)
                        raise _error_cls(code, "sock_diag dump failed: %s" % _strerror(code))
                return (nxt if nxt < n else n, count, min_info, skipped)
            if mtype == NLMSG_ERROR:
                if mlen < NLMSG_HDRLEN + 4:
                    raise err(_errno.EBADMSG, E_TRUNC_ERROR)
                errval = <int32_t>load_u32(p + NLMSG_HDRLEN)
                if errval != 0:
                    code = -(<long long>errval) if errval < 0 else errval
                    raise _error_cls(code, "sock_diag request failed: %s" % _strerror(code))
                off = nxt
                continue
            if mtype == NLMSG_NOOP:
                off = nxt
                continue
            if mtype == NLMSG_OVERRUN:
                raise err(_errno.ENOBUFS, E_OVERRUN)
            raise err(_errno.EBADMSG, E_BAD_TYPE)
        if mlen < NLMSG_HDRLEN + INET_DIAG_MSG_LEN:
            raise err(_errno.EBADMSG, E_TRUNC_DIAG)
        m = p + NLMSG_HDRLEN
        family = m[0]
        if family != AF_INET and family != AF_INET6:
            raise err(_errno.EBADMSG, E_BAD_FAMILY)
        state = m[1]
        inode = load_u32(m + 68)
        # attributes
        a = off + NLMSG_HDRLEN + INET_DIAG_MSG_LEN
        end = off + mlen
        info = NULL
        ilen = 0
        while end - a >= 4:
            memcpy(&rlen16, base + a, 2)
            memcpy(&rtype, base + a + 2, 2)
            rlen = rlen16
            if rlen < 4 or rlen > end - a:
                raise err(_errno.EBADMSG, E_BAD_ATTR)
            if (rtype & NLA_TYPE_MASK) == INET_DIAG_INFO:
                info = base + a + 4
                ilen = rlen - 4
            a += (rlen + 3) & ~(<Py_ssize_t>3)
        if a < end:
            raise err(_errno.EBADMSG, E_BAD_ATTR)
        if info == NULL:
            skipped += 1
            off = nxt
            continue
        if ilen < min_info:
            min_info = ilen
        if ilen >= FULL_INFO_LEN:
            last_sent = load_u32(info + 44)
            last_recv = load_u32(info + 52)
            last_ack = load_u32(info + 56)
            rtt = load_u32(info + 68)
            acked = load_u64(info + 120)
            received = load_u64(info + 128)
            segs_out = load_u32(info + 136)
            segs_in = load_u32(info + 140)
            dsegs_in = load_u32(info + 152)
            dsegs_out = load_u32(info + 156)
        else:
            last_sent = info32(info, ilen, 44)
            last_recv = info32(info, ilen, 52)
            last_ack = info32(info, ilen, 56)
            rtt = info32(info, ilen, 68)
            acked = info64(info, ilen, 120)
            received = info64(info, ilen, 128)
            segs_out = info32(info, ilen, 136)
            segs_in = info32(info, ilen, 140)
            dsegs_in = info32(info, ilen, 152)
            dsegs_out = info32(info, ilen, 156)
        # HAProxy's socket: local = idiag_src/sport, remote = idiag_dst/dport
        # (ports already in network order, as in the key).
        key = PyBytes_FromStringAndSize(NULL, KEY_LEN)
        k = <uint8_t *>PyBytes_AS_STRING(key)
        put_address(k, family, m + 8)
        memcpy(k + 16, m + 4, 2)
        put_address(k + 18, family, m + 24)
        memcpy(k + 34, m + 6, 2)
        sample = PyType_GenericAlloc(cls, 0)
        setf(sample, 0, key)
        setf(sample, 1, state)
        setf(sample, 2, received)
        setf(sample, 3, acked)
        setf(sample, 4, segs_in)
        setf(sample, 5, segs_out)
        setf(sample, 6, dsegs_in)
        setf(sample, 7, dsegs_out)
        setf(sample, 8, last_recv)
        setf(sample, 9, last_sent)
        setf(sample, 10, rtt)
        setf(sample, 11, last_ack)
        setf(sample, 12, inode)
        if _untrack:
            # Only bytes and int inside: it can never be part of a reference
            # cycle, so keep it off the collector's lists (CPython does the
            # same for tuples of atoms), as N of them live until the next sample.
            PyObject_GC_UnTrack(<PyObject *>sample)
        PyDict_SetItem(out, key, sample)
        count += 1
        off = nxt
    return (-1, count, min_info, skipped)


# --- pack_key: the compiled twin of spoa.wire.records.pack_key ---------------------


cdef inline bint pack_address(object text, uint8_t *out):
    """ASCII address text -> 16 key bytes (IPv4 mapped); False when this fast path does not apply."""
    cdef const char *s
    if type(text) is not str or not PyUnicode_IS_ASCII(text):
        return False
    s = address_chars(text)
    if s is NULL:
        return False
    # The order of records._pack_address: IPv4 text first, then IPv6 (the same libc inet_pton).
    return pton_ipv4(s, out) or pton_ipv6(s, out)


cdef inline bint pack_port(object port, uint8_t *out):
    """An int 0..65535 -> 2 key bytes, big-endian; False when this fast path does not apply."""
    cdef int overflow
    cdef long v
    if type(port) is not int:
        return False
    v = PyLong_AsLongAndOverflow(port, &overflow)
    if overflow or v < 0 or v > 0xFFFF:
        return False
    store_be16(out, v)
    return True


def pack_key(local, local_port, remote, remote_port):
    """spoa.wire.records.pack_key, 5-9x faster (0.12-0.16 us): the lease module calls it once per SPOE message.

    Plain str addresses and int ports are packed here; anything else (bad
    text, a port out of range, other types) goes to spoa.wire.records.pack_key,
    which returns its result or raises its own error: one semantics.
    """
    cdef bytes key = PyBytes_FromStringAndSize(NULL, KEY_LEN)
    cdef uint8_t *k = <uint8_t *>PyBytes_AS_STRING(key)
    if (pack_address(local, k) and pack_port(local_port, k + 16)
            and pack_address(remote, k + 18) and pack_port(remote_port, k + 34)):
        return key
    return _pack_key_reference(local, local_port, remote, remote_port)
