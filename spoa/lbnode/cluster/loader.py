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
from .segments import SEG_BASE_FIELD, SegmentCodec, latest_segments, segment_field
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
        found = self._records({slot: stored})
        return None if slot not in found[3] else found[0]

    def _accepted(self, slot: int, stored: dict[bytes, bytes]) -> list[bytes] | None:
        """The slot's record fields in order (its base, then its chunks), handed to the writer
        as adopted; None when another layout wrote them (refused, counted)."""
        fields = self._fields(stored)
        self.writer.adopted(slot, int(stored.get(EPOCH_FIELD, 0)), json.loads(stored.get(FRONTENDS_FIELD, b"[]")),
                            fields[1:])
        if any(stored.get(field) for field in fields) and stored.get(LAYOUT_FIELD) != self.writer.layout():
            count = sum(len(stored.get(field, b"")) for field in fields) // self.codec.dtype().itemsize
            self.store.stats.rows_refused += count
            log.warning("slot %d: about %d stored records not adopted: stored under another layout (another "
                        "forecaster, policy or history length, or another format?)", slot, count)
            return None
        return fields

    def _records(self, stored: dict[int, dict[bytes, bytes]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        """Of several slots' stored hashes, read together (one replay for all: a connection is in
        one slot, so their records never mix): (the live records; each one's slot; the blob
        holding its last record, numbered across the slots; the slots accepted -> their fields)."""
        accepted = {slot: fields for slot, hashed in stored.items()
                    if (fields := self._accepted(slot, hashed)) is not None}
        whole, delta = self.codec.dtype().itemsize, self.codec.delta_dtype().itemsize
        bases = [stored[slot].get(BASE_FIELD, b"") for slot in accepted]
        chunks = [stored[slot].get(field, b"") for slot, fields in accepted.items() for field in fields[1:]]
        # each blob's slot and its number (bases first, then every slot's chunks in order), and
        # how many records it holds: a record's blob is found from its index
        blob_slot = [*accepted, *(slot for slot, fields in accepted.items() for _ in fields[1:])]
        sizes = [len(blob) // whole for blob in bases] + [len(blob) // delta for blob in chunks]
        # the bytes joined, then read as one array (concatenating structured arrays promotes
        # their dtypes field by field, slower than the bytes)
        packed, last, inexact = latest(self.codec.unpack(b"".join(bases)),
                                       self.codec.unpack(b"".join(chunks), delta=True), self.codec.rings())
        self.store.stats.rings_inexact += inexact
        blob_of = np.repeat(np.arange(len(sizes)), sizes)[last]
        return packed, np.array(blob_slot, np.int64)[blob_of] if len(packed) else blob_of, blob_of, accepted

    def _segments(self, stored: dict[int, dict[bytes, bytes]], accepted: dict, packed: np.ndarray,
                  blob_of: np.ndarray) -> np.ndarray:
        """The segment records of the live connections `packed` (as `_records` read them, the
        blob of each one's last record `blob_of`), from the same slots' hashes."""
        codec = self.segment_codec
        bases = [stored[slot].get(SEG_BASE_FIELD, b"") for slot in accepted]
        chunks = [stored[slot].get(segment_field(field), b"") for slot, fields in accepted.items()
                  for field in fields[1:]]
        size = codec.delta_dtype().itemsize
        segments, inexact = latest_segments(dict(zip(packed["key"].tolist(), blob_of.tolist())),
                                            codec.unpack(b"".join(bases)), codec.unpack(b"".join(chunks), delta=True),
                                            [len(blob) // codec.dtype().itemsize for blob in bases],
                                            [len(blob) // size for blob in chunks], codec.ring())
        self.store.stats.rings_inexact += inexact
        return segments

    def adopt(self, slot: int, stored: dict[bytes, bytes], now: int) -> int:
        """The connections of one slot's stored hash into the table; how many were new here."""
        return self.adopt_slots({slot: stored}, now)

    def adopt_slots(self, stored: dict[int, dict[bytes, bytes]], now: int) -> int:
        """The connections of several slots' stored hashes into the table (read together: numpy
        work per group of slots, not per slot); how many were new here."""
        packed, slot_of, blob_of, accepted = self._records(stored)
        if not len(packed):
            return 0
        node_ids, conn_ids = record_keys(packed)
        table = self.table
        frontends = self.writer.frontends
        names = [names[i] if i < len(names) else "" for names, i in
                 zip(map(frontends.__getitem__, slot_of.tolist()), packed["frontend"].tolist())]
        class_ids = np.array([table.class_of(n, f) for n, f in zip(node_ids.tolist(), names)], np.int32)
        rows, fresh = table.adopt(node_ids, conn_ids, class_ids)
        held = rows >= 0
        new = fresh & held
        deadline = np.maximum(packed["table.expires"], now + self.grace_ms)
        self.codec.restore(rows[new], packed[new])
        self.segments_adopted += self.segment_codec.restore(rows[new], packed["key"][new],
                                                            self._segments(stored, accepted, packed, blob_of))
        table.expires[rows[new]] = deadline[new]
        known = held & ~fresh
        table.expires[rows[known]] = np.maximum(table.expires[rows[known]], deadline[known])
        self.writer.remember(rows[held], slot_of[held])
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
            self.adopt_slots(stored, now_ms())
            done += group
            self.store.stats.load_batches += 1
        self.store.stats.load_seconds += time.perf_counter() - began
        return done
