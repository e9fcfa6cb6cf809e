# Declarations of the connection publishing packet v1 codec (bodies in
# _packet.pyx). The pure-Python twin is spoa/wire/_packet_py.py; both must behave
# identically. The wire format is in docs/publishing-packet.md.

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t


# Growable scratch buffer: encode_packet serializes every record into it, then
# cuts it into datagrams at record boundaries.
cdef struct Scratch:
    uint8_t *data                   # serialized records, back to back (PyMem_Malloc'd)
    Py_ssize_t len                  # bytes used in data
    Py_ssize_t cap                  # bytes allocated for data
    Py_ssize_t *ends                # ends[k]: offset just past record k in data (PyMem_Malloc'd)
    Py_ssize_t nrec                 # records serialized so far
    Py_ssize_t rcap                 # entries allocated for ends


# Records in wire form, not yet cut into datagrams (the twin's RecordBatch): the compiled
# tracker writes its records straight in, reserve(size) then commit(size) per record.
cdef class RecordBatch:
    cdef Scratch s

    cdef uint8_t *reserve(self, Py_ssize_t size) except NULL  # room for one record at the end
    cdef void commit(self, Py_ssize_t size) noexcept          # that record written: counted


cdef class _NodeWindow:
    cdef uint64_t highest           # highest sequence accepted from this node
    cdef dict seen                  # sequence (int) -> bitmap (int) of accepted datagram indexes, last `window` sequences


cdef class ReplayGuard:
    cdef readonly int window        # sequences remembered per node; older ones are refused as replayed
    cdef readonly Py_ssize_t max_nodes  # nodes tracked at most; the least recently accepted is forgotten first
    cdef readonly Py_ssize_t evictions  # nodes forgotten so far to stay within max_nodes
    cdef object _nodes              # OrderedDict node_id (int) -> _NodeWindow, in LRU order (oldest first)


# Column indexes of ColumnBatch, in the twin's CONN_COLUMNS / SEG_COLUMNS order.
cdef enum:
    K_NODE_ID, K_CONN_ID, K_BYTES_IN, K_BYTES_OUT, K_SRC, K_DST, K_SRC_PORT, K_DST_PORT, K_REQUESTED, K_PREDICTED,
    K_FAMILY, K_FLAGS, K_COUNTER_SOURCE, K_LEASE_SOURCE, K_LEVEL, K_FRONTEND, N_CONN_COLUMNS

cdef enum:
    S_DIRECTION, S_LEVEL, S_START, S_BYTE_COUNT, S_TRANSFERRED, S_PACKETS, S_LAST_ACTIVITY, N_SEG_COLUMNS


cdef class ColumnBatch:
    cdef readonly Py_ssize_t n          # connection records held
    cdef readonly Py_ssize_t nseg       # segment entries held
    cdef readonly Py_ssize_t datagrams  # datagrams appended since the last clear()
    cdef readonly list frontends        # interned frontend names; the `frontend` column indexes it
    cdef dict _names                    # frontend name as UTF-8 bytes -> its index in frontends
    cdef Py_ssize_t cap                 # rows allocated in every connection column
    cdef Py_ssize_t seg_cap             # rows allocated in every segment column
    cdef list _conn_arrays              # the numpy arrays behind the connection columns (CONN_COLUMNS order)
    cdef list _seg_arrays               # the same for the segment columns
    cdef object _seg_start_array        # int64, cap + 1 rows: CSR offsets of each record's segments
    cdef uint8_t *conn[<int>N_CONN_COLUMNS]  # data pointers of _conn_arrays (valid until they grow)
    cdef uint8_t *seg[<int>N_SEG_COLUMNS]    # data pointers of _seg_arrays
    cdef int64_t *seg_start             # data pointer of _seg_start_array
    cdef bint has_last                  # drop_last() may undo the last append
    cdef Py_ssize_t last_n              # n before the last append
    cdef Py_ssize_t last_nseg           # nseg before the last append

    cdef int reserve(self, Py_ssize_t records, Py_ssize_t segments) except -1
    cdef long long intern(self, const uint8_t *name, Py_ssize_t flen, Py_ssize_t i) except -1  # frontend index of a name
