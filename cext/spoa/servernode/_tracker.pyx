# cython: language_level=3, cdivision=True
"""Segment tracker, compiled. Same API and behaviour as spoa/servernode/_tracker_py.py.

Connections are C structs (Conn) in a slab of 2 MiB chunks on huge pages,
found by a C open-addressing hash table of their key bytes, and chained in
registration order, so that one update costs a few cache lines and no Python
object. docs/tracker.md, "Memory layout and speed", has the byte budget.
"""

import os
import sys
from types import MemberDescriptorType

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Next, PyDict_Size
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_Check
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject, PyTypeObject
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.math cimport ceil
from libc.stdlib cimport qsort
from libc.string cimport memcmp, memcpy, memmove

from spoa._netbytes cimport (address_chars, address_text, is_v4_mapped, load_u32, load_u64, pton_ipv4, pton_ipv6,
                             store_be16, store_be32, store_be64)
from spoa.wire._packet cimport RecordBatch
from spoa.wire._record_builder cimport new_connection, new_segment
from spoa.wire import _packet_py
from spoa.wire.records import DIR_IN, DIR_OUT, ConnFlags, CounterSource, LeaseSource

cdef extern from * nogil:
    # Packet shares multiply packets by bytes: past 2^64 for big intervals.
    ctypedef unsigned long long u128 "unsigned __int128"
    int __builtin_clzll(unsigned long long)
    void __builtin_prefetch(const void *addr, int rw, int locality)

cdef extern from "Python.h":
    # the macros on a borrowed pointer (no reference counting)
    char *bytes_data "PyBytes_AS_STRING"(PyObject *o) nogil
    Py_ssize_t bytes_size "PyBytes_GET_SIZE"(PyObject *o) nogil
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member

cdef extern from "<sys/mman.h>":
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int madvise(void *addr, size_t length, int advice)
    int PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS, MADV_HUGEPAGE
    void *MAP_FAILED

cdef int DIR_IN_C = DIR_IN
cdef int DIR_OUT_C = DIR_OUT
cdef int FLAG_CLOSED = ConnFlags.CLOSED
cdef int FLAG_EXPIRED = ConnFlags.EXPIRED
cdef int FLAG_CLOSING = ConnFlags.CLOSING
cdef uint8_t SOURCE_NONE = CounterSource.NONE
cdef uint8_t LEASE_STANDARD = LeaseSource.STANDARD
cdef uint8_t LEASE_PREDICTED = LeaseSource.PREDICTED

cdef enum:
    # HintState.state bits
    HINTED = 1                  # a hint was set (set_hint)
    PUBLISHED = 2               # publish(now) built a record (last_published holds when)

# The connection record's wire layout (docs/publishing-packet.md §4), which _put_wire writes.
cdef enum:
    C_CONN = 84           # fixed part of a record
    C_SEG = 42            # one segment
    C_MAX_FRONTEND = 255  # frontend name, bytes of UTF-8
    FAMILY_IPV4 = 4
    FAMILY_IPV6 = 6
assert (_packet_py.CONN_SIZE, _packet_py.SEG_SIZE, _packet_py.MAX_FRONTEND, _packet_py.FAMILY_IPV4,
        _packet_py.FAMILY_IPV6) == (84, 42, 255, 4, 6)

KEY_MAX = 40  # longest key, bytes (Conn.key); the product key (records.pack_key) is 36
cdef Py_ssize_t C_KEY_MAX = KEY_MAX

# Slab geometry: a slot id is (chunk << SLOT_BITS) | index in chunk, so an id
# becomes a pointer with a shift and a mask, no division by sizeof(Conn).
cdef size_t HUGE_PAGE = 2 << 20
cdef size_t CHUNK_BYTES = HUGE_PAGE  # one huge page: one TLB entry covers 6,553 connections
cdef size_t PAGE = 4096
cdef int32_t SLOTS_PER_CHUNK = CHUNK_BYTES // sizeof(Conn)
cdef int SLOT_BITS = 64 - __builtin_clzll(SLOTS_PER_CHUNK - 1)
cdef int32_t SLOT_MASK = (1 << SLOT_BITS) - 1
cdef Py_ssize_t MAX_CHUNKS = (<Py_ssize_t>1) << (31 - SLOT_BITS)  # slot ids are int32
cdef uint32_t INITIAL_TABLE = 16
# What the layout promises (docs/tracker.md): a Conn is 5 whole cache lines, a DirHot one.
if sizeof(Conn) != 320 or sizeof(DirHot) != 64 or sizeof(Segment) != 48:
    raise ImportError(f"tracker layout changed: Conn {sizeof(Conn)}, DirHot {sizeof(DirHot)} bytes")

# Group prefetching in update_batch: hash item i + 2W and prefetch its table
# entry, read the entry of item i + W and prefetch its Conn, update item i.
# W = 0 turns it off (benchmarks compare both with set_prefetch_window).
cdef Py_ssize_t RING = 64  # ring of hashes; > 2 * the largest window
cdef Py_ssize_t prefetch_window = 16

# Key hash: wyhash's multiply-fold ("mum": the 128-bit product's halves
# xor-ed) over the key's 16-byte blocks, the last one read overlapping the one
# before (as wyhash does), so a 36-byte key costs 3 + 1 multiplies and only
# unaligned 8-byte loads (a zero-padded copy stalled on store forwarding).
# Secrets drawn per process: clients choose their ports, so a fixed hash
# could be flooded with colliding keys; with unknown secrets they cannot aim.
cdef uint64_t SECRET0, SECRET1, SECRET2
SECRET0, SECRET1, SECRET2 = [int.from_bytes(os.urandom(8), "little") | 1 for _ in range(3)]


cdef inline uint64_t mum(uint64_t a, uint64_t b) noexcept nogil:
    cdef u128 r = <u128>a * b
    return <uint64_t>r ^ <uint64_t>(r >> 64)


