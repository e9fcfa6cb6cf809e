"""One LB node's part in the tier: membership, the slots it owns, their state in the store.

`TierMember.round()` runs once per interval, after the node's interval (LbNode.tick, whose
`after_interval` hook has snapshotted what changed):
1. every third of the membership lease: renew (or join); read the live set;
2. fenced (its membership lapsed): drop everything it holds, own nothing, answer nothing;
   the next round joins again;
3. ownership from the live set (rendezvous, slots.owners): slots lost are handed over
   (rows released, nothing deleted from the store: it is the new owner's state now); slots
   gained are loaded and adopted before the next interval can expire anything in them;
4. one pipelined write of the interval's changes (writer.StoreWriter).

With the store unreachable nothing of this blocks the node: each step is bounded by
`cluster.timeout_ms`, the node keeps what it owns and answers from memory, and the next
round retries (a gained slot whose load failed stays not owned until it loads).
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace
from typing import Any

import numpy as np

from ...netutil import now_ms
from ...wire.packet import CONN_COLUMNS, SEG_COLUMNS
from .loader import StateLoader
from .membership import FENCED, MEMBER, Membership
from ...wire.slots import conn_slots, owners
from .store import Store
from .writer import StoreWriter

log = logging.getLogger("spoa.lbnode.cluster")


def select_records(batch: Any, keep: np.ndarray) -> SimpleNamespace:
    """The records of a ColumnBatch where `keep` (bool[n]), with their segments, as the
    columns LeaseTable reads."""
    counts = np.diff(batch.seg_start)
    kept_segments = np.repeat(keep, counts)
    out = SimpleNamespace(n=int(np.count_nonzero(keep)), datagrams=batch.datagrams, frontends=batch.frontends,
                          seg_start=np.concatenate([[0], np.cumsum(counts[keep])]).astype(np.int64))
    # every column a ColumnBatch has (node.columns() builds only those the table reads)
    for columns, rows in ((CONN_COLUMNS, keep), (SEG_COLUMNS, kept_segments)):
        for name, _dtype in columns:
            column = getattr(batch, name, None)
            if column is not None:
                setattr(out, name, column[rows])
    return out


class TierMember:
    def __init__(self, table: Any, node_id: int, cluster: dict, advertise: str) -> None:
        self.table = table
        self.slots = cluster["slots"]
        self.store = Store(cluster["store"], cluster["timeout_ms"])
        self.membership = Membership(self.store, cluster["namespace"], node_id, advertise, cluster["membership_ms"])
        self.writer = StoreWriter(self.store, table, cluster["namespace"], self.slots, cluster["gc_ms"])
        self.loader = StateLoader(self.store, table, self.writer, cluster["namespace"], cluster["grace_ms"])
        self.owned = np.zeros(self.slots, bool)  # slots this node owns (and has loaded)
        self.owner_ids = np.zeros(self.slots, np.uint64)  # each slot's owner by the last live set (0: none)
        self.handed_over = 0  # connections let go to a new owner
        self.records_not_owned = 0  # records received for slots another node owns (not ingested here)
        self._next_renewal = 0.0
        table.on_release = self._released

    @property
    def fenced(self) -> bool:
        return self.membership.state == FENCED

    def answering(self) -> bool:
        return self.membership.answering()

    def after_interval(self, changed: np.ndarray) -> None:
        """LbNode.tick's hook: the rows refreshed in the interval just ended, their new state final."""
        if self.answering():
            self.writer.snapshot(changed, self.owned)

    def owned_records(self, batch: Any) -> Any:
        """LbNode.on_batch's hook: the batch kept to the records of slots this node owns (the
        others are their owners'; with agents that send every record to every LB node, each
        node so holds only its share). Counted in records_not_owned."""
        slots = conn_slots(batch.node_id, batch.conn_id, self.slots)
        keep = self.owned[slots]
        dropped = len(keep) - int(np.count_nonzero(keep))
        if not dropped:
            return batch
        self.records_not_owned += dropped
        return select_records(batch, keep)

    def own_hints(self, hints: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """LbNode.tick's hints (by server node) kept to the connections this node owns; none when
        it may not answer (fenced, or its membership unconfirmed)."""
        if not self.answering():
            return {}
        kept = {}
        for node_id, entries in hints.items():
            slots = conn_slots(np.full(len(entries), node_id, np.uint64), entries["conn_id"], self.slots)
            mine = entries[self.owned[slots]]
            if len(mine):
                kept[node_id] = mine
        return kept

    def _released(self, rows: np.ndarray) -> None:
        if self.answering():
            self.writer.forget(rows, self.owned)

    async def round(self) -> None:
        membership = self.membership
        now = time.monotonic()
        if now >= self._next_renewal:
            self._next_renewal = now + membership.renew_every
            state = await membership.renew()
            if state == FENCED:
                log.warning("membership lapsed (frozen or cut off longer than cluster.membership_ms): fenced; "
                            "dropping %d connections, rejoining", len(self.table))
                self.owned[:] = False
                rows = np.flatnonzero(self.table.keys.in_use)
                self.table.hand_over(rows)
                self.handed_over += len(rows)
                self.writer.drop(list(range(self.slots)))
                self._next_renewal = now  # join again next round
                return
            if await membership.read_live() is not None and state == MEMBER:
                await self._rebalance(membership.live)
        if self.answering():
            await self.writer.flush()

    async def _rebalance(self, live: list[int]) -> None:
        owner = owners(live, self.slots)
        ids = np.array(live, np.uint64)
        self.owner_ids = np.where(owner >= 0, ids[np.maximum(owner, 0)] if len(ids) else 0, 0).astype(np.uint64)
        wanted = self.owner_ids == np.uint64(self.membership.node_id)
        gained = np.flatnonzero(wanted & ~self.owned).tolist()
        if gained:
            loaded = await self.loader.load(gained, now_ms)
            wanted[sorted(set(gained) - set(loaded))] = False  # not owned until loaded: retried next round
        self._own(wanted)

    def _own(self, wanted: np.ndarray) -> None:
        lost = np.flatnonzero(self.owned & ~wanted)
        if len(lost):
            rows = np.flatnonzero(self.table.keys.in_use)
            slots = self.writer.current_slots(rows)
            leaving = rows[np.isin(slots, lost)]
            self.table.hand_over(leaving)
            self.handed_over += len(leaving)
            self.writer.drop(lost.tolist())
        self.owned = wanted

    async def close(self) -> None:
        """A clean stop: what changed is written, the membership given up (others take over at once)."""
        if self.answering():
            await self.writer.flush()
        await self.membership.leave()
        await self.store.close()
