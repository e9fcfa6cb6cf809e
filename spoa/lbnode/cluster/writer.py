"""Per interval, what changed in the owned slots, written to the store in one pipeline.

At the end of each interval the rows refreshed in it are snapshotted (RowCodec blobs: their
new deadline, totals, forecaster and policy state) into `pending`, by slot; rows that ended
here (closed, expired) become deletions. `flush` then sends all of it as one pipeline: per
slot one HSET of its changed fields, one HDEL of its ended ones and one PEXPIRE (the
garbage-collection backstop, `cluster.gc_ms`: a slot nobody owns any more ages out; the
owner's writes keep renewing it). redis-py groups the pipeline by shard and sends the
shards' parts in parallel.

A flush the store does not acknowledge is kept and merged with the next interval's changes
(a later snapshot of a row replaces an earlier one), so an outage costs one write of the
newest state when the store is back, not a backlog; the pending state is bounded by the
rows held. Each slot's hash also carries its layout and its frontend names (the rows name
their frontend by index): written when this node first writes the slot, and when a new
frontend appears in it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from .rows import RowCodec
from .slots import CONN_KEY_BYTES as CONN_FIELD_BYTES, conn_keys, conn_slots, slot_key
from .store import Store

LAYOUT_FIELD = b"layout"
FRONTENDS_FIELD = b"frontends"
GONE = None  # a pending deletion


class StoreWriter:
    def __init__(self, store: Store, table: Any, namespace: str, slots: int, gc_ms: int) -> None:
        self.store = store
        self.table = table
        self.codec = RowCodec(table)
        self.namespace = namespace
        self.slots = slots
        self.gc_ms = gc_ms
        self.pending: dict[int, dict[bytes, bytes | None]] = {}  # slot -> field -> blob, or GONE
        self.frontends: dict[int, list[str]] = {}  # slot -> its frontend names, as stored
        self.described: set[int] = set()  # slots whose layout this node wrote (or found equal)

    def slot_frontends(self, slot: int) -> list[str]:
        return self.frontends.setdefault(slot, [])

    def snapshot(self, rows: np.ndarray, owned: np.ndarray) -> None:
        """The state of `rows` (just refreshed) into pending; rows of slots not in `owned`
        (bool[slots]) are not this node's to write."""
        if not len(rows):
            return
        table = self.table
        node_ids, conn_ids = table.node[rows], table.conn_id[rows]
        slots = conn_slots(node_ids, conn_ids, self.slots)
        mine = owned[slots]
        rows, slots, node_ids, conn_ids = rows[mine], slots[mine], node_ids[mine], conn_ids[mine]
        frontends = np.zeros(len(rows), np.uint32)
        names = table.class_names
        for i, (slot, cid) in enumerate(zip(slots.tolist(), table.class_id[rows].tolist())):
            known = self.slot_frontends(slot)
            name = names[cid]
            if name not in known:  # a handful per slot: a list is the cheapest lookup
                known.append(name)
                self.pending.setdefault(slot, {})[FRONTENDS_FIELD] = json.dumps(known).encode()
            frontends[i] = known.index(name)
        blobs, size = self.codec.pack(rows, frontends)
        keys = conn_keys(node_ids, conn_ids).tobytes()
        pending = self.pending
        for i, slot in enumerate(slots.tolist()):
            pending.setdefault(slot, {})[keys[CONN_FIELD_BYTES * i:CONN_FIELD_BYTES * (i + 1)]] = blobs[size * i:size * i + size]

    def forget(self, rows: np.ndarray, owned: np.ndarray) -> None:
        """Rows ending here (closed, expired): their stored state is deleted at the next flush."""
        table = self.table
        node_ids, conn_ids = table.node[rows], table.conn_id[rows]
        slots = conn_slots(node_ids, conn_ids, self.slots)
        keys = conn_keys(node_ids, conn_ids).tobytes()
        for i, slot in enumerate(slots.tolist()):
            if owned[slot]:
                self.pending.setdefault(slot, {})[keys[CONN_FIELD_BYTES * i:CONN_FIELD_BYTES * (i + 1)]] = GONE

    def drop(self, slots: list[int]) -> None:
        """Slots this node no longer owns: nothing more of them is written from here."""
        for slot in slots:
            self.pending.pop(slot, None)
            self.frontends.pop(slot, None)
            self.described.discard(slot)

    async def flush(self) -> bool:
        """Send everything pending as one pipeline; False (kept for the next) when unacknowledged."""
        if not self.pending:
            return True
        batch, self.pending = self.pending, {}
        layout = self.codec.layout()
        payload = 0
        commands = 0
        writes: list[tuple[str, dict, list]] = []
        for slot, fields in batch.items():
            if slot not in self.described:
                fields.setdefault(LAYOUT_FIELD, layout)
                fields.setdefault(FRONTENDS_FIELD, json.dumps(self.slot_frontends(slot)).encode())
            present = {k: v for k, v in fields.items() if v is not GONE}
            gone = [k for k, v in fields.items() if v is GONE]
            payload += sum(len(k) + len(v) for k, v in present.items()) + sum(map(len, gone))
            writes.append((slot_key(self.namespace, slot), present, gone))
            commands += bool(present) + bool(gone) + 1

        def build(pipe: Any) -> None:
            for key, present, gone in writes:
                if present:
                    pipe.hset(key, mapping=present)
                if gone:
                    pipe.hdel(key, *gone)
                pipe.pexpire(key, self.gc_ms)

        stats = self.store.stats
        began = time.perf_counter()
        replies = await self.store.pipeline("state write", build)
        if replies is None:
            stats.write_errors += 1
            for slot, fields in batch.items():  # older than what came meanwhile: under it
                self.pending[slot] = {**fields, **self.pending.get(slot, {})}
            return False
        took = time.perf_counter() - began
        stats.write_batches += 1
        stats.write_bytes += payload
        stats.write_seconds += took
        stats.last_write_seconds = took
        stats.write_commands += commands
        stats.rows_written += sum(len(k) == CONN_FIELD_BYTES for _, p, _ in writes for k in p)
        self.described.update(batch)
        return True
