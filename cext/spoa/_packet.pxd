# Declarations of the connection publishing packet v1 codec (bodies in
# _packet.pyx). The pure-Python twin is spoa/_packet_py.py; both must behave
# identically. The wire format is in docs/publishing-packet.md.

from libc.stdint cimport uint8_t, uint64_t


# Growable scratch buffer: encode_packet serializes every record into it, then
# cuts it into datagrams at record boundaries.
cdef struct Scratch:
    uint8_t *data                   # serialized records, back to back (PyMem_Malloc'd)
    Py_ssize_t len                  # bytes used in data
    Py_ssize_t cap                  # bytes allocated for data
    Py_ssize_t *ends                # ends[k]: offset just past record k in data (PyMem_Malloc'd)
    Py_ssize_t nrec                 # records serialized so far
    Py_ssize_t rcap                 # entries allocated for ends


cdef class _NodeWindow:
    cdef uint64_t highest           # highest sequence accepted from this node
    cdef dict seen                  # sequence (int) -> bitmap (int) of accepted datagram indexes, last `window` sequences


cdef class ReplayGuard:
    cdef readonly int window        # sequences remembered per node; older ones are refused as replayed
    cdef readonly Py_ssize_t max_nodes  # nodes tracked at most; the least recently accepted is forgotten first
    cdef readonly Py_ssize_t evictions  # nodes forgotten so far to stay within max_nodes
    cdef object _nodes              # OrderedDict node_id (int) -> _NodeWindow, in LRU order (oldest first)