cdef inline uint64_t key_hash(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = SECRET0 ^ <uint64_t>n
    cdef uint64_t a, b
    cdef Py_ssize_t i = 0
    if n > 16:
        while i + 16 < n:
            h = mum(load_u64(p + i) ^ SECRET1, load_u64(p + i + 8) ^ h)
            i += 16
        a = load_u64(p + n - 16)
        b = load_u64(p + n - 8)
    elif n >= 8:
        a = load_u64(p)
        b = load_u64(p + n - 8)
    elif n >= 4:
        a = load_u32(p)
        b = load_u32(p + n - 4)
    else:  # 1..3 bytes
        a = (<uint64_t>p[0] << 16) | (<uint64_t>p[n >> 1] << 8) | p[n - 1]
        b = 0
    h = mum(a ^ SECRET1, b ^ h)
    return mum(h ^ SECRET2, <uint64_t>n ^ SECRET1)


cdef inline const unsigned char *key_bytes(object key, Py_ssize_t *n) except NULL:
    """The key's bytes (and length): TypeError/ValueError as the twin's _check_key."""
    if not PyBytes_Check(key):
        raise TypeError(f"key must be bytes, not {type(key).__name__}")
    n[0] = PyBytes_GET_SIZE(key)
    if n[0] < 1 or n[0] > C_KEY_MAX:
        raise ValueError(f"key must be 1 to {KEY_MAX} bytes, got {n[0]}")
    return <const unsigned char *>PyBytes_AS_STRING(key)


cdef int parse_address(object text, unsigned char *out) except -1:
    """16 packed bytes of IPv4/IPv6 text (IPv4 as IPv4-mapped); errors as the twin's."""
    cdef const char *s
    if not isinstance(text, str):
        raise TypeError(f"address must be str, not {type(text).__name__}")
    s = address_chars(text)
    if s is not NULL and (pton_ipv4(s, out) or pton_ipv6(s, out)):
        return 0
    raise ValueError(f"not an IPv4 or IPv6 address: {text!r}")


cdef int check_port(object port) except -1:
    if not isinstance(port, int):
        raise TypeError(f"port must be int, not {type(port).__name__}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    return 0


cdef int check_conn_id(object conn_id) except -1:
    if not isinstance(conn_id, bytes):
        raise TypeError("conn_id must be bytes")
    if PyBytes_GET_SIZE(conn_id) != 16:
        raise ValueError("conn_id must be 16 bytes")
    return 0


cdef int check_level(int level) except -1:
    """granularity levels: one signed byte, as the hint carries them."""
    if not -128 <= level <= 127:
        raise ValueError(f"level must be -128..127, got {level}")
    return 0


cdef object frontend_wire(str name):
    """A frontend name as the packet carries it (UTF-8, at most 255 bytes), or None when it
    cannot be carried (publishing its records then raises the packet codec's error)."""
    try:
        data = name.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return data if len(data) <= C_MAX_FRONTEND else None


cdef int check_small(str name, object value) except -1:
    """flags, sources: stored in one byte each."""
    if not 0 <= value <= 255:
        raise ValueError(f"{name} must be 0..255, got {value}")
    return 0


cdef int check_lease(str name, object value) except -1:
    """lease durations: u32 ms, as the publishing packet carries them."""
    if not isinstance(value, int):
        raise TypeError(f"{name} must be int, not {type(value).__name__}")
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} must be 0..4294967295, got {value}")
    return 0


cdef void *region_alloc(size_t size) except NULL:
    """size zeroed bytes from mmap; from HUGE_PAGE up, HUGE_PAGE-aligned and madvised
    for huge pages (tracemalloc does not see it: memory_bytes() counts it)."""
    cdef char *raw
    cdef char *p
    cdef size_t lead
    if size < HUGE_PAGE:
        raw = <char *>mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if <void *>raw == MAP_FAILED:
            raise MemoryError()
        return raw
    # Over-map by one huge page, then unmap the unaligned ends.
    raw = <char *>mmap(NULL, size + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if <void *>raw == MAP_FAILED:
        raise MemoryError()
    p = <char *>((<size_t>raw + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1))
    lead = p - raw
    if lead:
        munmap(raw, lead)
    munmap(p + size, HUGE_PAGE - lead)
    madvise(p, size, MADV_HUGEPAGE)  # best effort: THP may be off
    return p


cdef inline size_t region_bytes(size_t size) noexcept nogil:
    return (size + PAGE - 1) & ~(PAGE - 1)


cdef inline int bit_length(uint64_t value) noexcept nogil:
    return 0 if value == 0 else 64 - __builtin_clzll(value)


cdef int cmp_u64(const void *a, const void *b) noexcept nogil:
    cdef uint64_t x = (<const uint64_t *>a)[0]
    cdef uint64_t y = (<const uint64_t *>b)[0]
    return (x > y) - (x < y)


cdef int share(uint64_t total, uint64_t *weights, uint64_t *parts, Py_ssize_t n) except -1:
    """Split total by weights: floor shares, then largest remainder (ties: later)."""
    cdef u128 whole = 0
    cdef u128 assigned = 0
    cdef Py_ssize_t i, best
    cdef u128 rem, best_rem
    cdef uint64_t rest
    for i in range(n):
        whole += weights[i]
    if whole == 0:
        for i in range(n):
            parts[i] = 0
        return 0
    for i in range(n):
        parts[i] = <uint64_t>((<u128>total * weights[i]) / whole)
        assigned += parts[i]
    rest = <uint64_t>(total - assigned)
    # rest < n: pick the largest remainders one by one, marking each taken
    # by its remainder's +1 share (a taken index is never picked again).
    cdef uint64_t *taken = <uint64_t *>PyMem_Malloc(n * sizeof(uint64_t)) if rest else NULL
    if rest and taken is NULL:
        raise MemoryError()
    for i in range(n if rest else 0):
        taken[i] = 0
    while rest:
        best = -1
        best_rem = 0
        for i in range(n):
            if taken[i]:
                continue
            rem = (<u128>total * weights[i]) % whole
            if best < 0 or rem >= best_rem:
                best = i
                best_rem = rem
        taken[best] = 1
        parts[best] += 1
        rest -= 1
    PyMem_Free(taken)
    return 0


def share_py(total, weights):
    """share() for tests: the same split as spoa.servernode._tracker_py.share."""
    cdef Py_ssize_t n = len(weights)
    cdef uint64_t *w = <uint64_t *>PyMem_Malloc((2 * n + 1) * sizeof(uint64_t))
    cdef Py_ssize_t i
    if w is NULL:
        raise MemoryError()
    try:
        for i in range(n):
            w[i] = weights[i]
        share(total, w, w + n, n)
        return [w[n + i] for i in range(n)]
    finally:
        PyMem_Free(w)


def set_prefetch_window(Py_ssize_t window):
    """Items update_batch looks ahead (0: no prefetching); returns the previous value.
    For benchmarks: the default suits this VM's memory latency."""
    global prefetch_window
    if not 0 <= window <= (RING - 1) // 2:
        raise ValueError(f"window must be 0..{(RING - 1) // 2}")
    previous = prefetch_window
    prefetch_window = window
    return previous


cdef inline Conn *conn_at(Conn **chunks, int32_t slot) noexcept nogil:
    return chunks[slot >> SLOT_BITS] + (slot & SLOT_MASK)


cdef inline void prefetch_conn(Entry *table, uint32_t mask, Conn **chunks, uint32_t tag, int direction) noexcept nogil:
    """Stage 2 of the batch pipelines: the key's table entry is in cache; prefetch the
    Conn it points to, line 0 (key, flags, last seen) and the DirHot line of direction
    (-1: of both), if the tag is in the table."""
    cdef uint32_t e = tag & mask
    cdef Conn *c
    while table[e].slot1:
        if table[e].tag == tag:
            c = conn_at(chunks, table[e].slot1 - 1)
            __builtin_prefetch(c, 1, 3)
            if direction != DIR_OUT_C:
                __builtin_prefetch(&c.hot[DIR_IN_C], 1, 3)
            if direction != DIR_IN_C:
                __builtin_prefetch(&c.hot[DIR_OUT_C], 1, 3)
            return
        e = (e + 1) & mask


# -- kernel samples (apply_sample) ----------------------------------------------------------
# The fields apply_sample reads from each sample value (a TcpSample), in this
# order, and their ranges: the kernel's tcp_info widths, u32 for the "ms ago".
SAMPLE_FIELDS = ("state", "bytes_received", "data_segs_in", "last_data_recv_ms",
                 "bytes_acked", "data_segs_out", "last_data_sent_ms")
cdef enum:
    N_SAMPLE_FIELDS = 7
    F_STATE = 0                 # then per direction: bytes, packets, ms ago (in: 1-3, out: 4-6)
    T_OBJECT_EX = 16            # structmember.h (Py_T_OBJECT_EX in 3.12+)
cdef uint64_t sample_max[N_SAMPLE_FIELDS]
sample_max[:] = [0xFF, 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFF,
                 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFF]

# Reading a field: the slot itself when the value's type is a slots class whose
# fields are plain member descriptors (TcpSample: no Python call, no descriptor
# lookup), found once per type; any other type through getattr.
cdef object sample_type = None              # the type last learnt
cdef bint sample_direct = False             # its fields are read from sample_offsets
cdef Py_ssize_t sample_offsets[N_SAMPLE_FIELDS]


cdef int learn_sample_type(object t) except -1:
    global sample_type, sample_direct
    cdef PyMemberDef *member
    cdef bint direct = getattr(t, "__getattribute__", None) is object.__getattribute__
    for i, name in enumerate(SAMPLE_FIELDS):
        if not direct:
            break
        descr = getattr(t, name, None)  # through the MRO, as an instance's lookup finds it
        if type(descr) is not MemberDescriptorType:
            direct = False
            break
        member = (<PyMemberDescrObject *>descr).d_member
        if (member == NULL or member.type != T_OBJECT_EX or member.offset < <Py_ssize_t>sizeof(PyObject)
                or member.offset + <Py_ssize_t>sizeof(void *) > (<PyTypeObject *>t).tp_basicsize):
            direct = False
            break
        sample_offsets[i] = member.offset
    sample_type = t
    sample_direct = direct
    return 0


cdef int read_sample(object key, object value, uint64_t *out) except -1:
    """The N_SAMPLE_FIELDS fields of one sample value, checked (the twin's _sample_fields);
    1 if any was read through getattr (Python code may have run), else 0."""
    cdef PyObject *slot
    cdef Py_ssize_t i
    cdef uint64_t v
    cdef bint bad
    cdef int generic = 0
    if type(value) is not sample_type:
        learn_sample_type(type(value))
    for i in range(N_SAMPLE_FIELDS):
        slot = NULL
        if sample_direct:
            slot = (<PyObject **>((<char *><PyObject *>value) + sample_offsets[i]))[0]
        if slot is not NULL:
            x = <object>slot
        else:
            generic = 1
            try:
                x = getattr(value, SAMPLE_FIELDS[i])
            except AttributeError:
                raise TypeError(f"sample value of key {key.hex()} has no {SAMPLE_FIELDS[i]}: "
                                f"{type(value).__name__} is not a TcpSample") from None
        if not PyLong_Check(x):
            raise TypeError(f"{SAMPLE_FIELDS[i]} of the sample of key {key.hex()} must be int, "
                            f"not {type(x).__name__}")
        try:
            v = x
        except OverflowError:  # negative, or past 2^64
            bad = True
        else:
            bad = v > sample_max[i]
        if bad:
            raise ValueError(f"{SAMPLE_FIELDS[i]} of the sample of key {key.hex()} must be "
                             f"0..{sample_max[i]}, got {x}")
        out[i] = v
    return generic


cdef int state_mask(object states, uint64_t *mask) except -1:
    """Bits 0..255 of a collection of TCP states (ints 0..255), as the twin's _state_mask."""
    mask[0] = mask[1] = mask[2] = mask[3] = 0
    for state in states:
        if not isinstance(state, int):
            raise TypeError(f"closing_states must hold ints, not {type(state).__name__}")
        if not 0 <= state <= 255:
            raise ValueError(f"closing_states must hold 0..255, got {state}")
        mask[<int>state >> 6] |= (<uint64_t>1) << (<int>state & 63)
    return 0


cdef struct Pending:
    # One sample entry between apply_sample's two passes: checked and converted, not applied yet.
    PyObject *key               # borrowed from the sample dict
    uint64_t hash               # key_hash of it
    uint64_t fields[7]          # N_SAMPLE_FIELDS, SAMPLE_FIELDS order
    int32_t slot                # found in the tracker (pass 2; -1: untracked)


cdef inline HintState *hint_at(HintState **chunks, int32_t slot) noexcept nogil:
    return chunks[slot >> SLOT_BITS] + (slot & SLOT_MASK)


cdef inline bint may_fill(uint32_t home, uint32_t hole, uint32_t j, uint32_t mask) noexcept nogil:
    """Backward-shift deletion: the entry at j (home bucket home) may move into
    the hole unless its home lies in (hole, j]."""
    return ((j - home) & mask) >= ((j - hole) & mask)


# The segments before a direction's tail live in a malloc'd array that starts
# with its slot count (a header: DirCold needs no field for it).
cdef inline Py_ssize_t older_slots(DirCold *d) noexcept nogil:
    return 0 if d.older is NULL else <Py_ssize_t>(<uint64_t *>d.older - 1)[0]


cdef inline size_t array_bytes(Py_ssize_t slots) noexcept nogil:
    return sizeof(uint64_t) + slots * sizeof(Segment)


cdef inline size_t free_older(DirCold *d) noexcept:
    """Drop the array of older segments; the bytes freed."""
    cdef size_t freed = 0
    if d.older is not NULL:
        freed = array_bytes(older_slots(d))
        PyMem_Free(<uint64_t *>d.older - 1)
        d.older = NULL
    d.nolder = 0
    return freed


cdef inline Segment *seg_at(Conn *c, int k, Py_ssize_t i) noexcept nogil:
    """Segment i (offset order) of direction k: the older ones, then the tail."""
    return &c.cold[k].older[i] if i < c.cold[k].nolder else &c.hot[k].tail


cdef bint quiet(Conn *c) noexcept:
    """Nothing moved in any of its segments this interval."""
    cdef int k
    cdef Py_ssize_t i
    cdef Segment *s
    for k in range(2):
        for i in range(c.cold[k].nolder + 1):
            s = seg_at(c, k, i)
            if s.bytes_interval or s.packets_interval:
                return False
    return True


cdef inline Py_ssize_t segment_count(Conn *c) noexcept nogil:
    return c.cold[0].nolder + c.cold[1].nolder + 2


cdef class SegmentTracker:
    def __cinit__(self):
        self._table = <Entry *>region_alloc(INITIAL_TABLE * sizeof(Entry))
        self._ids = <uint32_t *>region_alloc(INITIAL_TABLE * sizeof(uint32_t))
        self._mask = INITIAL_TABLE - 1
        self._free = self._head = self._tail = -1

    def __init__(self, segment_size=1 << 20, min_segment_size=64 << 10, max_segment_size=64 << 20,
                 split_bytes=256 << 10, idle_ms=5000, max_segments_per_connection=16,
                 max_total_segments=4_000_000, max_connections=1_000_000, expire_ms=300_000):
        if not 1 <= min_segment_size <= segment_size <= max_segment_size:
            raise ValueError("need 1 <= min_segment_size <= segment_size <= max_segment_size")
        if max_segments_per_connection < 2 or max_total_segments < 2 * max_segments_per_connection:
            raise ValueError("need max_segments_per_connection >= 2 and max_total_segments >= 2x that")
        self.segment_size = segment_size
        self.min_segment_size = min_segment_size
        self.max_segment_size = max_segment_size
        self.split_bytes = split_bytes
        self.idle_ms = idle_ms
        self.max_segments_per_connection = max_segments_per_connection
        self.max_total_segments = max_total_segments
        self.max_connections = max_connections
        self.expire_ms = expire_ms
        self._closed = []
        self._frontends = []
        self._frontend_wire = []
        self._frontend_ids = {}
        self.total_segments = 0
        self.set_refresh(1000, 0.34, 5000)
        self.stats = dict.fromkeys(
            ("registered", "refused", "closed", "expired", "counter_resets", "splits", "merges", "coarsened",
             "unknown_updates", "deferred"), 0
        )

    def __dealloc__(self):
        cdef int32_t slot = self._head
        cdef Conn *c
        cdef Py_ssize_t i
        while slot >= 0:
            c = conn_at(self._chunks, slot)
            free_older(&c.cold[0])
            free_older(&c.cold[1])
            slot = c.next
        for i in range(self._nchunks):
            munmap(self._chunks[i], CHUNK_BYTES)
            munmap(self._hint_chunks[i], SLOTS_PER_CHUNK * sizeof(HintState))
        PyMem_Free(self._chunks)
        PyMem_Free(self._hint_chunks)
        if self._table is not NULL:
            munmap(self._table, (self._mask + <size_t>1) * sizeof(Entry))
        if self._ids is not NULL:
            munmap(self._ids, (self._mask + <size_t>1) * sizeof(uint32_t))

    # -- slab and hash table ----------------------------------------------------------
    cdef Conn *_new_slot(self, int32_t *slot) except NULL:
        """A slot for a new connection: a freed one first, else the next never-used one."""
        cdef Conn **grown
        cdef HintState **grown_hints
        cdef Py_ssize_t n
        cdef Conn *c
        if self._free >= 0:
            slot[0] = self._free
            c = conn_at(self._chunks, self._free)
            self._free = c.next
            return c
        if self._nchunks == 0 or self._fresh == SLOTS_PER_CHUNK:
            if self._nchunks == MAX_CHUNKS:
                raise MemoryError("slot ids exhausted")
            if self._nchunks == self._chunks_allocated:
                n = self._chunks_allocated * 2 if self._chunks_allocated else 8
                grown = <Conn **>PyMem_Realloc(self._chunks, n * sizeof(Conn *))
                if grown is NULL:
                    raise MemoryError()
                self._chunks = grown
                grown_hints = <HintState **>PyMem_Realloc(self._hint_chunks, n * sizeof(HintState *))
                if grown_hints is NULL:
                    raise MemoryError()
                self._hint_chunks = grown_hints
                self._chunks_allocated = n
            self._hint_chunks[self._nchunks] = <HintState *>region_alloc(SLOTS_PER_CHUNK * sizeof(HintState))
            try:
                self._chunks[self._nchunks] = <Conn *>region_alloc(CHUNK_BYTES)
            except MemoryError:
                munmap(self._hint_chunks[self._nchunks], SLOTS_PER_CHUNK * sizeof(HintState))
                raise
            self._nchunks += 1
            self._fresh = 0
        slot[0] = <int32_t>((self._nchunks - 1) << SLOT_BITS) | self._fresh
        self._fresh += 1
        return conn_at(self._chunks, slot[0])

    cdef int32_t _find(self, const unsigned char *key, Py_ssize_t n, uint64_t h) noexcept:
        """The live slot holding key (h = key_hash(key)), else -1."""
        cdef uint32_t tag = <uint32_t>h
        cdef uint32_t i = tag & self._mask
        cdef Entry *e
        cdef Conn *c
        while True:
            e = &self._table[i]
            if e.slot1 == 0:
                return -1
            if e.tag == tag:  # the fingerprint spares the slab most mismatches
                c = conn_at(self._chunks, e.slot1 - 1)
                if c.key_len == n and memcmp(c.key, key, n) == 0:
                    return e.slot1 - 1
            i = (i + 1) & self._mask

    cdef void _table_insert(self, uint32_t tag, int32_t slot) noexcept:
        """Add an entry for a key known to be absent (there is always room: load <= 1/2)."""
        cdef uint32_t i = tag & self._mask
        while self._table[i].slot1:
            i = (i + 1) & self._mask
        self._table[i].tag = tag
        self._table[i].slot1 = slot + 1

    cdef int _grow_table(self) except -1:
        """Double the key table and the id table (they share the mask)."""
        cdef Entry *old = self._table
        cdef uint32_t *old_ids = self._ids
        cdef size_t old_size = self._mask + <size_t>1
        cdef size_t i
        cdef uint32_t *ids
        if old_size >= (<size_t>1) << 31:
            raise MemoryError("hash table at its largest")
        ids = <uint32_t *>region_alloc(2 * old_size * sizeof(uint32_t))
        try:
            self._table = <Entry *>region_alloc(2 * old_size * sizeof(Entry))
        except MemoryError:
            munmap(ids, 2 * old_size * sizeof(uint32_t))
            raise
        self._ids = ids
        self._mask = <uint32_t>(2 * old_size - 1)
        for i in range(old_size):
            if old[i].slot1:
                self._table_insert(old[i].tag, old[i].slot1 - 1)
            if old_ids[i]:  # the indexed slots only: which of two same-id connections is indexed stays
                self._index_id(old_ids[i] - 1, conn_at(self._chunks, old_ids[i] - 1))
        munmap(old, old_size * sizeof(Entry))
        munmap(old_ids, old_size * sizeof(uint32_t))
        return 0

    cdef void _table_delete(self, int32_t slot, Conn *c) noexcept:
        """Remove slot's entry; backward-shift the probe run behind it (no tombstones)."""
        cdef uint32_t mask = self._mask
        cdef uint32_t i = <uint32_t>key_hash(c.key, c.key_len) & mask
        cdef uint32_t j, home
        while self._table[i].slot1 != <uint32_t>(slot + 1):
            i = (i + 1) & mask
        j = i
        while True:
            j = (j + 1) & mask
            if self._table[j].slot1 == 0:
                break
            home = self._table[j].tag & mask
            if may_fill(home, i, j, mask):
                self._table[i] = self._table[j]
                i = j
        self._table[i].slot1 = 0
        self._table[i].tag = 0

    # The id table: hints name connections by conn_id, not by key. Ids are
    # HAProxy's unique sess.cid; should two live connections share one, the
    # later registration is the one indexed (hints go to it), as a dict would.
    cdef int32_t _find_id(self, const unsigned char *conn_id) noexcept:
        """The indexed slot of conn_id, else -1."""
        cdef uint32_t i = <uint32_t>key_hash(conn_id, 16) & self._mask
        while self._ids[i]:
            if memcmp(conn_at(self._chunks, self._ids[i] - 1).conn_id, conn_id, 16) == 0:
                return self._ids[i] - 1
            i = (i + 1) & self._mask
        return -1

    cdef void _index_id(self, int32_t slot, Conn *c) noexcept:
        """Point c's conn_id at slot (replacing another slot's entry for it)."""
        cdef uint32_t i = <uint32_t>key_hash(c.conn_id, 16) & self._mask
        while self._ids[i] and memcmp(conn_at(self._chunks, self._ids[i] - 1).conn_id, c.conn_id, 16) != 0:
            i = (i + 1) & self._mask
        self._ids[i] = slot + 1

    cdef void _unindex_id(self, int32_t slot, Conn *c) noexcept:
        """Remove c's id entry if it is slot's; backward-shift as _table_delete."""
        cdef uint32_t mask = self._mask
        cdef uint32_t i = <uint32_t>key_hash(c.conn_id, 16) & mask
        cdef uint32_t j, home
        while self._ids[i] != <uint32_t>(slot + 1):
            if self._ids[i] == 0:
                return  # another slot with the same id holds the entry
            i = (i + 1) & mask
        j = i
        while True:
            j = (j + 1) & mask
            if self._ids[j] == 0:
                break
            home = <uint32_t>key_hash(conn_at(self._chunks, self._ids[j] - 1).conn_id, 16) & mask
            if may_fill(home, i, j, mask):
                self._ids[i] = self._ids[j]
                i = j
        self._ids[i] = 0

    cdef void _release(self, int32_t slot, Conn *c) noexcept:
        """Forget a live connection: table entry, order links, overflow arrays; slot to the free list."""
        self._table_delete(slot, c)
        self._unindex_id(slot, c)
        if c.prev >= 0:
            conn_at(self._chunks, c.prev).next = c.next
        else:
            self._head = c.next
        if c.next >= 0:
            conn_at(self._chunks, c.next).prev = c.prev
        else:
            self._tail = c.prev
        self._overflow_bytes -= free_older(&c.cold[0]) + free_older(&c.cold[1])
        c.next = self._free
        self._free = slot
        self._count -= 1

    def memory_bytes(self):
        """Bytes this tracker allocated for its connections: slab chunks and their
        hint regions, key and id tables, chunk tables, overflow segment arrays,
        interned frontend names (not the final records waiting for publish())."""
        return (self._nchunks * (CHUNK_BYTES + region_bytes(SLOTS_PER_CHUNK * sizeof(HintState)))
                + region_bytes((self._mask + <size_t>1) * sizeof(Entry))
                + region_bytes((self._mask + <size_t>1) * sizeof(uint32_t))
                + self._chunks_allocated * (sizeof(Conn *) + sizeof(HintState *)) + self._overflow_bytes
                + sys.getsizeof(self._frontends) + sys.getsizeof(self._frontend_ids)
                + sum([sys.getsizeof(name) for name in self._frontends])
                + sys.getsizeof(self._frontend_wire) + sum([sys.getsizeof(name) for name in self._frontend_wire]))

    # -- sizes and levels ---------------------------------------------------------
    cdef uint64_t _capacity(self, int level) noexcept:
        cdef uint64_t size
        if level >= 0:
            size = self.segment_size >> level if level < 64 else 0
        else:
            size = self.segment_size << (-level) if -level < 64 - bit_length(self.segment_size) else self.max_segment_size
        if size < self.min_segment_size:
            size = self.min_segment_size
        if size > self.max_segment_size:
            size = self.max_segment_size
        return size

    cdef int _level_of(self, uint64_t capacity) noexcept:
        return bit_length(self.segment_size) - bit_length(capacity)

    cdef void _init_direction(self, Conn *c, int k) noexcept:
        cdef DirHot *h = &c.hot[k]
        cdef DirCold *d = &c.cold[k]
        cdef uint64_t base = self._capacity(0)
        h.bytes_counter = 0
        h.packets_counter = 0
        h.tail.count = 0
        h.tail.capacity = base
        h.tail.bytes_interval = 0
        h.tail.packets_interval = 0
        h.tail.last_activity = 0
        h.tail.level = <int8_t>self._level_of(base)
        d.older = NULL
        d.nolder = 0
        d.level = 0
        d.tail_start = 0
        d.interval_start = 0

    cdef Segment *_push_tail(self, Conn *c, int k, uint64_t capacity) except NULL:
        """The tail joins the older segments; a new empty tail of capacity follows it."""
        cdef DirCold *d = &c.cold[k]
        cdef Segment *t = &c.hot[k].tail
        cdef Py_ssize_t slots = older_slots(d)
        cdef Py_ssize_t grown_slots = 2 * slots if slots else 2
        cdef uint64_t *grown
        if d.nolder == slots:
            if slots >= (1 << 30):
                raise MemoryError("too many segments")
            grown = <uint64_t *>PyMem_Realloc(<uint64_t *>d.older - 1 if d.older is not NULL else NULL,
                                              array_bytes(grown_slots))
            if grown is NULL:
                raise MemoryError()
            self._overflow_bytes += array_bytes(grown_slots) - (array_bytes(slots) if slots else 0)
            grown[0] = grown_slots
            d.older = <Segment *>(grown + 1)
        d.older[d.nolder] = t[0]
        d.nolder += 1
        d.tail_start += t.count
        t.count = 0
        t.capacity = capacity
        t.bytes_interval = 0
        t.packets_interval = 0
        t.last_activity = 0
        t.level = <int8_t>self._level_of(capacity)
        self.total_segments += 1
        return t

    # -- registration and lifecycle ----------------------------------------------------
    def register(self, key, conn_id, src, src_port, dst, dst_port, frontend, int64_t now_ms):
        cdef Py_ssize_t n
        cdef const unsigned char *k = key_bytes(key, &n)
        cdef unsigned char src_raw[16]
        cdef unsigned char dst_raw[16]
        check_conn_id(conn_id)
        parse_address(src, src_raw)
        check_port(src_port)
        parse_address(dst, dst_raw)
        check_port(dst_port)
        if not isinstance(frontend, str):
            raise TypeError(f"frontend must be str, not {type(frontend).__name__}")
        return self._register_raw(k, n, <const unsigned char *>PyBytes_AS_STRING(conn_id), src_raw, src_port,
                                  dst_raw, dst_port, frontend, now_ms) >= 0

    cdef int32_t _renew(self, const unsigned char *key, Py_ssize_t n, const unsigned char *conn_id,
                        int64_t now_ms) noexcept:
        """The slot of key's connection if it has conn_id (now seen alive), else -1."""
        cdef int32_t slot = self._find(key, n, key_hash(key, n))
        cdef Conn *c
        if slot < 0:
            return -1
        c = conn_at(self._chunks, slot)
        if memcmp(c.conn_id, conn_id, 16) != 0:
            return -1
        c.last_seen = now_ms
        return slot

    cdef int32_t _register_raw(self, const unsigned char *k, Py_ssize_t n, const unsigned char *conn_id,
                               const unsigned char *src, uint16_t src_port, const unsigned char *dst,
                               uint16_t dst_port, str frontend, int64_t now_ms) except -2:
        """register() of checked values (addresses packed): the slot, -1 when refused (full)."""
        cdef int32_t slot = self._renew(k, n, conn_id, now_ms)
        cdef uint64_t h
        cdef Conn *c
        if slot >= 0:
            return slot
        h = key_hash(k, n)
        slot = self._find(k, n, h)
        if slot >= 0:
            self._close_slot(slot, now_ms, FLAG_CLOSED)  # the 4-tuple was reused: the old connection is over
        if self._count >= self.max_connections:
            self.stats["refused"] += 1
            return -1
        index = self._frontend_ids.get(frontend)
        if index is None:
            index = self._frontend_ids[frontend] = len(self._frontends)
            self._frontends.append(frontend)
            self._frontend_wire.append(frontend_wire(frontend))
        if 2 * (self._count + 1) > self._mask + <Py_ssize_t>1:
            self._grow_table()
        c = self._new_slot(&slot)
        memcpy(c.key, k, n)
        c.key_len = <uint8_t>n
        c.flags = 0
        c.source = SOURCE_NONE
        c.lease_source = LEASE_STANDARD
        c.frontend = index
        c.last_seen = now_ms
        memcpy(c.conn_id, conn_id, 16)
        c.requested_lease = 0
        c.predicted_lease = 0
        c.publish_after = 0
        hint_at(self._hint_chunks, slot).state = 0
        self._init_direction(c, 0)
        self._init_direction(c, 1)
        memcpy(c.cold[0].addr, src, 16)
        memcpy(c.cold[1].addr, dst, 16)
        c.cold[0].port = src_port
        c.cold[1].port = dst_port
        self.total_segments += 2
        self._table_insert(<uint32_t>h, slot)
        self._index_id(slot, c)
        c.next = -1
        c.prev = self._tail
        if self._tail >= 0:
            conn_at(self._chunks, self._tail).next = slot
        else:
            self._head = slot
        self._tail = slot
        self._count += 1
        self.stats["registered"] += 1
        return slot

    cdef int32_t _slot_of(self, object key) except? -2:
        """The live slot of key, -1 if none (TypeError/ValueError for a bad key)."""
        cdef Py_ssize_t n
        cdef const unsigned char *k = key_bytes(key, &n)
        return self._find(k, n, key_hash(k, n))

    cdef Conn *_lookup(self, object key) except? NULL:
        """The live connection of key, NULL if none (TypeError/ValueError for a bad key)."""
        cdef int32_t slot = self._slot_of(key)
        return NULL if slot < 0 else conn_at(self._chunks, slot)

    def set_closing(self, key):
        cdef Conn *c = self._lookup(key)
        if c is not NULL:
            c.flags |= FLAG_CLOSING

    def set_lease(self, key, requested_ms, predicted_ms, int lease_source):
        cdef Conn *c = self._lookup(key)
        check_lease("requested_ms", requested_ms)
        check_lease("predicted_ms", predicted_ms)
        check_small("lease_source", lease_source)
        if c is not NULL:
            c.requested_lease = requested_ms
            c.predicted_lease = predicted_ms
            c.lease_source = <uint8_t>lease_source

    def set_refresh(self, int64_t interval_ms, double refresh_fraction, int64_t hint_ttl_ms):
        """The cadence of connections under a predicted lease (see set_hint)."""
        self.refresh_interval_ms = interval_ms
        self.refresh_fraction = refresh_fraction
        self.hint_ttl_ms = hint_ttl_ms

    def set_hint(self, conn_id, lease_ms, int source, int level, anomaly, int64_t now_ms, requested_ms,
                 int lease_source):
        """The hint for conn_id's connection and the lease it puts in force; False
        if no live connection has that id. The cadence it sets: the twin's docstring."""
        cdef int32_t slot
        cdef Conn *c
        cdef HintState *h
        check_conn_id(conn_id)
        check_lease("lease_ms", lease_ms)
        check_lease("requested_ms", requested_ms)
        check_small("source", source)
        check_small("lease_source", lease_source)
        check_level(level)
        slot = self._find_id(<const unsigned char *>PyBytes_AS_STRING(conn_id))
        if slot < 0:
            return False
        c = conn_at(self._chunks, slot)
        h = hint_at(self._hint_chunks, slot)
        c.requested_lease = requested_ms
        c.predicted_lease = lease_ms
        c.lease_source = <uint8_t>lease_source
        h.state |= HINTED
        h.received = now_ms
        h.source = <uint8_t>source
        h.level = <int8_t>level
        h.anomaly = 1 if anomaly else 0
        c.publish_after = self._refresh_after(c, h)
        return True

    def hint(self, key):
        """The last hint of the key's connection, (lease_ms, source, level,
        anomaly 0/1, received unix ms), or None (no hint, or not tracked)."""
        cdef int32_t slot = self._slot_of(key)
        cdef HintState h
        cdef uint32_t lease_ms
        if slot < 0 or not self._hint_of(slot, &h, &lease_ms):
            return None
        return (lease_ms, h.source, h.level, h.anomaly, h.received)

    cdef bint _hint_of(self, int32_t slot, HintState *h, uint32_t *lease_ms) noexcept:
        h[0] = hint_at(self._hint_chunks, slot)[0]
        if not h.state & HINTED:
            return False
        lease_ms[0] = conn_at(self._chunks, slot).predicted_lease
        return True

    cdef int64_t _refresh_after(self, Conn *c, HintState *h) noexcept:
        """publish_after of a hinted connection (set_hint): 0 unless published under a predicted lease."""
        cdef int64_t wait, fresh_until
        if h.state != HINTED | PUBLISHED or c.lease_source != LEASE_PREDICTED:
            return 0
        wait = <int64_t>ceil(c.predicted_lease * self.refresh_fraction)
        if wait < self.refresh_interval_ms:
            wait = self.refresh_interval_ms
        fresh_until = h.received + self.hint_ttl_ms + 1
        return h.last_published + wait if h.last_published + wait < fresh_until else fresh_until

    def set_publish_after(self, key, int64_t after_ms):
        """publish(now_ms) leaves the connection out while it is quiet (nothing
        moved in the interval) and now_ms < after_ms; 0: never left out."""
        cdef Conn *c = self._lookup(key)
        if c is not NULL:
            c.publish_after = after_ms

    def close(self, key, int64_t now_ms, int flags=FLAG_CLOSED):
        """Final report for this connection goes out with the next publish()."""
        cdef int32_t slot = self._slot_of(key)
        check_small("flags", flags)
        if slot < 0:
            return False
        self._close_slot(slot, now_ms, flags)
        return True

    cdef object _close_slot(self, int32_t slot, int64_t now_ms, int flags):
        cdef Conn *c = conn_at(self._chunks, slot)
        c.flags |= flags
        self.total_segments -= segment_count(c)
        self._closed.append(self._record(c))
        self.stats["expired" if flags & FLAG_EXPIRED else "closed"] += 1
        self._release(slot, c)

    # -- counters ----------------------------------------------------------------------------
    def update(self, key, int direction, uint64_t bytes_total, uint64_t packets_total,
               int64_t last_activity_ms, int source):
        cdef Conn *c = self._lookup(key)
        if c is NULL:
            self.stats["unknown_updates"] += 1
            return False
        if direction != DIR_IN and direction != DIR_OUT:
            raise ValueError("direction must be DIR_IN or DIR_OUT")
        check_small("source", source)
        if self._count_update(c, direction, bytes_total, packets_total, last_activity_ms, <uint8_t>source):
            self.stats["counter_resets"] += 1
        return True

    def update_batch(self, keys, int direction, const uint64_t[:] bytes_totals,
                     const uint64_t[:] packets_totals, const int64_t[:] last_activity_ms, int source):
        """update() for many connections of one direction at once (e.g. a kernel sample).

        keys: a list of bytes keys (any sequence is copied to a list first). The
        counter arguments are uint64/int64 buffers (array.array("Q"/"q"), numpy
        arrays) aligned with `keys`. Every key is checked before any update.
        Returns how many keys were known.
        """
        cdef Py_ssize_t n, i, a, b, w = prefetch_window
        cdef Py_ssize_t known = 0, unknown = 0, resets = 0
        cdef Py_ssize_t klen
        cdef const unsigned char *k
        cdef uint64_t hashes[64]  # RING
        cdef uint64_t h
        cdef Entry *table = self._table
        cdef uint32_t mask = self._mask
        cdef Conn **chunks = self._chunks
        cdef Conn *c
        cdef int32_t slot
        if not isinstance(keys, list):
            keys = list(keys)
        n = PyList_GET_SIZE(keys)
        if not n == bytes_totals.shape[0] == packets_totals.shape[0] == last_activity_ms.shape[0]:
            raise ValueError("keys and counters must have the same length")
        if direction != DIR_IN and direction != DIR_OUT:
            raise ValueError("direction must be DIR_IN or DIR_OUT")
        check_small("source", source)
        for i in range(n):  # all checked first, as the twin does
            item = <object>PyList_GET_ITEM(keys, i)
            if not PyBytes_Check(item) or not 1 <= PyBytes_GET_SIZE(item) <= C_KEY_MAX:
                key_bytes(item, &klen)  # raises
        try:
            for i in range(-2 * w, n):
                # stage 1, item i + 2w: hash, prefetch its table entry
                a = i + 2 * w
                if a < n:
                    k = <const unsigned char *>PyBytes_AS_STRING(<object>PyList_GET_ITEM(keys, a))
                    h = key_hash(k, PyBytes_GET_SIZE(<object>PyList_GET_ITEM(keys, a)))
                    hashes[a & (RING - 1)] = h
                    __builtin_prefetch(&table[<uint32_t>h & mask], 0, 3)
                # stage 2, item i + w: its entry is in cache: prefetch the Conn it
                # points to (line 0 for the key, the direction's DirHot line)
                b = i + w
                if w and 0 <= b < n:
                    prefetch_conn(table, mask, chunks, <uint32_t>hashes[b & (RING - 1)], direction)
                # stage 3, item i: look up and update
                if i < 0:
                    continue
                k = <const unsigned char *>PyBytes_AS_STRING(<object>PyList_GET_ITEM(keys, i))
                slot = self._find(k, PyBytes_GET_SIZE(<object>PyList_GET_ITEM(keys, i)), hashes[i & (RING - 1)])
                if slot < 0:
                    unknown += 1
                    continue
                known += 1
                c = conn_at(chunks, slot)
                resets += self._count_update(c, direction, bytes_totals[i], packets_totals[i],
                                             last_activity_ms[i], <uint8_t>source)
        finally:
            if unknown:
                self.stats["unknown_updates"] += unknown
            if resets:
                self.stats["counter_resets"] += resets
        return known

    def touch(self, key, int64_t now_ms):
        """The connection is known alive (e.g. seen in the kernel dump)."""
        cdef Conn *c = self._lookup(key)
        if c is not NULL and now_ms > c.last_seen:
            c.last_seen = now_ms

    def touch_batch(self, keys, int64_t now_ms):
        """touch() for many connections at once (e.g. every socket of a kernel
        sample): one call instead of one per connection. Every key is checked
        before any is touched, as in update_batch()."""
        cdef Py_ssize_t n, i, klen
        cdef Conn *c
        if not isinstance(keys, list):
            keys = list(keys)
        n = PyList_GET_SIZE(keys)
        for i in range(n):
            item = <object>PyList_GET_ITEM(keys, i)
            if not PyBytes_Check(item) or not 1 <= PyBytes_GET_SIZE(item) <= C_KEY_MAX:
                key_bytes(item, &klen)  # raises
        for i in range(n):
            c = self._lookup(<object>PyList_GET_ITEM(keys, i))
            if c is not NULL and now_ms > c.last_seen:
                c.last_seen = now_ms

    def apply_sample(self, sample, int64_t now_ms, int source, closing_states, bint close_missing):
        """Join a kernel sample to the tracked connections, in one call; returns (known, closed).

        The rules, shared with the twin, are in the twin's docstring
        (spoa/servernode/_tracker_py.py) and in docs/tracker.md. Here: pass 1
        reads and checks every entry of the dict (PyDict_Next; TcpSample's
        slots read at their offsets, found once per type) into a C array,
        hashing each key; pass 2 looks the keys up and applies them in
        update_batch's prefetch pipeline (table entry, then the Conn's line 0
        and both DirHot lines); then, if anything tracked is missing and
        missing ones are to close, one walk of the live list in registration
        order closes the slots not marked in a bitmap of the found ones.
        """
        cdef uint64_t closing[4]
        cdef Py_ssize_t n, i, a, b, pos = 0, w = prefetch_window
        cdef Py_ssize_t known = 0, resets = 0, closed = 0, klen
        cdef PyObject *key
        cdef PyObject *value
        cdef Pending *pending
        cdef Pending *p
        cdef bint generic = False
        cdef Entry *table = self._table
        cdef uint32_t mask = self._mask
        cdef Conn **chunks = self._chunks
        cdef Conn *c
        cdef int32_t slot, following
        cdef uint64_t *seen = NULL
        cdef int state
        if not isinstance(sample, dict):
            raise TypeError(f"sample must be a dict, not {type(sample).__name__}")
        check_small("source", source)
        state_mask(closing_states, closing)
        n = PyDict_Size(sample)
        pending = <Pending *>PyMem_Malloc(n * sizeof(Pending) + 1)
        if pending is NULL:
            raise MemoryError()
        try:
            # pass 1: every entry checked and converted; nothing changes yet
            i = 0
            while PyDict_Next(sample, &pos, &key, &value):
                if i == n:
                    raise RuntimeError("the sample changed while it was read")
                k = <object>key  # held while its value is read: getattr may run code that drops them
                v = <object>value
                if not PyBytes_Check(k):
                    raise TypeError(f"sample keys must be bytes, not {type(k).__name__}")
                p = &pending[i]
                generic |= read_sample(k, v, p.fields)
                p.key = key
                klen = bytes_size(key)
                if 1 <= klen <= C_KEY_MAX:
                    p.hash = key_hash(<const unsigned char *>bytes_data(key), klen)
                    p.slot = -1  # to look up
                else:
                    p.slot = -2  # no tracked key has that length
                i += 1
            if generic and i == n:
                # Python code ran (getattr): the keys kept must still be the dict's
                pos = 0
                i = 0
                while PyDict_Next(sample, &pos, &key, &value):
                    if i == n or pending[i].key != key:
                        i = -1
                        break
                    i += 1
            if i != n:
                raise RuntimeError("the sample changed while it was read")
            # pass 2: look up (pipelined as in update_batch) and apply
            for i in range(-2 * w, n):
                a = i + 2 * w  # stage 1: prefetch its table entry and key bytes
                if a < n and pending[a].slot == -1:
                    __builtin_prefetch(&table[<uint32_t>pending[a].hash & mask], 0, 3)
                    __builtin_prefetch(bytes_data(pending[a].key), 0, 3)
                b = i + w  # stage 2: its entry is in cache: prefetch its Conn
                if w and 0 <= b < n and pending[b].slot == -1:
                    prefetch_conn(table, mask, chunks, <uint32_t>pending[b].hash, -1)
                if i < 0:
                    continue
                p = &pending[i]  # stage 3: look up and apply
                if p.slot == -2:
                    continue
                slot = self._find(<const unsigned char *>bytes_data(p.key), bytes_size(p.key), p.hash)
                if slot < 0:
                    continue
                p.slot = slot
                known += 1
                c = conn_at(chunks, slot)
                state = <int>p.fields[F_STATE]
                if (closing[state >> 6] >> (state & 63)) & 1:
                    c.flags |= FLAG_CLOSING
                resets += self._count_update(c, DIR_IN_C, p.fields[1], p.fields[2],
                                             now_ms - <int64_t>p.fields[3], <uint8_t>source)
                resets += self._count_update(c, DIR_OUT_C, p.fields[4], p.fields[5],
                                             now_ms - <int64_t>p.fields[6], <uint8_t>source)
                if now_ms > c.last_seen:
                    c.last_seen = now_ms
            # the tracked ones missing from the sample, in registration order
            if known < self._count and (close_missing or known):
                seen = <uint64_t *>PyMem_Calloc(((self._nchunks << SLOT_BITS) >> 6) + 1, sizeof(uint64_t))
                if seen is NULL:
                    raise MemoryError()
                for i in range(n):
                    slot = pending[i].slot
                    if slot >= 0:
                        seen[slot >> 6] |= (<uint64_t>1) << (slot & 63)
                PyMem_Free(pending)
                pending = NULL
                slot = self._head
                while slot >= 0:
                    following = conn_at(self._chunks, slot).next
                    if not (seen[slot >> 6] >> (slot & 63)) & 1:
                        self._close_slot(slot, now_ms, FLAG_CLOSED)
                        closed += 1
                    slot = following
        finally:
            PyMem_Free(pending)
            PyMem_Free(seen)
            if resets:
                self.stats["counter_resets"] += resets
        return known, closed

    cdef int _count_update(self, Conn *c, int k, uint64_t bytes_total, uint64_t packets_total,
                           int64_t last_activity_ms, uint8_t source) except -1:
        """Apply one cumulative counter pair; 1 when it went backwards (a reset), else 0."""
        cdef DirHot *h = &c.hot[k]
        cdef uint64_t delta_bytes, delta_packets
        c.source = source
        if last_activity_ms > c.last_seen:
            c.last_seen = last_activity_ms
        if bytes_total < h.bytes_counter or packets_total < h.packets_counter:
            h.bytes_counter = bytes_total
            h.packets_counter = packets_total
            return 1
        delta_bytes = bytes_total - h.bytes_counter
        delta_packets = packets_total - h.packets_counter
        h.bytes_counter = bytes_total
        h.packets_counter = packets_total
        if delta_bytes == 0:  # packets with no bytes (pure ACKs, keep-alives): the tail's
            h.tail.packets_interval += delta_packets
        elif delta_bytes <= h.tail.capacity - h.tail.count:  # the common case: it all fits in the tail
            h.tail.count += delta_bytes
            h.tail.bytes_interval += delta_bytes
            h.tail.last_activity = last_activity_ms
            h.tail.packets_interval += delta_packets
        else:
            self._attribute(c, k, delta_bytes, delta_packets, last_activity_ms)
        return 0

    cdef int _attribute(self, Conn *c, int k, uint64_t delta_bytes, uint64_t delta_packets,
                        int64_t stamp) except -1:
        """Bytes that overflow the tail: fill it, open new tails, share the packets."""
        cdef DirCold *d = &c.cold[k]
        cdef Segment *tail = &c.hot[k].tail
        cdef uint64_t remaining = delta_bytes
        cdef uint64_t room, take
        cdef Py_ssize_t first = d.nolder, n, i
        cdef uint64_t *pieces
        cdef uint64_t *parts
        while remaining:
            room = tail.capacity - tail.count
            if room == 0:
                tail = self._push_tail(c, k, self._capacity(d.level))
                room = tail.capacity
            take = room if room < remaining else remaining
            tail.count += take
            tail.bytes_interval += take
            tail.last_activity = stamp
            remaining -= take
        # Segments first .. the tail received bytes: the first may have been
        # only topped up, the others filled from their start.
        n = d.nolder + 1 - first
        if n == 1:
            tail.packets_interval += delta_packets
        elif delta_packets:
            pieces = <uint64_t *>PyMem_Malloc(2 * n * sizeof(uint64_t))
            if pieces is NULL:
                raise MemoryError()
            parts = pieces + n
            remaining = delta_bytes
            for i in range(n - 1, -1, -1):
                # bytes of this update in segment first+i: all of it for every
                # segment but the first, whose older bytes predate the update
                take = seg_at(c, k, first + i).count
                if take > remaining:
                    take = remaining
                pieces[i] = take
                remaining -= take
            try:
                share(delta_packets, pieces, parts, n)
                for i in range(n):
                    seg_at(c, k, first + i).packets_interval += parts[i]
            finally:
                PyMem_Free(pieces)
        self._enforce_connection_bound(c)
        return 0

    # -- intervals --------------------------------------------------------------------------------
    def begin_interval(self, int64_t now_ms):
        cdef int32_t slot = self._head
        cdef Conn *c
        cdef DirCold *d
        cdef Py_ssize_t i
        cdef int k
        while slot >= 0:
            c = conn_at(self._chunks, slot)
            for k in range(2):
                d = &c.cold[k]
                d.interval_start = d.tail_start + c.hot[k].tail.count
                for i in range(d.nolder):
                    d.older[i].bytes_interval = 0
                    d.older[i].packets_interval = 0
                c.hot[k].tail.bytes_interval = 0
                c.hot[k].tail.packets_interval = 0
            slot = c.next

    def end_interval(self, int64_t now_ms):
        cdef int32_t slot = self._head
        cdef Conn *c
        cdef list expired = []
        while slot >= 0:
            c = conn_at(self._chunks, slot)
            self._adapt(c, 0, now_ms)
            self._adapt(c, 1, now_ms)
            self._enforce_connection_bound(c)
            if now_ms - c.last_seen >= self.expire_ms:
                expired.append(slot)
            slot = c.next
        for slot in expired:
            self._close_slot(slot, now_ms, FLAG_EXPIRED)
        self._enforce_total_bound()

    cdef int _adapt(self, Conn *c, int k, int64_t now_ms) except -1:
        cdef DirCold *d = &c.cold[k]
        cdef Segment *tail = &c.hot[k].tail
        cdef Segment *a
        cdef Segment *b
        cdef Py_ssize_t i
        if tail.bytes_interval >= self.split_bytes and tail.bytes_interval > 0:
            if self._capacity(d.level + 1) < self._capacity(d.level):
                d.level += 1
            if tail.capacity >= 2 * self.min_segment_size:
                self._split_tail(c, k)
        elif tail.bytes_interval == 0 and now_ms - tail.last_activity >= self.idle_ms:
            if self._capacity(d.level - 1) > self._capacity(d.level):
                d.level -= 1
        i = 0
        while i < d.nolder:  # while segment i has a successor
            a = seg_at(c, k, i)
            b = seg_at(c, k, i + 1)
            if self._idle(a, now_ms) and self._idle(b, now_ms) and a.capacity + b.capacity <= self.max_segment_size:
                self._merge_pair(c, k, i)
                self.stats["merges"] += 1
            else:
                i += 1
        return 0

    cdef int _split_tail(self, Conn *c, int k) except -1:
        """The tail's first half joins the older segments, its second half is the new tail."""
        cdef DirCold *d = &c.cold[k]
        cdef Segment *tail = &c.hot[k].tail
        cdef uint64_t half = tail.capacity // 2
        cdef uint64_t second_capacity = tail.capacity - half
        cdef uint64_t second_count
        cdef uint64_t tail_start = d.tail_start
        cdef uint64_t lo = d.interval_start
        cdef uint64_t hi = d.tail_start + tail.count
        cdef uint64_t first_end, first_begin, first_bytes, second_bytes
        cdef uint64_t weights[2]
        cdef uint64_t parts[2]
        cdef uint64_t packets = tail.packets_interval
        cdef uint64_t interval_bytes = tail.bytes_interval
        cdef int64_t stamp = tail.last_activity
        cdef Segment *second
        self.stats["splits"] += 1
        if tail.count <= half:
            # Nothing lies past the half yet: narrowing the tail is the split.
            tail.capacity = half
            tail.level = <int8_t>self._level_of(half)
            return 0
        second_count = tail.count - half
        first_end = tail_start + half
        if hi < first_end:
            first_end = hi
        first_begin = lo if lo > tail_start else tail_start
        first_bytes = first_end - first_begin if first_end > first_begin else 0
        second_bytes = interval_bytes - first_bytes
        weights[0] = first_bytes
        weights[1] = second_bytes
        share(packets, weights, parts, 2)
        tail.count = half
        tail.capacity = half
        tail.level = <int8_t>self._level_of(half)
        tail.bytes_interval = first_bytes
        tail.packets_interval = parts[0]
        second = self._push_tail(c, k, second_capacity)
        second.count = second_count
        second.bytes_interval = second_bytes
        second.packets_interval = parts[1]
        second.last_activity = stamp
        return 0

    cdef bint _idle(self, Segment *s, int64_t now_ms) noexcept:
        return (s.count == s.capacity and s.bytes_interval == 0 and s.packets_interval == 0
                and now_ms - s.last_activity >= self.idle_ms)

    cdef void _merge_pair(self, Conn *c, int k, Py_ssize_t i) noexcept:
        """Segments i and i + 1 of direction k become one (the tail, if i + 1 was)."""
        cdef DirCold *d = &c.cold[k]
        cdef Segment *a = &d.older[i]
        cdef Segment *b = seg_at(c, k, i + 1)
        b.count += a.count
        b.capacity += a.capacity
        b.bytes_interval += a.bytes_interval
        b.packets_interval += a.packets_interval
        if a.last_activity > b.last_activity:
            b.last_activity = a.last_activity
        b.level = <int8_t>self._level_of(b.capacity)
        if b == &c.hot[k].tail:
            d.tail_start -= a.count
        # a's slot goes: the older ones after it (b, if older) move down one
        memmove(a, a + 1, (d.nolder - i - 1) * sizeof(Segment))
        d.nolder -= 1
        self.total_segments -= 1
        if d.nolder == 0:  # the tail alone again: inline only
            self._overflow_bytes -= free_older(d)

    cdef int _coarsen_once(self, Conn *c) except -1:
        """Merge the connection's adjacent pair with the smallest combined byte_count; 0 if none."""
        cdef int k, best_dir = -1
        cdef Py_ssize_t i, best_i = 0
        cdef uint64_t size, best_size = 0
        for k in range(2):
            for i in range(c.cold[k].nolder):
                size = seg_at(c, k, i).count + seg_at(c, k, i + 1).count
                if best_dir < 0 or size < best_size:
                    best_dir, best_i, best_size = k, i, size
        if best_dir < 0:
            return 0
        self._merge_pair(c, best_dir, best_i)
        self.stats["merges"] += 1
        self.stats["coarsened"] += 1
        return 1

    cdef int _enforce_connection_bound(self, Conn *c) except -1:
        while segment_count(c) > self.max_segments_per_connection:
            if not self._coarsen_once(c):
                break
        return 0

    cdef int _enforce_total_bound(self) except -1:
        """Coarsen the connections with the most segments first (ties: registration order)."""
        cdef Py_ssize_t n = self._count, i
        cdef uint64_t *order
        cdef int32_t *slots
        cdef int32_t slot
        cdef Conn *c
        cdef uint64_t count
        if self.total_segments <= self.max_total_segments:
            return 0
        order = <uint64_t *>PyMem_Malloc(n * (sizeof(uint64_t) + sizeof(int32_t)) + 1)
        if order is NULL:
            raise MemoryError()
        slots = <int32_t *>(order + n)
        try:
            # sort key: segment count descending, then registration order (the
            # twin's stable sort); counts above 2^32 - 1 cannot fit in memory
            slot = self._head
            for i in range(n):
                c = conn_at(self._chunks, slot)
                slots[i] = slot
                count = segment_count(c)
                order[i] = ((0xFFFFFFFF - count) << 32) | <uint64_t>i
                slot = c.next
            qsort(order, n, sizeof(uint64_t), cmp_u64)
            for i in range(n):
                c = conn_at(self._chunks, slots[order[i] & 0xFFFFFFFF])
                while self.total_segments > self.max_total_segments and self._coarsen_once(c):
                    pass
                if self.total_segments <= self.max_total_segments:
                    break
        finally:
            PyMem_Free(order)
        return 0


    # -- output ----------------------------------------------------------------------------------
    cdef object _record(self, Conn *c):
        cdef list segments = []
        cdef Segment *s
        cdef Py_ssize_t i
        cdef uint64_t start
        cdef int k
        for k in range(2):
            start = 0
            for i in range(c.cold[k].nolder + 1):
                s = seg_at(c, k, i)
                segments.append(new_segment(k, start, s.count, s.bytes_interval, s.packets_interval,
                                            s.last_activity, s.level))
                start += s.count
        return new_connection((
            PyBytes_FromStringAndSize(<char *>c.conn_id, 16),
            address_text(c.cold[0].addr, is_v4_mapped(c.cold[0].addr)), c.cold[0].port,
            address_text(c.cold[1].addr, is_v4_mapped(c.cold[1].addr)), c.cold[1].port,
            self._frontends[c.frontend], c.flags, c.source,
            max(c.cold[0].level, c.cold[1].level), c.requested_lease, c.predicted_lease, c.lease_source,
            c.cold[0].tail_start + c.hot[0].tail.count, c.cold[1].tail_start + c.hot[1].tail.count,
            tuple(segments),
        ))

    def snapshot(self, key):
        cdef Conn *c = self._lookup(key)
        return None if c is NULL else self._record(c)

    def publish(self, now_ms=None):
        """Records of every live connection, then the final ones closed since last time.

        With now_ms, a live connection that was quiet this interval and whose
        set_publish_after() time is still ahead is left out (counted `deferred`):
        its record is not even built; one whose record is built counts as
        published at now_ms (its next refresh time follows, see set_hint)."""
        cdef list out = []
        self._publish_into(out, None, now_ms is not None, now_ms if now_ms is not None else 0)
        return out

    def publish_batch(self, int64_t now_ms):
        """publish(now_ms) in wire form: a spoa.wire.packet.RecordBatch of the same records, the
        same bytes encode_packet would write for them, written from the slab (no record object
        per live connection). Errors are publish() + RecordBatch.from_records()'s: every due
        connection counts as published even when one record cannot be encoded."""
        cdef RecordBatch batch = RecordBatch.__new__(RecordBatch)
        self._publish_into(None, batch, True, now_ms)
        return batch

    cdef int _publish_into(self, list out, RecordBatch batch, bint filtering, int64_t now) except -1:
        """publish()'s walk: each live connection due goes to `out` as a record, or to `batch`
        in wire form; then the closed ones. A record that cannot be encoded stops the batch's
        writing, not the walk (so the slab ends as publish() leaves it); its error is raised last."""
        cdef int32_t slot = self._head
        cdef Conn *c
        cdef Py_ssize_t deferred = 0
        cdef HintState *h
        cdef object error = None
        while slot >= 0:
            c = conn_at(self._chunks, slot)
            if filtering and c.publish_after > now and quiet(c):
                deferred += 1
            else:
                if batch is None:
                    out.append(self._record(c))
                elif error is None:
                    try:
                        self._put_wire(batch, c)
                    except (TypeError, ValueError) as exc:
                        error = exc
                if filtering:
                    h = hint_at(self._hint_chunks, slot)
                    h.state |= PUBLISHED
                    h.last_published = now
                    if h.state & HINTED:
                        c.publish_after = self._refresh_after(c, h)
            slot = c.next
        if deferred:
            self.stats["deferred"] += deferred
        closed, self._closed = self._closed, []
        if batch is None:
            out.extend(closed)
        elif error is None:
            batch.add_records(closed)
        if error is not None:
            raise error
        return 0

    cdef int _put_wire(self, RecordBatch batch, Conn *c) except -1:
        """c's record appended to batch as encode_packet writes it (docs/publishing-packet.md
        §4). What the wire cannot carry (a frontend name over 255 bytes of UTF-8, addresses of
        two families, a negative activity stamp) takes the record path, which raises the
        packet codec's own error for it."""
        cdef object frontend = <object>PyList_GET_ITEM(self._frontend_wire, c.frontend)
        cdef Py_ssize_t flen, nseg = segment_count(c), size, i
        cdef bint v4 = is_v4_mapped(c.cold[0].addr)
        cdef uint8_t *p
        cdef Segment *s
        cdef uint64_t start
        cdef int k
        if frontend is None or v4 != is_v4_mapped(c.cold[1].addr):
            batch.add_records((self._record(c),))
            return 0
        flen = PyBytes_GET_SIZE(frontend)
        size = C_CONN + flen + nseg * C_SEG
        p = batch.reserve(size)
        memcpy(p, c.conn_id, 16)
        store_be64(p + 16, c.cold[0].tail_start + c.hot[0].tail.count)
        store_be64(p + 24, c.cold[1].tail_start + c.hot[1].tail.count)
        memcpy(p + 32, c.cold[0].addr, 16)  # IPv4 as IPv4-mapped: the wire's form too
        memcpy(p + 48, c.cold[1].addr, 16)
        store_be16(p + 64, c.cold[0].port)
        store_be16(p + 66, c.cold[1].port)
        store_be32(p + 68, c.requested_lease)
        store_be32(p + 72, c.predicted_lease)
        p[76] = FAMILY_IPV4 if v4 else FAMILY_IPV6
        p[77] = c.flags
        p[78] = c.source
        p[79] = c.lease_source
        p[80] = <uint8_t>(c.cold[0].level if c.cold[0].level > c.cold[1].level else c.cold[1].level)
        p[81] = <uint8_t>flen
        store_be16(p + 82, nseg)
        memcpy(p + C_CONN, PyBytes_AS_STRING(frontend), flen)
        p += C_CONN + flen
        for k in range(2):
            start = 0
            for i in range(c.cold[k].nolder + 1):
                s = seg_at(c, k, i)
                if s.last_activity < 0:  # not committed: the record path raises for it
                    batch.add_records((self._record(c),))
                    return 0
                p[0] = <uint8_t>k
                p[1] = <uint8_t>s.level
                store_be64(p + 2, start)
                store_be64(p + 10, s.count)
                store_be64(p + 18, s.bytes_interval)
                store_be64(p + 26, s.packets_interval)
                store_be64(p + 34, <uint64_t>s.last_activity)
                start += s.count
                p += C_SEG
        batch.commit(size)
        return 0

    def keys(self):
        """Live keys in registration order (the twin's dict order)."""
        cdef list out = []
        cdef int32_t slot = self._head
        cdef Conn *c
        while slot >= 0:
            c = conn_at(self._chunks, slot)
            out.append(PyBytes_FromStringAndSize(<char *>c.key, c.key_len))
            slot = c.next
        return out

    def __len__(self):
        return self._count

    def __contains__(self, key):
        return self._lookup(key) is not NULL
