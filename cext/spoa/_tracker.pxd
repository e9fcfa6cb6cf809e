# Declarations of the segment tracker (bodies in _tracker.pyx; rules in the
# docstring of its pure-Python twin spoa/_tracker_py.py and in docs/tracker.md).

from libc.stdint cimport int32_t, int64_t, uint64_t


cdef struct Segment:
    uint64_t start              # first byte of the segment in its direction's stream
    uint64_t count              # bytes of the stream it covers so far (byte_count)
    uint64_t capacity           # nominal size; new bytes go elsewhere once count == capacity
    uint64_t bytes_interval     # bytes that landed in it during this interval
    uint64_t packets_interval   # packets attributed to it during this interval
    int64_t last_activity       # unix ms of the last byte that landed in it (0: never)
    int32_t level               # bit_length(segment_size) - bit_length(capacity)


cdef struct Direction:
    Segment *segs               # segments in offset order; the last one is the tail
    Py_ssize_t nsegs            # segments in use
    Py_ssize_t allocated        # slots allocated in segs
    uint64_t total              # bytes attributed so far (the sum of every count)
    uint64_t bytes_counter      # last cumulative byte counter seen
    uint64_t packets_counter    # last cumulative packet counter seen
    uint64_t interval_start     # total when the interval began
    int32_t level               # level used to size the next new segment


cdef class Connection:
    cdef object key             # the caller's key (e.g. the kernel 4-tuple)
    cdef unsigned char conn_id[16]  # connection id (kept inline: no bytes object per connection)
    cdef str src                # client address
    cdef str dst                # frontend address
    cdef str frontend           # frontend name
    cdef int src_port           # client port
    cdef int dst_port           # frontend port
    cdef int flags              # ConnFlags
    cdef int source             # CounterSource of the last update
    cdef int lease_source       # LeaseSource of the lease in force
    cdef int64_t last_seen      # unix ms the connection was last known alive
    cdef uint64_t requested_lease  # lease the server node asks for, ms
    cdef uint64_t predicted_lease  # last hint from the LB node, ms
    cdef Direction dirs[2]      # DIR_IN, DIR_OUT


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
    cdef dict _conns                           # key -> Connection
    cdef list _closed                          # final records waiting for publish()

    cdef uint64_t _capacity(self, int level)
    cdef int _level_of(self, uint64_t capacity)
    cdef int _init_direction(self, Direction *d) except -1
    cdef Segment *_append(self, Direction *d, uint64_t start, uint64_t capacity) except NULL
    cdef int _attribute(self, Connection conn, Direction *d, uint64_t delta_bytes, uint64_t delta_packets,
                        int64_t stamp) except -1
    cdef int _adapt(self, Direction *d, int64_t now_ms) except -1
    cdef int _split_tail(self, Direction *d) except -1
    cdef bint _idle(self, Segment *s, int64_t now_ms)
    cdef void _merge_pair(self, Direction *d, Py_ssize_t i)
    cdef bint _coarsen_once(self, Connection conn)
    cdef void _enforce_connection_bound(self, Connection conn)
    cdef object _record(self, Connection conn)
