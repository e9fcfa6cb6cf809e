# cython: language_level=3
"""The lease answer, compiled. Same API and behaviour as spoa/servernode/_lease_answer_py.py.

The agent's message loop (spoa.spop._codec._write_ack) calls answer() in C for
every lease-* message. A canonical message (HAProxy's uuid cid, typed
addresses, integer ports: every message of haproxy/spoe-lease.conf) is read in
place, registered in the tracker's slab and answered from its hint state
without a Python object per message; any other message takes the twin's path
(lease_message.identity() and the tracker's register()), so both give the same
answer for every message.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

from spoa.servernode._tracker cimport HintState, SegmentTracker
from spoa.spop._codec cimport (
    T_INT32,
    T_INT64,
    T_IPV4,
    T_IPV6,
    T_NULL,
    T_STRING,
    T_UINT32,
    T_UINT64,
    ArgView,
    FrameWriter,
    Message,
    NativeHandler,
    find_args,
)

from spoa.servernode.lease_message import (
    IDENTITY_ARGS,
    LEASE_SOURCE_NAMES,
    MAX_ENCODED_ANSWERS,
    encode_answer,
    identity,
)
from spoa.wire.records import V4_MAPPED, LeaseSource

cdef enum:
    # IDENTITY_ARGS, in its order
    ARG_CID, ARG_SRC, ARG_SRC_PORT, ARG_DST, ARG_DST_PORT, ARG_FRONTEND, N_ARGS
    KEY_LEN = 36        # records.pack_key: dst (16) + dst port (2) + src (16) + src port (2)
    DASH = 45           # "-"

cdef int STANDARD = LeaseSource.STANDARD
cdef int PREDICTED = LeaseSource.PREDICTED
cdef int FALLBACK = LeaseSource.FALLBACK

assert IDENTITY_ARGS == ("cid", "src", "src_port", "dst", "dst_port", "frontend"), IDENTITY_ARGS
cdef tuple _ARG_BYTES = tuple(name.encode() for name in IDENTITY_ARGS)  # keeps ARG_NAMES' bytes alive
cdef const char *ARG_NAMES[N_ARGS]
cdef Py_ssize_t ARG_SIZES[N_ARGS]
for _i in range(N_ARGS):
    ARG_NAMES[_i] = PyBytes_AS_STRING(_ARG_BYTES[_i])
    ARG_SIZES[_i] = PyBytes_GET_SIZE(_ARG_BYTES[_i])
cdef bytes _V4_MAPPED = V4_MAPPED
# set-var(txn.seq) up to its value: action SET_VAR, 3 args, scope TXN (2), name "seq", INT64
cdef bytes _SEQ_PREFIX = b"\x01\x03\x02\x03seq\x04"


cdef inline int64_t wall_ms() noexcept:
    """netutil.now_ms() in C: unix ms of the wall clock."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef inline int hex_digit(uint8_t c) noexcept:
    if 48 <= c <= 57:
        return c - 48
    c |= 0x20  # either case, as bytes.fromhex
    if 97 <= c <= 102:
        return c - 87
    return -1


cdef bint uuid_id(ArgView *v, unsigned char *out) noexcept:
    """lease_message.connection_id() of a uuid cid: False for any other cid (absent, not a
    uuid string: the twin's path hashes it)."""
    cdef const uint8_t *s = v.data
    cdef int i = 0, j, hi, lo
    if v.dtype != T_STRING or v.size != 36 or s[8] != DASH or s[13] != DASH or s[18] != DASH or s[23] != DASH:
        return False
    for j in range(16):
        if s[i] == DASH:  # only where checked above: pairs start at 0, 2, ..., 6, 9, ...
            i += 1
        hi = hex_digit(s[i])
        lo = hex_digit(s[i + 1])
        if hi < 0 or lo < 0:
            return False
        out[j] = <unsigned char>(hi << 4 | lo)
        i += 2
    return True


