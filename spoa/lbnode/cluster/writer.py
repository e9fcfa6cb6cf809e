"""Per interval, what changed in the owned slots, written to the store in one round trip per primary.

A slot's state is one hash, `NS:{NS.SLOT}:rows` (slots.slot_key), of a few fields:
- `base`: the whole records (rows.RowCodec) of every connection of the slot, back to back;
- `c:N` (N = 1, 2, ...): a chunk per interval since the base: the delta records (each
  history ring's last cells only, deltas.py) of the connections refreshed in it, and
  deletions of those that ended (closed, expired); numbers go on past a compaction (`numbers`),
  so a compaction lost by a failover leaves older chunks that still sort before newer ones;
- `g:base` and `g:N`: the segment records (segments.py) of the same connections as `base`
  and `c:N`, whole and delta likewise;
- `layout` (what a record holds, and the chunks' format) and `frontends` (the names the
  records index);
- `epoch`: incremented by each node that gains the slot; every write is a small Lua script
  that applies only under the writer's epoch (WRITE_SCRIPT), so a former owner still
  writing is refused by the store itself.
A loader applies base, then the chunks in order (rows.latest: rings rebuilt, deltas.replay).

So per interval and slot the write is one EVALSHA (WRITE_SCRIPT, loaded once per client)
setting the chunk's fields, blobs built with whole-array operations (no Python work per
connection): rows are ordered by slot before their records are made (`by_slot`), and each
slot's records are a memoryview slice of one array (`slot_views`). Every `COMPACT_EVERY` chunks the slot is compacted in
the same script: a new base from the table (which holds the slot's whole state), an HDEL of
its chunks and a PEXPIRE, the garbage-collection backstop (`cluster.gc_ms`, far longer than
COMPACT_EVERY intervals) for a slot nobody owns any more. Slots compact in turn (their counts
start staggered), so each interval rewrites about 1/COMPACT_EVERY of them. A slot gained from
another node gets a base at the first write (its chunks, loaded, deleted): from then on only
its owner writes it.

The commands go out packed as RESP, each primary's share at once (Store.packed), so the client
costs a reply read per slot rather than redis-py's ≈ 30 µs of Python per pipelined command. A
flush the store does not acknowledge is kept and sent with the next interval's changes
(appended: the later records win); a slot whose kept chunks reach COMPACT_EVERY gets a base
instead, so an outage costs at most one rewrite of each slot when the store is back, never a
backlog.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .deltas import DELTA_CELLS
from .rows import RowCodec
from .segments import SEG_BASE_FIELD, SegmentCodec, segment_field
from ...wire.slots import conn_keys, conn_slots
from .store import Store, bulk, slot_key

LAYOUT_FIELD = b"layout"
FRONTENDS_FIELD = b"frontends"
BASE_FIELD = b"base"
CHUNK_PREFIX = b"c:"
EPOCH_FIELD = b"epoch"
COMPACT_EVERY = 16  # chunks after which a slot is rewritten as one base

# A slot's write, applied only by the owner of its current epoch: a node that gains a slot
# increments the slot's epoch (HINCRBY, in the same round trip as its load), so an old owner
# that has not noticed yet has its writes refused by the store (0), never interleaved with the
# new owner's. A stored epoch below the writer's is the store's loss (a failover dropped the
# increment before it replicated): the owner's write sets it back. KEYS[1]: the slot's hash;
# ARGV: epoch, PEXPIRE ms (0: none), number of fields to set, then field, value, ..., then the
# fields to delete.
WRITE_SCRIPT = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if stored > tonumber(ARGV[1]) then return 0 end
if stored < tonumber(ARGV[1]) then redis.call('HSET', KEYS[1], 'epoch', ARGV[1]) end
local n = tonumber(ARGV[3])
if n > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 4, 3 + 2 * n)) end
if #ARGV > 3 + 2 * n then redis.call('HDEL', KEYS[1], unpack(ARGV, 4 + 2 * n, #ARGV)) end
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""


def by_slot(items: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Items (rows, records) and their slots ordered by slot (stable); as given when they already
    are. Rows are ordered before their records are made: sorting the records after would move
    every byte of them once more. Slots are < 16384 (cluster.slots): as uint16 numpy's stable
    sort is a radix sort, linear."""
    if len(slots) < 2 or (slots[1:] >= slots[:-1]).all():
        return items, slots
    order = np.argsort(slots.astype(np.uint16), kind="stable")
    return items[order], slots[order]


