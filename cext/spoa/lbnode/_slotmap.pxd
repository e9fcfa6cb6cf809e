# Declarations of the key -> slot allocator (bodies in _slotmap.pyx; the
# pure-Python twin is spoa/lbnode/_slotmap_py.py, held identical by tests/lbnode/test_slotmap.py).

from libc.stdint cimport int64_t, uint8_t, uint64_t


cdef class SlotMap:
    cdef readonly Py_ssize_t capacity   # slots 0..capacity-1
    cdef readonly object key_a          # uint64[capacity]: a of the key holding each slot
    cdef readonly object key_b          # uint64[capacity, 2]: b of it
    cdef readonly object in_use         # bool[capacity]: slot held by a key
    cdef Py_ssize_t live                # slots in use
    cdef uint64_t *ka                   # data of key_a
    cdef uint64_t *kb                   # data of key_b
    cdef uint8_t *used                  # data of in_use
    cdef int64_t *table                 # open addressing, linear probing: slot, or -1 for an empty cell
    cdef uint64_t mask                  # cells - 1 (cells: a power of two >= 2 x capacity)
    cdef int64_t *free                  # stack of free slots; the top is handed out next
    cdef Py_ssize_t nfree               # entries on that stack

    cdef int64_t find(self, uint64_t a, uint64_t b0, uint64_t b1) noexcept nogil
    cdef void remove(self, int64_t slot) noexcept nogil
