"""Key -> slot allocator for the LB node's tables, pure Python: the twin of cext/spoa/lbnode/_slotmap.pyx.

A SlotMap hands out slots 0..capacity-1 to keys and finds them again. A key
is (a, b): a u64 and 16 bytes, given as `a` (uint64[n]) and `b` (uint64[n, 2],
the 16 bytes viewed as two u64); the lease table keys connections by
(server node id, conn_id), the segment history segments by (connection slot x 2
+ direction, start offset). Every operation takes whole arrays, so the
compiled twin runs per-key work in C and the table stays vectorized.

Free slots are a LIFO stack, initially popping 0, 1, 2, ...: a released slot
is the next one handed out. `grow` adds slots (the tables grow with what they
hold, up to their configured bound) below the free ones. Both twins behave identically (tests/lbnode/test_slotmap.py).
"""

from __future__ import annotations

import numpy as np

MISSING = -1  # resolve/lookup: no slot for that key (and none created)
REFUSED = -2  # resolve: no free slot left for a key it was asked to create


class SlotMap:
    """Keys (a u64, 16 bytes) to slots 0..capacity-1, whole arrays at a time."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = 0
        self.key_a = np.zeros(0, np.uint64)  # a of the key holding each slot
        self.key_b = np.zeros((0, 2), np.uint64)  # b of it
        self.in_use = np.zeros(0, bool)  # slot held by a key
        self._slots: dict[tuple[int, int, int], int] = {}
        self._free: list[int] = []  # the top (end) is handed out next
        self.grow(capacity)

    def grow(self, capacity: int) -> None:
        """Room for `capacity` slots (no change when not more than now). Held
        slots keep their keys; the new slots are handed out after the free
        ones, lowest first. The key arrays are new objects: views of the old
        ones must be taken again."""
        old = self.capacity
        if capacity <= old:
            return
        for name in ("key_a", "key_b", "in_use"):
            array = getattr(self, name)
            grown = np.zeros((capacity, *array.shape[1:]), array.dtype)
            grown[:old] = array
            setattr(self, name, grown)
        self._free = list(range(capacity - 1, old - 1, -1)) + self._free
        self.capacity = int(capacity)

    def __len__(self) -> int:
        return len(self._slots)

    def resolve(self, a: np.ndarray, b: np.ndarray, create: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(slots, fresh): each key's slot, in order. A missing key gets a free
        slot (fresh True) where `create` is True (None: everywhere), else
        MISSING; REFUSED when no slot is free. A key repeated in the arrays
        gets the slot its first occurrence got."""
        n = len(a)
        slots = np.empty(n, np.int64)
        fresh = np.zeros(n, bool)
        table = self._slots
        keys = zip(a.tolist(), b[:, 0].tolist(), b[:, 1].tolist())
        wanted = [True] * n if create is None else create.tolist()
        for i, key in enumerate(keys):
            slot = table.get(key)
            if slot is None:
                if not wanted[i]:
                    slot = MISSING
                elif not self._free:
                    slot = REFUSED
                else:
                    slot = table[key] = self._free.pop()
                    self.key_a[slot] = key[0]
                    self.key_b[slot] = key[1:]
                    self.in_use[slot] = True
                    fresh[i] = True
            slots[i] = slot
        return slots, fresh

    def lookup(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Each key's slot, or MISSING."""
        get = self._slots.get
        return np.array([get(key, MISSING) for key in zip(a.tolist(), b[:, 0].tolist(), b[:, 1].tolist())],
                        np.int64)

    def release(self, slots: np.ndarray) -> None:
        """Free these slots, in order (the last one is handed out first); slots
        not in use are skipped."""
        for slot in np.asarray(slots, np.int64).tolist():
            if slot < 0 or slot >= self.capacity:
                raise IndexError(f"slot {slot} out of range [0, {self.capacity})")
            if not self.in_use[slot]:
                continue
            self.in_use[slot] = False
            del self._slots[(int(self.key_a[slot]), int(self.key_b[slot, 0]), int(self.key_b[slot, 1]))]
            self._free.append(slot)