def blob_pieces(views: list[memoryview]) -> tuple | list:
    """Records (the bytes of record arrays, `slot_views`) as one field's RESP argument: its
    length, the views as they are (no copy: the socket write joins a shard's pieces once), the
    line end."""
    if len(views) == 1:
        return b"$%d\r\n" % views[0].nbytes, views[0], b"\r\n"
    return [b"$%d\r\n" % sum(v.nbytes for v in views), *views, b"\r\n"]


def slot_views(records: np.ndarray, slots: np.ndarray) -> tuple[list[int], list[memoryview]]:
    """(the slots present, each one's records as a view of their bytes) of records and their
    slots, both in slot order: one memoryview slice per slot, nothing copied."""
    flat = memoryview(np.ascontiguousarray(records).view(np.uint8))
    starts = np.r_[0, np.flatnonzero(np.diff(slots)) + 1]
    bounds = (np.r_[starts, len(slots)] * records.dtype.itemsize).tolist()
    return slots[starts].tolist(), [flat[a:b] for a, b in zip(bounds, bounds[1:])]


def chunk_field(number: int) -> bytes:
    return CHUNK_PREFIX + str(number).encode()


def chunk_number(field: bytes) -> int | None:
    """N of a `c:N` field; None for the other fields."""
    return int(field[len(CHUNK_PREFIX):]) if field.startswith(CHUNK_PREFIX) else None


def _of_slots(records: np.ndarray, of: np.ndarray, slots: set[int]) -> dict[int, memoryview]:
    """The records (in slots `of`) of each of `slots`, a view of their bytes each (empty: none)."""
    found = dict(zip(*slot_views(*by_slot(records, of)))) if len(of) else {}
    return {slot: found.get(slot, memoryview(b"")) for slot in slots}


