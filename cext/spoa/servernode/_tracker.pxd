# Declarations of the segment tracker (bodies in _tracker.pyx; rules in the
# docstring of its pure-Python twin spoa/servernode/_tracker_py.py and in docs/tracker.md,
# memory layout in its "Memory layout and speed" section).

cimport cython
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from spoa.wire._packet cimport RecordBatch


cdef struct Segment:
    # No start offset: segments tile [0, total), so a start is the sum of the counts before it.
    uint64_t count              # bytes of the stream it covers so far (byte_count)
    uint64_t capacity           # nominal size; new bytes go elsewhere once count == capacity
    uint64_t bytes_interval     # bytes that landed in it during this interval
    uint64_t packets_interval   # packets attributed to it during this interval
    int64_t last_activity       # unix ms of the last byte that landed in it (0: never)
    int8_t level                # bit_length(segment_size) - bit_length(capacity): within +-64


cdef struct DirHot:
    # One cache line (line-aligned in Conn): all an update of a direction reads and writes.
    uint64_t bytes_counter      # last cumulative byte counter seen
    uint64_t packets_counter    # last cumulative packet counter seen
    Segment tail                # the last segment, where new bytes land: inline, as most directions have no other


cdef struct DirCold:
    Segment *older              # segments before the tail, in offset order (malloc'd, after a count header); or NULL
    int32_t nolder              # segments in older
    int8_t level                # level used to size the next new segment
    uint16_t port               # port of this direction's sender: client (in), frontend (out)
    uint64_t tail_start         # the tail's start offset (the older counts' sum); total = tail_start + tail.count
    uint64_t interval_start     # total when the interval began
    unsigned char addr[16]      # address of the sender, packed (IPv4 stored IPv4-mapped)


cdef struct Conn:
    # 320 bytes = 5 cache lines; chunks are 2 MiB-aligned, so every Conn is line-aligned:
    # a lookup reads line 0, an update also one DirHot line.
    unsigned char key[40]       # the caller's key bytes (KEY_MAX; the product key is 36)
    uint8_t key_len             # 1..KEY_MAX
    uint8_t flags               # ConnFlags
    uint8_t source              # CounterSource of the last update
    uint8_t lease_source        # LeaseSource of the lease in force
    uint32_t frontend           # index into the tracker's interned frontend names
    int32_t prev                # previous live slot in registration order (-1: head)
    int32_t next                # next live slot in registration order (-1: tail); free-list link when free
    int64_t last_seen           # unix ms the connection was last known alive
    DirHot hot[2]               # DIR_IN (client -> HAProxy), DIR_OUT
    DirCold cold[2]             # the same directions' other state (in: addr/port are src; out: dst)
    unsigned char conn_id[16]   # connection id
    uint32_t requested_lease    # lease the server node asks for, ms (u32, as in the packet)
    uint32_t predicted_lease    # last hint from the LB node, ms (u32, as in the packet)
    int64_t publish_after       # unix ms before which publish(now) leaves it out while quiet (0: never)


cdef struct HintState:
    # The agent's lease state of a connection, slab-parallel: one per slot, at
    # the same chunk and index as its Conn (which stays 5 lines). 24 bytes.
    int64_t received            # unix ms the last hint came (valid with HINTED)
    int64_t last_published      # unix ms publish(now) last built its record (valid with PUBLISHED)
    uint8_t state               # HINTED | PUBLISHED
    uint8_t source              # LeaseSource the hint names (its lease is Conn.predicted_lease)
    int8_t level                # granularity level the hint suggests
    uint8_t anomaly             # the hint's anomaly flag, 0 or 1


cdef struct Entry:
    uint32_t tag                # low 32 bits of the key's hash: home bucket (tag & mask) and a fingerprint
    uint32_t slot1              # slot + 1 of the connection (0: empty entry)


