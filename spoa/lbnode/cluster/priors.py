"""Traffic-class priors in the store: what a node that joins (or rejoins) knows of each class
before its own connections have taught it.

Per traffic class (server node + frontend) the LB node learns: the EWMA of the leases it
granted (LeaseTable.class_lease: the prior of a connection that has no history yet), the
volume calibration of the volume policy (class_log_volume), and the end bound's idle times
at close with the bound they give (EndBound). Each live node learns them from its own share
of every class (rendezvous spreads each server node's connections over all of them); a node
that joins starts from nothing and would grant a cold class's first connections the
standard lease and no end bound for `end_min_closes` closes.

So every PRIORS_EVERY intervals each answering node writes its classes to one hash,
`NS:{NS.classes}:priors`, a field per class (last writer wins: every node's estimate is
from a share of the same traffic), and a node reads it once per join (and after a fence):
it seeds each class it does not know yet, or whose value it has not learnt; what it learnt
itself is never overwritten. A field is a fixed little-endian record: lease (f64),
log volume (f64), end bound (f64), ring count, ring position (i32 each), the ring of idle
times at close (f32 x window).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from ..lease_policy import per_class
from .store import Store

# Intervals between two writes of the classes (they change slowly; one HSET of a few hundred
# bytes per class).
PRIORS_EVERY = 16
_FIXED = struct.Struct("<dddii")


def priors_key(namespace: str) -> str:
    return f"{namespace}:{{{namespace}.classes}}:priors"


class ClassPriors:
    def __init__(self, store: Store, table: Any, namespace: str) -> None:
        self.store = store
        self.table = table
        self.key = priors_key(namespace)
        policy = table.policy
        self.end_bound = getattr(policy, "end_bound", None)
        self.volume = policy if hasattr(policy, "class_log_volume") else None
        self.window = self.end_bound.idle_at_close.length if self.end_bound is not None else 0
        self.written = 0  # class records written
        self.seeded = 0  # classes seeded from the store

    def _class_arrays(self, size: int) -> None:
        """The policy's per-class arrays grown to cover `size` classes, as the policy grows them
        when it meets a class (the table's class_lease grows with each class it hands out)."""
        ids = np.arange(size)
        if self.volume is not None:
            self.volume.class_log_volume = per_class(self.volume.class_log_volume, ids, np.nan)
        if self.end_bound is not None:
            self.end_bound.cover(ids)

    def encode(self) -> dict[bytes, bytes]:
        """Each class's record, by field name (server node id | frontend)."""
        table = self.table
        self._class_arrays(len(table.class_names))
        ring = self.end_bound.idle_at_close if self.end_bound is not None else None
        fields = {}
        for (node_id, frontend), cid in table.classes.items():
            volume = self.volume.class_log_volume[cid] if self.volume is not None else np.nan
            bound = self.end_bound.bound_ms[cid] if self.end_bound is not None else np.nan
            record = _FIXED.pack(table.class_lease[cid], volume, bound,
                                 int(ring.count[cid]) if ring is not None else 0,
                                 int(ring.pos[cid]) if ring is not None else 0)
            if ring is not None:
                record += ring.buf[cid].astype("<f4").tobytes()
            fields[f"{node_id}|{frontend}".encode()] = record
        return fields

    def seed(self, fields: dict[bytes, bytes]) -> int:
        """Classes seeded from stored records (what this node already learnt stays); refuses
        records of another layout (another end-bound window)."""
        table, seeded = self.table, 0
        size = _FIXED.size + 4 * self.window
        for name, record in fields.items():
            node_text, _, frontend = name.decode(errors="replace").partition("|")
            if len(record) != size or not node_text.isdigit():
                continue
            lease, volume, bound, count, pos = _FIXED.unpack_from(record)
            cid = table.class_of(int(node_text), frontend)
            self._class_arrays(cid + 1)
            took = False
            if np.isnan(table.class_lease[cid]) and not np.isnan(lease):
                table.class_lease[cid], took = lease, True
            if self.volume is not None and np.isnan(self.volume.class_log_volume[cid]) and not np.isnan(volume):
                self.volume.class_log_volume[cid], took = volume, True
            end = self.end_bound
            if end is not None and end.idle_at_close.count[cid] == 0 and count > 0:
                end.idle_at_close.buf[cid] = np.frombuffer(record, "<f4", offset=_FIXED.size)
                end.idle_at_close.count[cid], end.idle_at_close.pos[cid] = count, pos
                end.bound_ms[cid], took = bound, True
            seeded += took
        self.seeded += seeded
        return seeded

    async def write(self) -> bool:
        fields = self.encode()
        if not fields:
            return True
        done = await self.store.call("class priors write", lambda c: c.hset(self.key, mapping=fields))
        if done is None:
            return False
        self.written += len(fields)
        return True

    async def load(self) -> bool:
        fields = await self.store.call("class priors load", lambda c: c.hgetall(self.key))
        if fields is None:
            return False
        self.seed(fields)
        return True
