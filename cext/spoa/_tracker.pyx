# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Segment tracker, compiled. Same API and behaviour as spoa/_tracker_py.py.

Segments are C structs in one array per direction, so a connection with one
segment per direction costs a few hundred bytes, and an update is a handful of
integer operations.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport int32_t, int64_t, uint64_t
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcmp, memcpy, memmove

from spoa.records import (
    DIR_IN,
    DIR_OUT,
    ConnectionRecord,
    ConnFlags,
    CounterSource,
    LeaseSource,
    SegmentRecord,
)

cdef extern from *:
    # Packet shares multiply packets by bytes: past 2^64 for big intervals.
    ctypedef unsigned long long u128 "unsigned __int128"

cdef int FLAG_CLOSED = ConnFlags.CLOSED
cdef int FLAG_CLOSING = ConnFlags.CLOSING
cdef int FLAG_EXPIRED = ConnFlags.EXPIRED
cdef int SOURCE_NONE = CounterSource.NONE
cdef int LEASE_STANDARD = LeaseSource.STANDARD
# Most connections never need a second segment per direction.
cdef Py_ssize_t INITIAL_SLOTS = 1


cdef inline int bit_length(uint64_t value):
    return 0 if value == 0 else 64 - __builtin_clzll(value)

cdef extern from *:
    int __builtin_clzll(unsigned long long)


cdef void share(uint64_t total, uint64_t *weights, uint64_t *parts, Py_ssize_t n):
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
        return
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


def share_py(total, weights):
    """share() for tests: the same split as spoa._tracker_py.share."""
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


cdef class Connection:
    def __dealloc__(self):
        PyMem_Free(self.dirs[0].segs)
        PyMem_Free(self.dirs[1].segs)


