"""On gaining slots: their stored state loaded and adopted, before anything in them expires.

The caller (tier.TierMember) loads a gained slot in the same round that computes the gain,
before the interval's expiry can run on it: one pipelined HGETALL per slot, then the slot's
base and chunks applied in order (rows.latest: each connection's last record, its history
rings rebuilt from the base's whole rings and the chunks' newest cells, deltas.py). The same round trip increments the slot's
epoch: from then on only this node's writes of the slot apply. Each stored connection becomes a table row
(LeaseTable.adopt) with its whole state restored (RowCodec), and its lease deadline

    adopted deadline = max(stored deadline, now + cluster.grace_ms)

so an adopted lease may end late, by at most the failover time plus the grace, never early:
the agents need a few intervals to send the connection's records to its new owner, and the
stored deadline is the last one its previous owner promised. A connection this node already
holds (a record reached it before the load) keeps its live state and takes the later of the
two deadlines. A slot stored under another layout is refused, counted and logged.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from .rows import RowCodec, latest, record_keys
from .segments import SegmentCodec, latest_segments, segment_field
from .store import slot_key
from .store import Store
from .writer import BASE_FIELD, EPOCH_FIELD, FRONTENDS_FIELD, LAYOUT_FIELD, StoreWriter, chunk_number

log = logging.getLogger("spoa.lbnode.cluster")

# Slots fetched per round trip: about 1/21 of a node's share at the default 4096 slots and 3 nodes.
LOAD_GROUP = 64


class StateLoader:
    def __init__(self, store: Store, table: Any, writer: StoreWriter, namespace: str, grace_ms: int) -> None:
        self.store = store
        self.table = table
        self.writer = writer  # takes each adopted slot over: its names, its chunks to delete
        self.codec = RowCodec(table)
        self.segment_codec = SegmentCodec(table)
        self.namespace = namespace
        self.grace_ms = grace_ms
        self.adopted = 0  # spoa_lbnode_connections_adopted_total
        self.segments_adopted = 0  # their segments restored with their history

    async def fetch(self, slots: list[int]) -> dict[int, dict[bytes, bytes]] | None:
        """Each slot's stored hash, its epoch incremented first (this node's from now on: see
        writer.WRITE_SCRIPT), or None when the store did not answer."""
        if not slots:
            return {}

        def build(pipe: Any) -> None:
            for slot in slots:
                pipe.hincrby(slot_key(self.namespace, slot), EPOCH_FIELD, 1)
                pipe.hgetall(slot_key(self.namespace, slot))

        replies = await self.store.pipeline("state load", build)
        if replies is None:
            self.store.stats.load_errors += 1
            return None
        return dict(zip(slots, replies[1::2]))

    @staticmethod
    def _fields(stored: dict[bytes, bytes]) -> list[bytes]:
        """The slot's record fields in the order written: base, then the chunks."""
        chunks = sorted((n, field) for field in stored if (n := chunk_number(field)) is not None)
        return [BASE_FIELD] + [field for _n, field in chunks]

    def records(self, slot: int, stored: dict[bytes, bytes]) -> np.ndarray | None:
        """The slot's live records (base, then chunks in order); None when another layout wrote them."""
        return self._records(slot, stored)[0]

    def _records(self, slot: int, stored: dict[bytes, bytes]) -> tuple[np.ndarray | None, dict[bytes, int]]:
        """(records as `records` gives them; each one's connection key -> the blob, 0 the base,
        i the i-th chunk, that holds its last record)."""
        fields = self._fields(stored)
        blobs = [stored.get(field, b"") for field in fields]
        self.writer.adopted(slot, int(stored.get(EPOCH_FIELD, 0)), json.loads(stored.get(FRONTENDS_FIELD, b"[]")),
                            fields[1:])
        if not any(blobs):
            return self.codec.unpack(b""), {}
        if stored.get(LAYOUT_FIELD) != self.writer.layout():
            count = sum(map(len, blobs)) // self.codec.dtype().itemsize
            self.store.stats.rows_refused += count
            log.warning("slot %d: about %d stored records not adopted: stored under another layout (another "
                        "forecaster, policy or history length, or another format?)", slot, count)
            return None, {}
        # the chunks' bytes joined, then read as one array (concatenating structured arrays
        # promotes their dtypes field by field, slower than the bytes)
        deltas = self.codec.unpack(b"".join(blobs[1:]), delta=True)
        packed, last, inexact = latest(self.codec.unpack(blobs[0]), deltas, self.codec.rings())
        self.store.stats.rings_inexact += inexact
        size = self.codec.delta_dtype().itemsize
        blob_of = np.repeat(np.arange(len(blobs)), [len(blobs[0]) // self.codec.dtype().itemsize] +
                            [len(blob) // size for blob in blobs[1:]])[last]
        return packed, dict(zip(packed["key"].tolist(), blob_of.tolist()))

    def segments(self, stored: dict[bytes, bytes], row_blob_of: dict[bytes, int]) -> np.ndarray:
        """The segment records of the slot's live connections (of a layout `records` accepted;
        row_blob_of: as `_records` gives it)."""
        fields = self._fields(stored)
        codec = self.segment_codec
        blobs = [stored.get(segment_field(field), b"") for field in fields]
        size = codec.delta_dtype().itemsize
        segments, inexact = latest_segments(row_blob_of, codec.unpack(blobs[0]),
                                            codec.unpack(b"".join(blobs[1:]), delta=True),
                                            [len(blob) // size for blob in blobs[1:]], codec.ring())
        self.store.stats.rings_inexact += inexact
        return segments

    def adopt(self, slot: int, stored: dict[bytes, bytes], now: int) -> int:
        """The connections of one slot's stored hash into the table; how many were new here."""
        packed, row_blob_of = self._records(slot, stored)
        if packed is None or not len(packed):
            return 0
        node_ids, conn_ids = record_keys(packed)
        table = self.table
        frontends = self.writer.frontends[slot]
        names = [frontends[i] if i < len(frontends) else "" for i in packed["frontend"].tolist()]
        class_ids = np.array([table.class_of(n, f) for n, f in zip(node_ids.tolist(), names)], np.int32)
        rows, fresh = table.adopt(node_ids, conn_ids, class_ids)
        held = rows >= 0
        new = fresh & held
        deadline = np.maximum(packed["table.expires"], now + self.grace_ms)
        self.codec.restore(rows[new], packed[new])
        self.segments_adopted += self.segment_codec.restore(rows[new], packed["key"][new],
                                                                  self.segments(stored, row_blob_of))
        table.expires[rows[new]] = deadline[new]
        known = held & ~fresh
        table.expires[rows[known]] = np.maximum(table.expires[rows[known]], deadline[known])
        self.writer.remember(rows[held], np.full(int(held.sum()), slot, np.int64))
        self.store.stats.rows_loaded += len(packed)
        count = int(np.count_nonzero(new))
        self.adopted += count
        table.stats.refused += int(np.count_nonzero(~held))
        return count

    async def load(self, slots: list[int], now_ms: Any, until: float = float("inf")) -> list[int]:
        """Fetch and adopt `slots`, LOAD_GROUP slots per round trip (each bounded by
        cluster.timeout_ms: a whole node's share can be far more than one timeout carries),
        starting no round trip after `until` (monotonic: the membership renewal must not wait
        behind a long load); the slots adopted (the rest, not fetched or not answered, are
        retried later)."""
        began = time.perf_counter()
        done = []
        for first in range(0, len(slots), LOAD_GROUP):
            if first and time.monotonic() > until:
                break
            group = slots[first:first + LOAD_GROUP]
            stored = await self.fetch(group)
            if stored is None:
                break
            now = now_ms()
            for slot, fields in stored.items():
                self.adopt(slot, fields, now)
            done += group
            self.store.stats.load_batches += 1
        self.store.stats.load_seconds += time.perf_counter() - began
        return done