cdef bint packed_address(ArgView *v, unsigned char *out) noexcept:
    """records.pack_address() of a typed address (IPv4 as IPv4-mapped); False for anything else."""
    if v.dtype == T_IPV4:
        memcpy(out, PyBytes_AS_STRING(_V4_MAPPED), 12)
        memcpy(out + 12, v.data, 4)
        return True
    if v.dtype == T_IPV6:
        memcpy(out, v.data, 16)
        return True
    return False


cdef bint port_of(ArgView *v, int lowest, uint16_t *out) noexcept:
    """An integer argument in [lowest, 65535]; False for anything else."""
    cdef int64_t value
    if v.dtype == T_INT32 or v.dtype == T_INT64:
        value = <int64_t>v.value
    elif v.dtype == T_UINT32 or v.dtype == T_UINT64:
        if v.value > 65535:
            return False
        value = <int64_t>v.value
    else:
        return False
    if not lowest <= value <= 65535:
        return False
    out[0] = <uint16_t>value
    return True


cdef inline void put_be16(unsigned char *p, uint16_t value) noexcept:
    p[0] = <unsigned char>(value >> 8)
    p[1] = <unsigned char>value


cdef bint canonical(ArgView *v, unsigned char *key, unsigned char *conn_id, uint16_t *src_port,
                    uint16_t *dst_port) noexcept:
    """key and conn_id of a message the C path answers (see the module docstring)."""
    if not (uuid_id(&v[ARG_CID], conn_id) and packed_address(&v[ARG_DST], key)
            and packed_address(&v[ARG_SRC], key + 18) and port_of(&v[ARG_SRC_PORT], 0, src_port)
            and port_of(&v[ARG_DST_PORT], 1, dst_port)):
        return False
    # the frontend name: a string, or none (identity() would str() anything else)
    if v[ARG_FRONTEND].dtype not in (-1, T_NULL, T_STRING):
        return False
    put_be16(key + 16, dst_port[0])
    put_be16(key + 34, src_port[0])
    return True


cdef str frontend_of(ArgView *v):
    if v.dtype != T_STRING:
        return ""
    return PyUnicode_DecodeUTF8(<const char *>v.data, v.size, "surrogateescape")


