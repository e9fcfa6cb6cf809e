# cython: language_level=3
"""Key -> slot allocator, compiled. Same API and behaviour as spoa/lbnode/_slotmap_py.py.

A hash table in C (open addressing, linear probing, backward-shift deletion,
load <= 0.5) of slot numbers; the keys live in key_a/key_b by slot, so a
cell is 8 bytes and a lookup compares the probed slot's key. Every method
walks whole numpy arrays without touching a Python object per key.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memset

import numpy as np

from spoa.lbnode._slotmap_py import MISSING, REFUSED

cdef int64_t C_MISSING = MISSING
cdef int64_t C_REFUSED = REFUSED


cdef inline uint64_t mix(uint64_t x) noexcept nogil:
    """splitmix64's finalizer: every input bit moves about half the output bits."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL
    return x ^ (x >> 31)


cdef inline uint64_t hash_key(uint64_t a, uint64_t b0, uint64_t b1) noexcept nogil:
    return mix(a ^ mix(b0 ^ mix(b1)))


cdef class SlotMap:
    """Keys (a u64, 16 bytes) to slots 0..capacity-1, whole arrays at a time."""

    def __cinit__(self):
        self.table = NULL
        self.free = NULL

    def __init__(self, capacity):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = 0
        self.key_a = np.zeros(0, np.uint64)
        self.key_b = np.zeros((0, 2), np.uint64)
        self.in_use = np.zeros(0, bool)
        self.nfree = 0
        self.live = 0
        self.grow(capacity)

    def grow(self, capacity):
        """Room for `capacity` slots (no change when not more than now). Held
        slots keep their keys; the new slots are handed out after the free
        ones, lowest first. The key arrays are new objects: views of the old
        ones must be taken again."""
        cdef Py_ssize_t old = self.capacity, k
        cdef int64_t slot, found
        cdef uint64_t cells = 1
        cdef uint64_t[::1] a
        cdef uint64_t[:, ::1] b
        cdef uint8_t[::1] u
        cdef int64_t *table
        cdef int64_t *free
        if capacity <= old:
            return
        while cells < 2 * <uint64_t>capacity:
            cells <<= 1
        table = <int64_t *>PyMem_Malloc(cells * sizeof(int64_t))
        free = <int64_t *>PyMem_Malloc(capacity * sizeof(int64_t))
        if table == NULL or free == NULL:
            PyMem_Free(table)
            PyMem_Free(free)
            raise MemoryError()
        key_a = np.zeros(capacity, np.uint64)
        key_b = np.zeros((capacity, 2), np.uint64)
        in_use = np.zeros(capacity, bool)
        key_a[:old] = self.key_a
        key_b[:old] = self.key_b
        in_use[:old] = self.in_use
        # The stack: new slots at the bottom (the highest deepest), the free
        # ones above them as they were.
        for k in range(capacity - old):
            free[k] = capacity - 1 - k
        for k in range(self.nfree):
            free[capacity - old + k] = self.free[k]
        PyMem_Free(self.table)
        PyMem_Free(self.free)
        self.table, self.free = table, free
        self.nfree += capacity - old
        self.key_a, self.key_b, self.in_use = key_a, key_b, in_use
        a = self.key_a
        b = self.key_b
        u = self.in_use.view(np.uint8)
        self.ka = &a[0]
        self.kb = &b[0, 0]
        self.used = &u[0]
        self.mask = cells - 1
        self.capacity = capacity
        memset(self.table, 0xFF, cells * sizeof(int64_t))  # every cell -1
        for slot in range(old):  # the held keys, rehashed for the new mask
            if self.used[slot]:
                found = self.find(self.ka[slot], self.kb[2 * slot], self.kb[2 * slot + 1])
                self.table[-found - 1] = slot

    def __dealloc__(self):
        PyMem_Free(self.table)
        PyMem_Free(self.free)

    def __len__(self):
        return self.live

    cdef int64_t find(self, uint64_t a, uint64_t b0, uint64_t b1) noexcept nogil:
        """The key's slot, or -(cell + 1) of the empty cell where it would go."""
        cdef uint64_t cell = hash_key(a, b0, b1) & self.mask
        cdef int64_t slot
        while True:
            slot = self.table[cell]
            if slot < 0:
                return -<int64_t>cell - 1
            if self.ka[slot] == a and self.kb[2 * slot] == b0 and self.kb[2 * slot + 1] == b1:
                return slot
            cell = (cell + 1) & self.mask

    cdef void remove(self, int64_t slot) noexcept nogil:
        """Take the slot's key out of the table (backward-shift: no tombstones)."""
        cdef uint64_t hole = hash_key(self.ka[slot], self.kb[2 * slot], self.kb[2 * slot + 1]) & self.mask
        cdef uint64_t cell, home
        cdef int64_t other
        while self.table[hole] != slot:
            hole = (hole + 1) & self.mask
        cell = hole
        while True:
            cell = (cell + 1) & self.mask
            other = self.table[cell]
            if other < 0:
                break
            home = hash_key(self.ka[other], self.kb[2 * other], self.kb[2 * other + 1]) & self.mask
            # `other` may fill the hole unless its home lies cyclically in (hole, cell].
            if (cell - home) & self.mask >= (cell - hole) & self.mask:
                self.table[hole] = other
                hole = cell
        self.table[hole] = -1

    def resolve(self, const uint64_t[::1] a, const uint64_t[:, ::1] b, create=None):
        """(slots, fresh): each key's slot, in order. A missing key gets a free
        slot (fresh True) where `create` is True (None: everywhere), else
        MISSING; REFUSED when no slot is free. A key repeated in the arrays
        gets the slot its first occurrence got."""
        cdef Py_ssize_t i, n = a.shape[0]
        cdef int64_t found, slot
        cdef const uint8_t[::1] wanted
        cdef bint all_wanted = create is None
        slots_array = np.empty(n, np.int64)
        fresh_array = np.zeros(n, bool)
        cdef int64_t[::1] slots = slots_array
        cdef uint8_t[::1] fresh = fresh_array.view(np.uint8)
        if not all_wanted:
            wanted = np.ascontiguousarray(create, bool).view(np.uint8)
            if wanted.shape[0] != n:
                raise ValueError(f"create has {wanted.shape[0]} entries for {n} keys")
        if b.shape[0] != n or (n and b.shape[1] != 2):
            raise ValueError(f"b must be uint64[{n}, 2]")
        with nogil:
            for i in range(n):
                found = self.find(a[i], b[i, 0], b[i, 1])
                if found >= 0:
                    slots[i] = found
                elif not all_wanted and not wanted[i]:
                    slots[i] = C_MISSING
                elif self.nfree == 0:
                    slots[i] = C_REFUSED
                else:
                    self.nfree -= 1
                    slot = self.free[self.nfree]
                    self.table[-found - 1] = slot
                    self.ka[slot] = a[i]
                    self.kb[2 * slot] = b[i, 0]
                    self.kb[2 * slot + 1] = b[i, 1]
                    self.used[slot] = 1
                    self.live += 1
                    slots[i] = slot
                    fresh[i] = 1
        return slots_array, fresh_array

    def lookup(self, const uint64_t[::1] a, const uint64_t[:, ::1] b):
        """Each key's slot, or MISSING."""
        cdef Py_ssize_t i, n = a.shape[0]
        cdef int64_t found
        if b.shape[0] != n or (n and b.shape[1] != 2):
            raise ValueError(f"b must be uint64[{n}, 2]")
        slots_array = np.empty(n, np.int64)
        cdef int64_t[::1] slots = slots_array
        with nogil:
            for i in range(n):
                found = self.find(a[i], b[i, 0], b[i, 1])
                slots[i] = found if found >= 0 else C_MISSING
        return slots_array

    def release(self, slots):
        """Free these slots, in order (the last one is handed out first); slots
        not in use are skipped."""
        cdef const int64_t[::1] s = np.ascontiguousarray(slots, np.int64)
        cdef Py_ssize_t i
        cdef int64_t slot
        for i in range(s.shape[0]):
            slot = s[i]
            if slot < 0 or slot >= self.capacity:
                raise IndexError(f"slot {slot} out of range [0, {self.capacity})")
            if not self.used[slot]:
                continue
            self.remove(slot)
            self.used[slot] = 0
            self.live -= 1
            self.free[self.nfree] = slot
            self.nfree += 1