class StoreWriter:
    def __init__(self, store: Store, table: Any, namespace: str, slots: int, gc_ms: int) -> None:
        self.store = store
        self.table = table
        self.codec = RowCodec(table)
        self.segment_codec = SegmentCodec(table)
        self.namespace = namespace
        self.slots = slots
        self.gc_ms = gc_ms
        self.row_slot = np.full(0, -1, np.int64)  # each table row's slot, as remembered
        self.row_born = np.full(0, -1, np.int64)  # the row's allocation order then (LeaseTable.born)
        self.pending: dict[int, list[np.ndarray]] = {}  # slot -> record arrays not yet written, in order
        self.pending_segments: dict[int, list[np.ndarray]] = {}  # slot -> their connections' segment records
        self.chunks: dict[int, Sequence[bytes]] = {}  # slot -> its chunk fields in the store since its base
        # slot -> N of its last chunk written: numbers go on past a compaction, so that chunks
        # older than a base that did not survive (a failover losing it) still load before newer ones
        self.numbers: dict[int, int] = {}
        self._keys: dict[int, tuple[str, bytes]] = {}  # slot -> its store key, and it as a RESP argument
        # slot -> (epoch, script SHA, key, the head of its chunk command under them)
        self._prefixes: dict[int, tuple[int, bytes, str, bytes]] = {}
        self.needs_base: set[int] = set()  # slots to rewrite whole at the next flush
        self.frontends: dict[int, list[str]] = {}  # slot -> its frontend names, as stored
        self.frontend_index = np.full((slots, 0), -1, np.int32)  # slot x class id -> index in its names
        self.frontends_changed: set[int] = set()
        self.flushes = 0  # the compaction turn
        self.kept = False  # the last flush was not acknowledged: its records wait in pending
        self.epochs: dict[int, int] = {}  # slot -> the ownership epoch this node writes it under

    def layout(self) -> bytes:
        """What a connection's and a segment's record hold, and the chunks' format (deltas.py):
        equal layouts read each other's."""
        return b"delta%d|" % DELTA_CELLS + self.codec.layout() + b"|" + self.segment_codec.layout()

    def slots_of(self, rows: np.ndarray) -> np.ndarray:
        """The slots of table rows; remembered, so that a compaction finds a slot's rows without hashing."""
        table = self.table
        slots = conn_slots(table.node[rows], table.conn_id[rows], self.slots)
        self.remember(rows, slots)
        return slots

    def remember(self, rows: np.ndarray, slots: np.ndarray) -> None:
        if len(self.row_slot) < self.table.capacity:
            for name in ("row_slot", "row_born"):
                grown = np.full(self.table.capacity, -1, np.int64)
                old = getattr(self, name)
                grown[:len(old)] = old
                setattr(self, name, grown)
        self.row_slot[rows] = slots
        self.row_born[rows] = self.table.born[rows]

    def current_slots(self, rows: np.ndarray) -> np.ndarray:
        """The slots of held rows: remembered, or hashed for the rows allocated since (a row
        whose allocation order differs from the remembered one holds another connection now)."""
        slots = np.full(len(rows), -1, np.int64)
        known = rows < len(self.row_slot)
        known[known] = self.row_born[rows[known]] == self.table.born[rows[known]]
        slots[known] = self.row_slot[rows[known]]
        if not known.all():
            slots[~known] = self.slots_of(rows[~known])
        return slots

    def _frontend_indexes(self, rows: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Each row's index into its slot's frontend names (new names appended: a handful per
        slot), looked up in `frontend_index` (slot x class id); only pairs not seen yet there
        are found by name."""
        table = self.table
        classes = table.class_id[rows]
        index = self.frontend_index
        if index.shape[1] < len(table.class_names):
            grown = np.full((self.slots, max(2 * index.shape[1], len(table.class_names))), -1, np.int32)
            grown[:, :index.shape[1]] = index
            index = self.frontend_index = grown
        found = index[slots, classes]
        unknown = found < 0
        if unknown.any():
            # (slot, class) pairs as one integer: a 1-D unique is an order of magnitude faster than axis=0
            for pair in np.unique(slots[unknown] << 32 | classes[unknown].astype(np.int64)).tolist():
                slot, cid = pair >> 32, pair & 0xFFFFFFFF
                known = self.frontends.setdefault(slot, [])
                name = table.class_names[cid]
                if name not in known:
                    known.append(name)
                    self.frontends_changed.add(slot)
                index[slot, cid] = known.index(name)
            found = index[slots, classes]
        return found.astype(np.uint32)

    def _add(self, records: np.ndarray, slots: np.ndarray, pending: dict | None = None) -> None:
        """Records into `pending` (self.pending by default): one view of their bytes per slot,
        no copy when they come in slot order (snapshot's do, `by_slot`)."""
        if not len(slots):
            return
        pending = self.pending if pending is None else pending
        for slot, view in zip(*slot_views(*by_slot(records, slots))):
            pending.setdefault(slot, []).append(view)

    def snapshot(self, rows: np.ndarray, owned: np.ndarray) -> None:
        """The records of `rows` (just refreshed) into pending; rows of slots not in `owned`
        (bool[slots]) are not this node's to write."""
        if not len(rows):
            return
        slots = self.current_slots(rows)
        mine = owned[slots]
        rows, slots = by_slot(rows[mine], slots[mine])
        table = self.table
        keys = conn_keys(table.node[rows], table.conn_id[rows])
        self._add(self.codec.pack(rows, keys, self._frontend_indexes(rows, slots), delta=True), slots)
        self._add(*self.segment_codec.pack(rows, keys, slots, delta=True), self.pending_segments)

    def forget(self, rows: np.ndarray, owned: np.ndarray) -> None:
        """Rows ending here (closed, expired): deletions in their slots' next chunk."""
        slots = self.current_slots(rows)
        mine = owned[slots]
        rows, slots = by_slot(rows[mine], slots[mine])
        table = self.table
        self._add(self.codec.deletions(conn_keys(table.node[rows], table.conn_id[rows])), slots)

    def adopted(self, slot: int, epoch: int, frontends: list[str], chunks: list[bytes]) -> None:
        """A slot just loaded under its new `epoch`: its names, and its chunks to delete when
        its base is written."""
        self.epochs[slot] = epoch
        self.frontends[slot] = frontends
        self.frontend_index[slot] = -1
        self.chunks[slot] = chunks
        self.numbers[slot] = max(map(chunk_number, chunks), default=0)
        self.needs_base.add(slot)

    def drop(self, slots: list[int]) -> None:
        """Slots this node no longer owns: nothing more of them is written from here."""
        for slot in slots:
            self.pending.pop(slot, None)
            self.pending_segments.pop(slot, None)
            self.chunks.pop(slot, None)
            self.numbers.pop(slot, None)
            self.epochs.pop(slot, None)
            self.frontends.pop(slot, None)
            self.frontend_index[slot] = -1
            self.needs_base.discard(slot)
            self.frontends_changed.discard(slot)

    def _bases(self, slots: set[int]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """The base records of each slot, from the table: every connection it holds there; and
        their segments' records."""
        table = self.table
        rows = np.flatnonzero(table.keys.in_use)
        slots_of_rows = self.current_slots(rows)
        mine = np.isin(slots_of_rows, list(slots))
        rows, slots_of_rows = by_slot(rows[mine], slots_of_rows[mine])
        keys = conn_keys(table.node[rows], table.conn_id[rows])
        records = self.codec.pack(rows, keys, self._frontend_indexes(rows, slots_of_rows))
        return (_of_slots(records, slots_of_rows, slots),
                _of_slots(*self.segment_codec.pack(rows, keys, slots_of_rows), slots))

    async def taken_over(self, slots: list[int]) -> list[int] | None:
        """Of `slots`, those whose stored epoch is past the one this node writes them under:
        another node gained them since (None when the store did not answer)."""
        if not slots:
            return []
        stored = await self.store.pipeline("slot epochs", lambda pipe: [
            pipe.hget(slot_key(self.namespace, slot), EPOCH_FIELD) for slot in slots])
        if stored is None:
            return None
        return [slot for slot, epoch in zip(slots, stored) if int(epoch or 0) > self.epochs.get(slot, 0)]

    def _key(self, slot: int) -> tuple[str, bytes]:
        """The slot's store key, and it as a RESP argument (made once per slot)."""
        known = self._keys.get(slot)
        if known is None:
            key = slot_key(self.namespace, slot)
            known = self._keys[slot] = (key, bulk(key.encode()))
        return known

    async def flush(self) -> bool:
        """Everything pending as one pipeline; False (kept for the next) when unacknowledged."""
        self.flushes += 1
        # each slot in its turn (staggered by slot), or when an outage piled up its chunks (only
        # after an unacknowledged flush can a slot hold more than one interval's)
        turn = range((-self.flushes) % COMPACT_EVERY, self.slots, COMPACT_EVERY)
        self.needs_base.update(slot for slot in turn if slot in self.pending and self.chunks.get(slot))
        if self.kept:
            self.needs_base.update(slot for slot, kept in self.pending.items() if len(kept) >= COMPACT_EVERY)
        # what the flush sends; what comes while it waits (records' closes) goes to the next
        pending, self.pending = self.pending, {}
        needs_base, self.needs_base = self.needs_base, set()
        frontends_changed, self.frontends_changed = self.frontends_changed, set()
        pending_segments, self.pending_segments = self.pending_segments, {}
        touched = set(pending) | needs_base | frontends_changed
        if not touched:
            return True
        stats = self.store.stats
        began = time.perf_counter()
        sha = await self.store.script(WRITE_SCRIPT)
        replies = None
        if sha is not None:
            commands, after, payload, records = self._commands(sha.encode(), touched, pending, pending_segments,
                                                              needs_base, frontends_changed)
            replies = await self.store.packed("state write", commands)
        self.kept = replies is None
        if replies is None:
            stats.write_errors += 1
            for into, sent in ((self.pending, pending), (self.pending_segments, pending_segments)):
                for slot, kept in sent.items():  # older than what came meanwhile: before it
                    into[slot] = kept + into.get(slot, [])
            self.needs_base |= needs_base
            self.frontends_changed |= frontends_changed
            return False
        took = time.perf_counter() - began
        stats.write_batches += 1
        stats.write_commands += len(replies)
        stats.write_bytes += payload
        stats.rows_written += records
        stats.write_seconds += took
        stats.last_write_seconds = took
        for (slot, chunks, number), written in zip(after, replies):
            if written:
                self.chunks[slot] = chunks
                if number:
                    self.numbers[slot] = number
            else:  # another node took the slot (a newer epoch): ours is history; the next rebalance drops it
                stats.stale_writes += 1
        return True

    def _commands(self, sha: bytes, touched: set[int], pending: dict, pending_segments: dict, needs_base: set[int],
                  frontends_changed: set[int]) -> tuple[list, list, int, int]:
        """(each touched slot's EVALSHA as RESP pieces with its key, for Store.packed; each
        slot's chunk list once written; payload bytes; records). Built straight as pieces,
        records as views (`blob_pieces`): at a few thousand slots per interval, each µs of
        Python per slot counts."""
        bases, segment_bases = self._bases(needs_base) if needs_base else ({}, {})
        layout = bulk(LAYOUT_FIELD) + bulk(self.layout())
        head = bulk(b"EVALSHA") + bulk(sha) + bulk(b"1")
        gc_ms, no_gc = bulk(b"%d" % self.gc_ms), bulk(b"0")
        base_names = bulk(BASE_FIELD), bulk(SEG_BASE_FIELD)
        whole, delta = self.codec.dtype().itemsize, self.codec.delta_dtype().itemsize  # record sizes
        commands, after = [], []
        payload = records = 0
        prefixes, numbers, epochs, chunks_of = self._prefixes, self.numbers, self.epochs, self.chunks
        for slot in touched:
            rows = pending.get(slot)
            segs = pending_segments.get(slot)
            if (rows is not None and segs is not None and len(rows) == 1 and len(segs) == 1 and slot not in bases
                    and slot not in frontends_changed):
                # the common case, one interval's chunk: its command's head made once per slot
                # and epoch, the rest two small formats and the two views
                epoch = epochs.get(slot, 0)
                known = prefixes.get(slot)
                if known is None or known[0] != epoch or known[1] != sha:
                    key, key_arg = self._key(slot)
                    known = prefixes[slot] = (epoch, sha, key, b"*11\r\n" + head + key_arg + bulk(b"%d" % epoch) +
                                              no_gc + bulk(b"2"))
                written = numbers.get(slot, 0) + 1
                number = b"%d" % written
                r, g = rows[0], segs[0]
                commands.append((known[2], (known[3], b"$%d\r\nc:%s\r\n$%d\r\n" % (len(number) + 2, number, r.nbytes), r,
                                            b"\r\n$%d\r\ng:%s\r\n$%d\r\n" % (len(number) + 2, number, g.nbytes), g,
                                            b"\r\n")))
                after.append((slot, (*chunks_of.get(slot, ()), b"c:" + number), written))
                payload += 2 * len(number) + 4 + r.nbytes + g.nbytes
                records += r.nbytes // delta
                continue
            key, key_arg = self._key(slot)
            chunks = self.chunks.get(slot, ())
            written = 0  # the number of the chunk this command writes (0: none)
            parts = [b"", head, key_arg, bulk(b"%d" % self.epochs.get(slot, 0)), no_gc, b""]
            fields = 0
            names_due = slot in frontends_changed
            if slot in bases:
                parts[4] = gc_ms
                rows, segs = bases[slot], segment_bases[slot]
                parts += (base_names[0], *blob_pieces([rows]), base_names[1], *blob_pieces([segs]), layout)
                payload += rows.nbytes + segs.nbytes + len(layout)
                records += rows.nbytes // whole
                fields += 3
                names_due = True
                gone = [bulk(f) for chunk in chunks for f in (chunk, segment_field(chunk))]
                chunks = ()
            else:
                gone = ()
                if slot in pending:
                    written = self.numbers.get(slot, 0) + 1
                    field = chunk_field(written)
                    chunks = (*chunks, field)
                    rows = pending[slot]
                    parts += (bulk(field), *blob_pieces(rows))
                    payload += len(field) + sum(r.nbytes for r in rows)
                    records += sum(r.nbytes for r in rows) // delta
                    fields += 1
                    if slot in pending_segments:
                        segs = pending_segments[slot]
                        parts += (bulk(segment_field(field)), *blob_pieces(segs))
                        payload += len(field) + sum(s.nbytes for s in segs)
                        fields += 1
            if names_due:
                names = json.dumps(self.frontends.get(slot, [])).encode()
                parts += (bulk(FRONTENDS_FIELD), bulk(names))
                payload += len(FRONTENDS_FIELD) + len(names)
                fields += 1
            parts[0] = b"*%d\r\n" % (7 + 2 * fields + len(gone))
            parts[5] = bulk(b"%d" % fields)
            parts += gone
            commands.append((key, parts))
            after.append((slot, chunks, written))
        return commands, after, payload, records