cdef class LeaseAnswer(NativeHandler):
    """Handler of the lease-* messages; the twin's docstring says what it does."""

    cdef readonly SegmentTracker tracker
    cdef public object spoe_counters           # callable(key, message, now) or None
    cdef public Py_ssize_t registrations       # messages that registered or refreshed a connection
    cdef public Py_ssize_t registrations_bad   # messages naming no connection
    cdef readonly set ports                    # frontend ports seen (the sampler's filter)
    cdef public bint ports_changed             # a port joined ports since the lease module last looked
    cdef Py_ssize_t _answered[3]               # answers by LeaseSource
    cdef uint64_t _seq                         # txn.lease.seq of the last answer
    cdef object _settings                      # LeaseSettings
    cdef int64_t _standard_ms, _min_ms, _max_ms, _ttl_ms
    cdef bytes _standard_answer                # the answer without a hint
    cdef dict _answers                         # cache key (lease_key) -> encoded answer
    cdef uint8_t _port_seen[8192]              # bit per port: ports without a set lookup per message

    def __init__(self, SegmentTracker tracker not None, settings, spoe_counters=None):
        self.tracker = tracker
        self.spoe_counters = spoe_counters
        self.registrations = 0
        self.registrations_bad = 0
        self.ports = set()
        self.ports_changed = False
        memset(self._answered, 0, sizeof(self._answered))
        memset(self._port_seen, 0, sizeof(self._port_seen))
        self._seq = 0
        self.settings = settings

    @property
    def settings(self):
        return self._settings

    @settings.setter
    def settings(self, settings):
        self._standard_ms = settings.standard_ms
        self._min_ms = settings.min_ms
        self._max_ms = settings.max_ms
        self._ttl_ms = settings.hint_ttl_ms
        self._settings = settings
        self._standard_answer = encode_answer(settings, settings.standard_ms, "standard", None, None)
        self._answers = {}

    @property
    def leases(self):
        return {LEASE_SOURCE_NAMES[LeaseSource(source)]: self._answered[source] for source in range(3)}

    cdef int answer(self, Message message, FrameWriter out) except -1:
        cdef ArgView v[N_ARGS]
        cdef unsigned char key[KEY_LEN]
        cdef unsigned char conn_id[16]
        cdef uint16_t src_port, dst_port
        cdef int64_t now = wall_ms()
        cdef int32_t slot
        cdef HintState h
        cdef uint32_t lease_ms = 0
        cdef bint hinted = False
        find_args(message, ARG_NAMES, ARG_SIZES, N_ARGS, v)
        if canonical(v, key, conn_id, &src_port, &dst_port):
            slot = self.tracker._renew(key, KEY_LEN, conn_id, now)
            if slot < 0:
                slot = self.tracker._register_raw(key, KEY_LEN, conn_id, key + 18, src_port, key, dst_port,
                                                  frontend_of(&v[ARG_FRONTEND]), now)
        else:
            slot = self._register_other(message, now, key, &dst_port)
        if slot >= 0:
            hinted = self.tracker._hint_of(slot, &h, &lease_ms)
            self.registrations += 1
            if not self._port_seen[dst_port >> 3] & (1 << (dst_port & 7)):
                # The sampler's filter is rebuilt once per interval, not per new port.
                self._port_seen[dst_port >> 3] |= 1 << (dst_port & 7)
                self.ports.add(dst_port)
                self.ports_changed = True
            if self.spoe_counters is not None:
                self.spoe_counters(PyBytes_FromStringAndSize(<char *>key, KEY_LEN), message, now)
        if hinted:
            self._put_lease(out, &h, lease_ms, now)
        else:
            # No hint (yet): the standard answer, the same bytes every time.
            self._answered[STANDARD] += 1
            out._put_raw(PyBytes_AS_STRING(self._standard_answer), PyBytes_GET_SIZE(self._standard_answer))
        # A fresh number per answer: shows in HAProxy that the value is live.
        self._seq += 1
        out._put_raw(PyBytes_AS_STRING(_SEQ_PREFIX), PyBytes_GET_SIZE(_SEQ_PREFIX))
        out._put_varint(self._seq)
        return 0

    cdef int32_t _register_other(self, Message message, int64_t now, unsigned char *key,
                                 uint16_t *dst_port) except -2:
        """The twin's registration of a message the C path does not read: its slot (key
        and dst_port set), -1 when it names no connection or the tracker is full."""
        found = identity(message)
        if found is None:
            self.registrations_bad += 1
            return -1
        key_bytes, conn_id, src, src_port, dst, port, frontend = found
        if not self.tracker.register(key_bytes, conn_id, src, src_port, dst, port, frontend, now):
            return -1
        memcpy(key, PyBytes_AS_STRING(key_bytes), KEY_LEN)
        dst_port[0] = port
        return self.tracker._slot_of(key_bytes)

    cdef int _put_lease(self, FrameWriter out, HintState *h, uint32_t hinted_ms, int64_t now) except -1:
        """lease_message.lease_in_force() of a hint, in C; its answer from the cache."""
        cdef bint fresh = now - h.received <= self._ttl_ms
        cdef int anomaly = 1 if fresh and h.anomaly else 0
        cdef int source = PREDICTED
        cdef int64_t lease_ms = hinted_ms
        cdef bytes answer
        if not (fresh and h.source == PREDICTED and self._min_ms <= lease_ms <= self._max_ms):
            lease_ms = self._standard_ms
            source = FALLBACK
        self._answered[source] += 1
        cdef int64_t cache_key = (lease_ms << 12) | (source << 10) | ((<uint8_t>h.level) << 1) | anomaly
        answer = self._answers.get(cache_key)
        if answer is None:
            if len(self._answers) >= MAX_ENCODED_ANSWERS:
                self._answers.clear()
            answer = encode_answer(self._settings, lease_ms, LEASE_SOURCE_NAMES[LeaseSource(source)], h.level,
                                   anomaly)
            self._answers[cache_key] = answer
        out._put_raw(PyBytes_AS_STRING(answer), PyBytes_GET_SIZE(answer))
        return 0