cdef class SegmentTracker:
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
        self._conns = {}
        self._closed = []
        self.total_segments = 0
        self.stats = dict.fromkeys(
            ("registered", "refused", "closed", "expired", "counter_resets", "splits", "merges", "coarsened",
             "unknown_updates"), 0
        )

    # -- sizes and levels ---------------------------------------------------------
    cdef uint64_t _capacity(self, int level):
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

    cdef int _level_of(self, uint64_t capacity):
        return bit_length(self.segment_size) - bit_length(capacity)

    cdef int _init_direction(self, Direction *d) except -1:
        cdef uint64_t base = self._capacity(0)
        d.segs = NULL
        d.nsegs = 0
        d.allocated = 0
        d.total = 0
        d.bytes_counter = 0
        d.packets_counter = 0
        d.interval_start = 0
        d.level = 0
        self._append(d, 0, base)
        return 0

    cdef Segment *_append(self, Direction *d, uint64_t start, uint64_t capacity) except NULL:
        cdef Py_ssize_t slots
        cdef Segment *grown
        cdef Segment *s
        if d.nsegs == d.allocated:
            slots = d.allocated * 2 if d.allocated else INITIAL_SLOTS
            grown = <Segment *>PyMem_Realloc(d.segs, slots * sizeof(Segment))
            if grown is NULL:
                raise MemoryError()
            d.segs = grown
            d.allocated = slots
        s = &d.segs[d.nsegs]
        d.nsegs += 1
        s.start = start
        s.count = 0
        s.capacity = capacity
        s.bytes_interval = 0
        s.packets_interval = 0
        s.last_activity = 0
        s.level = self._level_of(capacity)
        self.total_segments += 1
        return s

    # -- registration and lifecycle ----------------------------------------------------
    def register(self, key, bytes conn_id, str src, int src_port, str dst, int dst_port, str frontend,
                 int64_t now_ms):
        cdef Connection conn = self._conns.get(key)
        if PyBytes_GET_SIZE(conn_id) != 16:
            raise ValueError("conn_id must be 16 bytes")
        if conn is not None:
            if memcmp(conn.conn_id, PyBytes_AS_STRING(conn_id), 16) == 0:
                conn.last_seen = now_ms
                return True
            self.close(key, now_ms)  # the 4-tuple was reused: the old connection is over
        if len(self._conns) >= self.max_connections:
            self.stats["refused"] += 1
            return False
        conn = Connection.__new__(Connection)
        conn.key = key
        memcpy(conn.conn_id, PyBytes_AS_STRING(conn_id), 16)
        conn.src = src
        conn.src_port = src_port
        conn.dst = dst
        conn.dst_port = dst_port
        conn.frontend = frontend
        conn.flags = 0
        conn.source = SOURCE_NONE
        conn.last_seen = now_ms
        conn.requested_lease = 0
        conn.predicted_lease = 0
        conn.lease_source = LEASE_STANDARD
        self._init_direction(&conn.dirs[0])
        self._init_direction(&conn.dirs[1])
        self._conns[key] = conn
        self.stats["registered"] += 1
        return True

    def set_closing(self, key):
        cdef Connection conn = self._conns.get(key)
        if conn is not None:
            conn.flags |= FLAG_CLOSING

    def set_lease(self, key, uint64_t requested_ms, uint64_t predicted_ms, int lease_source):
        cdef Connection conn = self._conns.get(key)
        if conn is not None:
            conn.requested_lease = requested_ms
            conn.predicted_lease = predicted_ms
            conn.lease_source = lease_source

    def close(self, key, int64_t now_ms, int flags=FLAG_CLOSED):
        """Final report for this connection goes out with the next publish()."""
        cdef Connection conn = self._conns.pop(key, None)
        if conn is None:
            return False
        conn.flags |= flags
        self.total_segments -= conn.dirs[0].nsegs + conn.dirs[1].nsegs
        self._closed.append(self._record(conn))
        self.stats["expired" if flags & FLAG_EXPIRED else "closed"] += 1
        return True

    # -- counters ----------------------------------------------------------------------------
    def update(self, key, int direction, uint64_t bytes_total, uint64_t packets_total,
               int64_t last_activity_ms, int source):
        cdef Connection conn = self._conns.get(key)
        cdef Direction *d
        cdef uint64_t delta_bytes, delta_packets
        if conn is None:
            self.stats["unknown_updates"] += 1
            return False
        if direction != DIR_IN and direction != DIR_OUT:
            raise ValueError("direction must be DIR_IN or DIR_OUT")
        conn.source = source
        if last_activity_ms > conn.last_seen:
            conn.last_seen = last_activity_ms
        d = &conn.dirs[direction]
        if bytes_total < d.bytes_counter or packets_total < d.packets_counter:
            self.stats["counter_resets"] += 1
            d.bytes_counter = bytes_total
            d.packets_counter = packets_total
            return True
        delta_bytes = bytes_total - d.bytes_counter
        delta_packets = packets_total - d.packets_counter
        d.bytes_counter = bytes_total
        d.packets_counter = packets_total
        if delta_bytes or delta_packets:
            self._attribute(conn, d, delta_bytes, delta_packets, last_activity_ms)
        return True

    def update_batch(self, list keys, int direction, const uint64_t[:] bytes_totals,
                     const uint64_t[:] packets_totals, const int64_t[:] last_activity_ms, int source):
        """update() for many connections of one direction at once (e.g. a kernel sample).

        The counter arguments are uint64/int64 buffers (array.array("Q"/"q"),
        numpy arrays) aligned with `keys`. Returns how many keys were known.
        """
        cdef Py_ssize_t i, n = len(keys)
        cdef Py_ssize_t known = 0
        cdef Connection conn
        cdef Direction *d
        cdef uint64_t delta_bytes, delta_packets
        cdef dict conns = self._conns
        if not n == bytes_totals.shape[0] == packets_totals.shape[0] == last_activity_ms.shape[0]:
            raise ValueError("keys and counters must have the same length")
        if direction != DIR_IN and direction != DIR_OUT:
            raise ValueError("direction must be DIR_IN or DIR_OUT")
        for i in range(n):
            conn = conns.get(keys[i])
            if conn is None:
                self.stats["unknown_updates"] += 1
                continue
            known += 1
            conn.source = source
            if last_activity_ms[i] > conn.last_seen:
                conn.last_seen = last_activity_ms[i]
            d = &conn.dirs[direction]
            if bytes_totals[i] < d.bytes_counter or packets_totals[i] < d.packets_counter:
                self.stats["counter_resets"] += 1
                d.bytes_counter = bytes_totals[i]
                d.packets_counter = packets_totals[i]
                continue
            delta_bytes = bytes_totals[i] - d.bytes_counter
            delta_packets = packets_totals[i] - d.packets_counter
            d.bytes_counter = bytes_totals[i]
            d.packets_counter = packets_totals[i]
            if delta_bytes or delta_packets:
                self._attribute(conn, d, delta_bytes, delta_packets, last_activity_ms[i])
        return known

    def touch(self, key, int64_t now_ms):
        """The connection is known alive (e.g. seen in the kernel dump)."""
        cdef Connection conn = self._conns.get(key)
        if conn is not None and now_ms > conn.last_seen:
            conn.last_seen = now_ms

    cdef int _attribute(self, Connection conn, Direction *d, uint64_t delta_bytes, uint64_t delta_packets,
                        int64_t stamp) except -1:
        cdef Segment *tail
        cdef uint64_t remaining = delta_bytes
        cdef uint64_t room, take, cap
        cdef Py_ssize_t first, n, i
        cdef uint64_t one_piece[1]
        cdef uint64_t *pieces
        cdef uint64_t *parts
        if delta_bytes == 0:
            d.segs[d.nsegs - 1].packets_interval += delta_packets
            return 0
        first = d.nsegs - 1
        while remaining:
            tail = &d.segs[d.nsegs - 1]
            room = tail.capacity - tail.count
            if room == 0:
                cap = self._capacity(d.level)
                tail = self._append(d, tail.start + tail.count, cap)
                room = cap
            take = room if room < remaining else remaining
            tail.count += take
            tail.bytes_interval += take
            tail.last_activity = stamp
            remaining -= take
        d.total += delta_bytes
        # Segments first .. nsegs-1 received bytes: the first may have been
        # only topped up, the others filled from their start.
        n = d.nsegs - first
        if n == 1:
            d.segs[first].packets_interval += delta_packets
        elif delta_packets:
            pieces = <uint64_t *>PyMem_Malloc(2 * n * sizeof(uint64_t))
            if pieces is NULL:
                raise MemoryError()
            parts = pieces + n
            remaining = delta_bytes
            for i in range(n - 1, -1, -1):
                # bytes of this update in segment first+i: all of it for every
                # segment but the first, whose older bytes predate the update
                take = d.segs[first + i].count
                if take > remaining:
                    take = remaining
                pieces[i] = take
                remaining -= take
            share(delta_packets, pieces, parts, n)
            for i in range(n):
                d.segs[first + i].packets_interval += parts[i]
            PyMem_Free(pieces)
        self._enforce_connection_bound(conn)
        return 0

    # -- intervals --------------------------------------------------------------------------------
    def begin_interval(self, int64_t now_ms):
        cdef Connection conn
        cdef Direction *d
        cdef Py_ssize_t i
        cdef int k
        for conn in self._conns.values():
            for k in range(2):
                d = &conn.dirs[k]
                d.interval_start = d.total
                for i in range(d.nsegs):
                    d.segs[i].bytes_interval = 0
                    d.segs[i].packets_interval = 0

    def end_interval(self, int64_t now_ms):
        cdef Connection conn
        cdef list expired = []
        for key, conn in self._conns.items():
            self._adapt(&conn.dirs[0], now_ms)
            self._adapt(&conn.dirs[1], now_ms)
            self._enforce_connection_bound(conn)
            if now_ms - conn.last_seen >= self.expire_ms:
                expired.append(key)
        for key in expired:
            self.close(key, now_ms, FLAG_EXPIRED)
        self._enforce_total_bound()

    cdef int _adapt(self, Direction *d, int64_t now_ms) except -1:
        cdef Segment *tail = &d.segs[d.nsegs - 1]
        cdef Py_ssize_t i
        if tail.bytes_interval >= self.split_bytes and tail.bytes_interval > 0:
            if self._capacity(d.level + 1) < self._capacity(d.level):
                d.level += 1
            if tail.capacity >= 2 * self.min_segment_size:
                self._split_tail(d)
        elif tail.bytes_interval == 0 and now_ms - tail.last_activity >= self.idle_ms:
            if self._capacity(d.level - 1) > self._capacity(d.level):
                d.level -= 1
        i = 0
        while i + 1 < d.nsegs:
            if (self._idle(&d.segs[i], now_ms) and self._idle(&d.segs[i + 1], now_ms)
                    and d.segs[i].capacity + d.segs[i + 1].capacity <= self.max_segment_size):
                self._merge_pair(d, i)
                self.stats["merges"] += 1
            else:
                i += 1
        return 0

    cdef int _split_tail(self, Direction *d) except -1:
        cdef Segment *tail = &d.segs[d.nsegs - 1]
        cdef uint64_t half = tail.capacity // 2
        cdef uint64_t second_capacity = tail.capacity - half
        cdef uint64_t second_count
        cdef uint64_t tail_start = tail.start
        cdef uint64_t lo = d.interval_start
        cdef uint64_t hi = d.total
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
            tail.level = self._level_of(half)
            return 0
        second_count = tail.count - half
        tail.count = half
        tail.capacity = half
        tail.level = self._level_of(half)
        first_end = tail_start + tail.count
        if hi < first_end:
            first_end = hi
        first_begin = lo if lo > tail_start else tail_start
        first_bytes = first_end - first_begin if first_end > first_begin else 0
        second_bytes = interval_bytes - first_bytes
        weights[0] = first_bytes
        weights[1] = second_bytes
        share(packets, weights, parts, 2)
        tail.bytes_interval = first_bytes
        tail.packets_interval = parts[0]
        second = self._append(d, tail_start + half, second_capacity)  # may move the array
        second.count = second_count
        second.bytes_interval = second_bytes
        second.packets_interval = parts[1]
        second.last_activity = stamp
        return 0

    cdef bint _idle(self, Segment *s, int64_t now_ms):
        return (s.count == s.capacity and s.bytes_interval == 0 and s.packets_interval == 0
                and now_ms - s.last_activity >= self.idle_ms)

    cdef void _merge_pair(self, Direction *d, Py_ssize_t i):
        cdef Segment *a = &d.segs[i]
        cdef Segment *b = &d.segs[i + 1]
        a.count += b.count
        a.capacity += b.capacity
        a.bytes_interval += b.bytes_interval
        a.packets_interval += b.packets_interval
        if b.last_activity > a.last_activity:
            a.last_activity = b.last_activity
        a.level = self._level_of(a.capacity)
        memmove(b, b + 1, (d.nsegs - i - 2) * sizeof(Segment))
        d.nsegs -= 1
        self.total_segments -= 1

    cdef bint _coarsen_once(self, Connection conn):
        """Merge the connection's adjacent pair with the smallest combined byte_count."""
        cdef int k, best_dir = -1
        cdef Py_ssize_t i, best_i = 0
        cdef uint64_t size, best_size = 0
        cdef Direction *d
        for k in range(2):
            d = &conn.dirs[k]
            for i in range(d.nsegs - 1):
                size = d.segs[i].count + d.segs[i + 1].count
                if best_dir < 0 or size < best_size:
                    best_dir, best_i, best_size = k, i, size
        if best_dir < 0:
            return False
        self._merge_pair(&conn.dirs[best_dir], best_i)
        self.stats["merges"] += 1
        self.stats["coarsened"] += 1
        return True

    cdef void _enforce_connection_bound(self, Connection conn):
        while conn.dirs[0].nsegs + conn.dirs[1].nsegs > self.max_segments_per_connection:
            if not self._coarsen_once(conn):
                break

    def _enforce_total_bound(self):
        cdef Connection conn
        if self.total_segments <= self.max_total_segments:
            return
        by_size = sorted(self._conns.values(), key=_segment_count, reverse=True)
        for conn in by_size:
            while self.total_segments > self.max_total_segments and self._coarsen_once(conn):
                pass
            if self.total_segments <= self.max_total_segments:
                return

    # -- output ----------------------------------------------------------------------------------
    cdef object _record(self, Connection conn):
        cdef list segments = []
        cdef Segment *s
        cdef Py_ssize_t i
        cdef int k
        for k in range(2):
            for i in range(conn.dirs[k].nsegs):
                s = &conn.dirs[k].segs[i]
                segments.append(SegmentRecord(k, s.start, s.count, s.bytes_interval, s.packets_interval,
                                              s.last_activity, s.level))
        return ConnectionRecord(
            conn_id=PyBytes_FromStringAndSize(<char *>conn.conn_id, 16), src=conn.src, src_port=conn.src_port, dst=conn.dst, dst_port=conn.dst_port,
            frontend=conn.frontend, flags=conn.flags, counter_source=conn.source,
            granularity_level=max(conn.dirs[0].level, conn.dirs[1].level),
            requested_lease_ms=conn.requested_lease, predicted_lease_ms=conn.predicted_lease,
            lease_source=conn.lease_source, bytes_in_total=conn.dirs[0].total,
            bytes_out_total=conn.dirs[1].total, segments=tuple(segments),
        )

    def snapshot(self, key):
        cdef Connection conn = self._conns.get(key)
        return None if conn is None else self._record(conn)

    def publish(self):
        """Records of every live connection, then the final ones closed since last time."""
        cdef Connection conn
        cdef list out = [self._record(conn) for conn in self._conns.values()]
        out.extend(self._closed)
        self._closed = []
        return out

    def keys(self):
        return list(self._conns)

    def __len__(self):
        return len(self._conns)

    def __contains__(self, key):
        return key in self._conns


def _segment_count(Connection conn):
    return conn.dirs[0].nsegs + conn.dirs[1].nsegs