@cython.final
cdef class SegmentTracker:
    cdef readonly uint64_t segment_size        # level-0 segment size
    cdef readonly uint64_t min_segment_size    # splits stop here
    cdef readonly uint64_t max_segment_size    # idle merges stop here
    cdef readonly uint64_t split_bytes         # interval bytes that make a tail hot
    cdef readonly int64_t idle_ms              # quiet time that makes a segment idle
    cdef readonly Py_ssize_t max_segments_per_connection  # per-connection bound (coarsens beyond)
    cdef readonly Py_ssize_t max_total_segments  # tracker-wide bound (coarsens beyond)
    cdef readonly Py_ssize_t max_connections   # registrations beyond are refused (counted)
    cdef readonly int64_t expire_ms            # unseen this long: closed as expired
    cdef readonly Py_ssize_t total_segments    # segments across live connections
    cdef readonly dict stats                   # event counters (registered, splits, merges...)
    # refresh cadence under a predicted lease (set_refresh)
    cdef readonly int64_t refresh_interval_ms  # never sooner than every interval
    cdef readonly double refresh_fraction      # a quiet connection goes out every lease * this
    cdef readonly int64_t hint_ttl_ms          # and no later than its hint stays fresh
    cdef list _closed                          # final records waiting for publish()
    cdef list _frontends                       # interned frontend names, by index
    cdef list _frontend_wire                   # the same as the packet carries them (UTF-8 bytes; None: it cannot)
    cdef dict _frontend_ids                    # frontend name -> index in _frontends
    # slab
    cdef Conn **_chunks                        # CHUNK_BYTES regions of SLOTS_PER_CHUNK structs, never moved
    cdef HintState **_hint_chunks              # one HintState region per chunk, indexed as the chunk
    cdef Py_ssize_t _nchunks                   # chunks mapped
    cdef Py_ssize_t _chunks_allocated          # pointers allocated in _chunks
    cdef int32_t _fresh                        # slots handed out in the last chunk (the rest never used)
    cdef int32_t _free                         # head of the free-slot list (-1: none)
    cdef int32_t _head                         # oldest live slot (-1: none)
    cdef int32_t _tail                         # newest live slot (-1: none)
    cdef Py_ssize_t _count                     # live connections
    cdef Py_ssize_t _overflow_bytes            # bytes in malloc'd segment arrays
    # hash table
    cdef Entry *_table                         # open addressing, linear probing, load <= 1/2
    cdef uint32_t _mask                        # table size - 1 (a power of two)
    cdef uint32_t *_ids                        # conn_id -> slot + 1, same size and probing; no tag:
                                               # hints are rarer than updates, 4 bytes a slot instead of 8

    # The lease answer's registration in C (spoa.servernode._lease_answer): register() is
    # its checks on Python objects, then _register_raw; _renew is register()'s common case
    # (the connection is known) without a frontend name to build.
    cdef int32_t _renew(self, const unsigned char *key, Py_ssize_t n, const unsigned char *conn_id,
                        int64_t now_ms) noexcept
    cdef int32_t _register_raw(self, const unsigned char *key, Py_ssize_t n, const unsigned char *conn_id,
                               const unsigned char *src, uint16_t src_port, const unsigned char *dst,
                               uint16_t dst_port, str frontend, int64_t now_ms) except -2
    cdef int32_t _slot_of(self, object key) except? -2
    # hint() of a live slot: False without a hint, else *h and *lease_ms (Conn.predicted_lease) set
    cdef bint _hint_of(self, int32_t slot, HintState *h, uint32_t *lease_ms) noexcept
    cdef Conn *_new_slot(self, int32_t *slot) except NULL
    cdef int32_t _find(self, const unsigned char *key, Py_ssize_t n, uint64_t h) noexcept
    cdef void _table_insert(self, uint32_t tag, int32_t slot) noexcept
    cdef Conn *_lookup(self, object key) except? NULL
    cdef int _grow_table(self) except -1
    cdef void _table_delete(self, int32_t slot, Conn *c) noexcept
    cdef int32_t _find_id(self, const unsigned char *conn_id) noexcept
    cdef void _index_id(self, int32_t slot, Conn *c) noexcept
    cdef void _unindex_id(self, int32_t slot, Conn *c) noexcept
    cdef void _release(self, int32_t slot, Conn *c) noexcept
    cdef object _close_slot(self, int32_t slot, int64_t now_ms, int flags)
    cdef uint64_t _capacity(self, int level) noexcept
    cdef int _level_of(self, uint64_t capacity) noexcept
    cdef void _init_direction(self, Conn *c, int k) noexcept
    cdef Segment *_push_tail(self, Conn *c, int k, uint64_t capacity) except NULL
    cdef int _count_update(self, Conn *c, int k, uint64_t bytes_total, uint64_t packets_total,
                           int64_t last_activity_ms, uint8_t source) except -1
    cdef int _attribute(self, Conn *c, int k, uint64_t delta_bytes, uint64_t delta_packets,
                        int64_t stamp) except -1
    cdef int _adapt(self, Conn *c, int k, int64_t now_ms) except -1
    cdef int _split_tail(self, Conn *c, int k) except -1
    cdef bint _idle(self, Segment *s, int64_t now_ms) noexcept
    cdef void _merge_pair(self, Conn *c, int k, Py_ssize_t i) noexcept
    cdef int _coarsen_once(self, Conn *c) except -1
    cdef int _enforce_connection_bound(self, Conn *c) except -1
    cdef int _enforce_total_bound(self) except -1
    cdef int64_t _refresh_after(self, Conn *c, HintState *h) noexcept
    cdef object _record(self, Conn *c)
    cdef int _publish_into(self, list out, RecordBatch batch, bint filtering, int64_t now) except -1
    cdef int _put_wire(self, RecordBatch batch, Conn *c) except -1
