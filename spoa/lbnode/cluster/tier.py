"""One LB node's part in the tier: membership, the slots it owns, their state in the store.

`TierMember.round()` runs once per interval, after the node's interval (LbNode.tick, whose
`after_interval` hook has snapshotted what changed):
1. every third of the membership lease: renew (or join); read the live set; at the first
   renewal as a member (each join), read the traffic classes' priors (priors.py);
2. fenced (its membership lapsed): drop everything it holds, own nothing, answer nothing;
   the next round joins again;
3. ownership from the live set (rendezvous, slots.owners): slots lost are handed over
   (rows released, nothing deleted from the store: it is the new owner's state now); slots
   gained are loaded and adopted before the next interval can expire anything in them;
4. one pipelined write of the interval's changes (writer.StoreWriter); every PRIORS_EVERY
   rounds, the classes' priors.

With the store unreachable nothing of this blocks the node: each step is bounded by
`cluster.timeout_ms`, the node keeps what it owns and answers from memory, and the next
round retries (a gained slot whose load failed stays not owned until it loads).
"""

from __future__ import annotations

import logging
import socket
import time
from types import SimpleNamespace
from typing import Any

import numpy as np

from ...netutil import now_ms, parse_address
from ...wire.packet import CONN_COLUMNS, SEG_COLUMNS
from ...wire.tier_map import TierMap
from .loader import StateLoader
from .membership import FENCED, MEMBER, Membership
from .priors import PRIORS_EVERY, ClassPriors
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
        self.priors = ClassPriors(self.store, table, cluster["namespace"])
        self._priors_due = True  # read the classes' priors at the next round as a member (each join)
        self._rounds = 0
        self.owned = np.zeros(self.slots, bool)  # slots this node owns (and has loaded)
        self.owner_ids = np.zeros(self.slots, np.uint64)  # each slot's owner by the last live set (0: none)
        self.handed_over = 0  # connections let go to a new owner
        self.records_not_owned = 0  # records received for slots another node owns (not ingested here)
        self.records_forwarded = 0  # of those, records passed on to their owner (in forwarded datagrams)
        # live member id -> its advertised address resolved, where forwarded datagrams go
        self.member_addresses: dict[int, Any] = {}
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

    def owned_records(self, batch: Any, routed: list = ()) -> tuple[Any, list[tuple[bytes, Any, Any]]]:
        """LbNode.on_batch's hook: the batch kept to the records of slots this node owns, and
        what to forward, as (datagram, its sender, owner's address).

        The records of other nodes' slots are counted in records_not_owned. Of them, those in
        `routed` datagrams (BatchReceiver.routed: their sender's tier map sent them here) go on
        to their owners by this node's view, whole datagrams, one per owner (each owner takes
        only its records of it). Those of datagrams sent to every LB node are dropped: their
        owners got them too. A slot this node's view gives itself but that it has not loaded
        yet (a failed load, retried next round) has no one to forward to: its records are
        dropped like the rest; the next interval's records, with cumulative totals, restore
        what they said, and the adopted deadline's grace covers the interval.
        """
        slots = conn_slots(batch.node_id, batch.conn_id, self.slots)
        # A node that may not answer (woken from a freeze, its membership unconfirmed) takes
        # nothing in: its leases ran out meanwhile, and the records that piled up would count
        # as premature expiries; the renewal will fence it (or confirm it) within a third of a lease.
        keep = self.owned[slots] & self.answering()
        others = np.flatnonzero(~keep)
        if not len(others):
            return batch, []
        self.records_not_owned += len(others)
        forwards = self._forwards(others, slots[others], routed) if routed else []
        return select_records(batch, keep), forwards

    def _forwards(self, records: np.ndarray, slots: np.ndarray, routed: list) -> list[tuple[bytes, Any, Any]]:
        starts = np.fromiter((first for _data, _sender, first, _end in routed), np.int64, len(routed))
        ends = np.fromiter((end for _data, _sender, _first, end in routed), np.int64, len(routed))
        datagram = np.searchsorted(starts, records, side="right") - 1
        owner = self.owner_ids[slots]
        inside = (datagram >= 0) & (records < ends[np.maximum(datagram, 0)])
        me = np.uint64(self.membership.node_id)
        movable = inside & (owner != 0) & (owner != me)
        forwards = []
        for d, o in sorted(set(zip(datagram[movable].tolist(), owner[movable].tolist()))):
            address = self.member_addresses.get(o)
            if address is None:  # its advertised address did not resolve (logged at the map change)
                continue
            data, sender, _first, _end = routed[d]
            forwards.append((data, sender, address))
        self.records_forwarded += int(np.count_nonzero(movable))
        return forwards

    def tier_map(self, lbnode_id: int) -> TierMap | None:
        """The live set as this node last read it, for the server nodes (None while it may
        not answer: a fenced or unconfirmed node's view must not steer anyone)."""
        membership = self.membership
        if not self.answering() or not membership.live:
            return None
        members = []
        for node_id in membership.live:
            host, port = parse_address(membership.addresses[node_id])
            members.append((node_id, str(host), int(port)))
        return TierMap(lbnode_id, membership.read_ms, self.slots, tuple(members))

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
                self.table.recently_expired.clear()  # the new owners' business now, not a premature expiry of ours
                self._next_renewal = now  # join again next round
                self._priors_due = True
                return
            if membership.reasserted and state == MEMBER:
                await self._check_slots()
            if self._priors_due and state == MEMBER:
                self._priors_due = not await self.priors.load()  # retried next renewal when not answered
            if await membership.read_live() is not None and state == MEMBER:
                await self._rebalance(membership.live)
        if self.answering():
            await self.writer.flush()
            self._rounds += 1
            if self._rounds % PRIORS_EVERY == 0:
                await self.priors.write()

    async def _check_slots(self) -> None:
        """After a re-assert (membership.py): the slots another node gained while this one could
        not reach the store are handed over; what is still ours is kept as it is."""
        taken = await self.writer.taken_over(np.flatnonzero(self.owned).tolist())
        if taken is None:
            return  # the store did not answer: checked at the next renewal
        self.membership.reasserted = False
        if taken:
            log.warning("membership re-asserted after a store outage; %d slots were taken by another node "
                        "meanwhile: handed over", len(taken))
            wanted = self.owned.copy()
            wanted[taken] = False
            self._own(wanted)
        else:
            log.warning("membership key lost in a store outage (a failover of its primary?): re-asserted, "
                        "every slot still ours, nothing dropped")

    async def _rebalance(self, live: list[int]) -> None:
        self._resolve_members()
        owner = owners(live, self.slots)
        ids = np.array(live, np.uint64)
        self.owner_ids = np.where(owner >= 0, ids[np.maximum(owner, 0)] if len(ids) else 0, 0).astype(np.uint64)
        wanted = self.owner_ids == np.uint64(self.membership.node_id)
        gained = np.flatnonzero(wanted & ~self.owned).tolist()
        if gained:
            loaded = await self.loader.load(gained, now_ms)
            wanted[sorted(set(gained) - set(loaded))] = False  # not owned until loaded: retried next round
        self._own(wanted)

    def _resolve_members(self) -> None:
        """Each live member's advertised address as a socket address (resolved once per
        member, not per forward: `cluster.advertise` may be a name, e.g. in docker)."""
        resolved = {}
        for node_id, address in self.membership.addresses.items():
            if node_id == self.membership.node_id:
                continue
            if node_id in self.member_addresses:
                resolved[node_id] = self.member_addresses[node_id]
                continue
            try:
                host, port = parse_address(address)
                resolved[node_id] = socket.getaddrinfo(str(host), int(port), type=socket.SOCK_DGRAM)[0][4]
            except (OSError, ValueError) as exc:
                log.warning("member %d advertises %r, which does not resolve (%s): nothing is forwarded to it",
                            node_id, address, exc)
        self.member_addresses = resolved

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
            await self.priors.write()
        await self.membership.leave()
        await self.store.close()
