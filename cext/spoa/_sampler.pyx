# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""sock_diag dump parser, compiled. Same behaviour as spoa.sampler._parse_chunk_py.

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
off the cyclic GC's lists: it holds only str and int. spoa.sampler calls
configure() with its TcpSample and SamplerError before using parse_chunk().
"""

from cpython.dict cimport PyDict_SetItem
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, strlen

import errno as _errno
import os
from types import MemberDescriptorType

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
    object PyUnicode_DecodeASCII(const char *s, Py_ssize_t size, const char *errors)

cdef extern from "<arpa/inet.h>":
    const char *inet_ntop(int af, const void *src, char *dst, unsigned int size)

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
    N_FIELDS = 16
    T_OBJECT_EX = 16  # structmember.h (Py_T_OBJECT_EX in 3.12+)

# Same texts as spoa/sampler.py (the twin tests compare them).
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
    "local", "local_port", "remote", "remote_port", "state",
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
cdef bytes _V4MAPPED = b"\0" * 10 + b"\xff\xff"


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


cdef inline uint32_t rd32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline uint64_t rd64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


cdef inline uint32_t info32(const uint8_t *info, Py_ssize_t ilen, Py_ssize_t o) noexcept nogil:
    return rd32(info + o) if ilen >= o + 4 else 0


cdef inline uint64_t info64(const uint8_t *info, Py_ssize_t ilen, Py_ssize_t o) noexcept nogil:
    return rd64(info + o) if ilen >= o + 8 else 0


cdef inline int put_u8(char *d, unsigned int v) noexcept nogil:
    if v >= 100:
        d[0] = <char>(48 + v // 100)
        d[1] = <char>(48 + (v // 10) % 10)
        d[2] = <char>(48 + v % 10)
        return 3
    if v >= 10:
        d[0] = <char>(48 + v // 10)
        d[1] = <char>(48 + v % 10)
        return 2
    d[0] = <char>(48 + v)
    return 1


cdef object ipv4_text(const uint8_t *a):
    cdef char buf[16]
    cdef int n = put_u8(buf, a[0])
    buf[n] = 46
    n += 1
    n += put_u8(buf + n, a[1])
    buf[n] = 46
    n += 1
    n += put_u8(buf + n, a[2])
    buf[n] = 46
    n += 1
    n += put_u8(buf + n, a[3])
    return PyUnicode_DecodeASCII(buf, n, NULL)


cdef object addr_text(int family, const uint8_t *a):
    cdef char buf[64]
    if family == AF_INET:
        return ipv4_text(a)
    if memcmp(a, <const char *>_V4MAPPED, 12) == 0:
        return ipv4_text(a + 12)
    if inet_ntop(AF_INET6, a, buf, sizeof(buf)) == NULL:  # cannot fail for AF_INET6 with 64 bytes
        raise _error_cls(_errno.EINVAL, "inet_ntop failed")
    return PyUnicode_DecodeASCII(buf, strlen(buf), NULL)


cdef inline int setf(object o, Py_ssize_t i, object v) except -1:
    if _direct:
        Py_INCREF(v)
        (<PyObject **>((<char *><PyObject *>o) + _offsets[i]))[0] = <PyObject *>v
        return 0
    return PyObject_GenericSetAttr(o, (<tuple>_names)[i], v)


def _strerror(code):
    """os.strerror, also for values outside a C int (as spoa.sampler._strerror)."""
    try:
        return os.strerror(code)
    except (ValueError, OverflowError):
        return "Unknown error %d" % code


cdef inline object err(int code, str text):
    return _error_cls(code, text)


def parse_chunk(data, dict out, long seq=-1):
    """See spoa.sampler._parse_chunk_py: returns (end, count, min_info_len, skipped)."""
    if _sample_cls is None:
        raise RuntimeError("spoa._sampler.configure() was not called")
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
    cdef unsigned int sport, dport, state
    cdef object local, remote, sample, key
    cdef object last_local = None
    cdef uint8_t last_local_raw[17]
    cdef PyTypeObject *cls = <PyTypeObject *>_sample_cls
    while off < n:
        if n - off < NLMSG_HDRLEN:
            raise err(_errno.EBADMSG, E_TRUNC_HDR)
        p = base + off
        mlen = rd32(p)
        memcpy(&mtype, p + 4, 2)
        mseq = rd32(p + 8)
        if mlen < NLMSG_HDRLEN or mlen > n - off:
            raise err(_errno.EBADMSG, E_BAD_LEN)
        if seq >= 0 and mseq != <uint32_t>seq:
            raise err(_errno.EBADMSG, E_BAD_SEQ)
        nxt = off + ((mlen + 3) & ~(<Py_ssize_t>3))
        if mtype != SOCK_DIAG_BY_FAMILY:
            if mtype == NLMSG_DONE:
                if mlen >= NLMSG_HDRLEN + 4:
                    errval = <int32_t>rd32(p + NLMSG_HDRLEN)
                    if errval < 0:
                        code = -(<long long>errval)
                        raise _error_cls(code, "sock_diag dump failed: %s" % _strerror(code))
                return (nxt if nxt < n else n, count, min_info, skipped)
            if mtype == NLMSG_ERROR:
                if mlen < NLMSG_HDRLEN + 4:
                    raise err(_errno.EBADMSG, E_TRUNC_ERROR)
                errval = <int32_t>rd32(p + NLMSG_HDRLEN)
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
        sport = (<unsigned int>m[4] << 8) | m[5]
        dport = (<unsigned int>m[6] << 8) | m[7]
        inode = rd32(m + 68)
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
            last_sent = rd32(info + 44)
            last_recv = rd32(info + 52)
            last_ack = rd32(info + 56)
            rtt = rd32(info + 68)
            acked = rd64(info + 120)
            received = rd64(info + 128)
            segs_out = rd32(info + 136)
            segs_in = rd32(info + 140)
            dsegs_in = rd32(info + 152)
            dsegs_out = rd32(info + 156)
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
        # The local address is usually the same from one socket to the next.
        if last_local is not None and last_local_raw[0] == family and memcmp(last_local_raw + 1, m + 8, 16) == 0:
            local = last_local
        else:
            local = addr_text(family, m + 8)
            last_local = local
            last_local_raw[0] = <uint8_t>family
            memcpy(last_local_raw + 1, m + 8, 16)
        remote = addr_text(family, m + 24)
        sample = PyType_GenericAlloc(cls, 0)
        setf(sample, 0, local)
        setf(sample, 1, sport)
        setf(sample, 2, remote)
        setf(sample, 3, dport)
        setf(sample, 4, state)
        setf(sample, 5, received)
        setf(sample, 6, acked)
        setf(sample, 7, segs_in)
        setf(sample, 8, segs_out)
        setf(sample, 9, dsegs_in)
        setf(sample, 10, dsegs_out)
        setf(sample, 11, last_recv)
        setf(sample, 12, last_sent)
        setf(sample, 13, rtt)
        setf(sample, 14, last_ack)
        setf(sample, 15, inode)
        if _untrack:
            # Only str and int inside: it can never be part of a reference
            # cycle, so keep it off the collector's lists (CPython does the
            # same for tuples of atoms), as N of them live until the next sample.
            PyObject_GC_UnTrack(<PyObject *>sample)
        key = (local, sport, remote, dport)
        PyDict_SetItem(out, key, sample)
        count += 1
        off = nxt
    return (-1, count, min_info, skipped)
