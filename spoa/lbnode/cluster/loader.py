"""On gaining slots: their stored state loaded and adopted, before anything in them expires.

The caller (tier.TierMember) loads a gained slot in the same round that computes the gain,
before the interval's expiry can run on it. Each stored row becomes a table row (LeaseTable.adopt)
with its whole state restored (RowCodec), and its lease deadline

    adopted deadline = max(stored deadline, now + cluster.grace_ms)

so an adopted lease may end late, by at most the failover time plus the grace, never early:
the agents need a few intervals to send the connection's records to its new owner, and the
stored deadline is the last one its previous owner promised. A connection this node already
holds (a record reached it before the load) keeps its live state and takes the later of the
two deadlines. Rows stored under another layout are refused, counted and logged.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from .rows import RowCodec
from .slots import CONN_KEY_BYTES, slot_key
from .store import Store
from .writer import FRONTENDS_FIELD, LAYOUT_FIELD, StoreWriter

log = logging.getLogger("spoa.lbnode.cluster")


class StateLoader:
    def __init__(self, store: Store, table: Any, writer: StoreWriter, namespace: str, grace_ms: int) -> None:
        self.store = store
        self.table = table
        self.writer = writer  # learns each adopted slot's frontend names (its rows index them)
        self.codec = RowCodec(table)
        self.namespace = namespace
        self.grace_ms = grace_ms
        self.adopted = 0  # spoa_lbnode_connections_adopted_total

    async def fetch(self, slots: list[int]) -> dict[int, dict[bytes, bytes]] | None:
        """Each slot's stored hash (one pipelined HGETALL per slot), or None when the store did not answer."""
        if not slots:
            return {}
        replies = await self.store.pipeline("state load", lambda pipe: [
            pipe.hgetall(slot_key(self.namespace, slot)) for slot in slots])
        if replies is None:
            self.store.stats.load_errors += 1
            return None
        return dict(zip(slots, replies))

    def adopt(self, slot: int, stored: dict[bytes, bytes], now: int) -> int:
        """The connections of one slot's stored hash into the table; how many were new here."""
        stored = dict(stored)
        layout = stored.pop(LAYOUT_FIELD, None)
        frontends = json.loads(stored.pop(FRONTENDS_FIELD, b"[]"))
        self.writer.frontends[slot] = frontends
        keys = [k for k in stored if len(k) == CONN_KEY_BYTES]
        if not keys:
            return 0
        stats = self.store.stats
        if layout != self.codec.layout():
            stats.rows_refused += len(keys)
            log.warning("slot %d: %d stored connections not adopted: stored under another layout (another "
                        "forecaster, policy or history length?)", slot, len(keys))
            return 0
        packed = self.codec.unpack(b"".join(stored[k] for k in keys))
        raw = np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), CONN_KEY_BYTES)
        node_ids = raw[:, :8].copy().view("<u8").reshape(-1).astype(np.uint64)
        conn_ids = raw[:, 8:].copy().view("V16").reshape(-1)
        table = self.table
        names = [frontends[i] if i < len(frontends) else "" for i in packed["frontend"].tolist()]
        class_ids = np.array([table.class_of(n, f) for n, f in zip(node_ids.tolist(), names)], np.int32)
        rows, fresh = table.adopt(node_ids, conn_ids, class_ids)
        held = rows >= 0
        new = fresh & held
        deadline = np.maximum(packed["table.expires"], now + self.grace_ms)
        self.codec.restore(rows[new], packed[new])
        table.expires[rows[new]] = deadline[new]
        known = held & ~fresh
        table.expires[rows[known]] = np.maximum(table.expires[rows[known]], deadline[known])
        stats.rows_loaded += len(keys)
        count = int(np.count_nonzero(new))
        self.adopted += count
        table.stats.refused += int(np.count_nonzero(~held))
        return count

    async def load(self, slots: list[int], now_ms: Any) -> bool:
        """Fetch and adopt `slots`; False when the store did not answer (nothing adopted, retried)."""
        began = time.perf_counter()
        stored = await self.fetch(slots)
        if stored is None:
            return False
        now = now_ms()
        for slot, fields in stored.items():
            self.adopt(slot, fields, now)
        self.store.stats.load_batches += 1
        self.store.stats.load_seconds += time.perf_counter() - began
        return True
