"""Membership of the tier under a lease in the store, and fencing.

Each LB node holds `NS:{NS.members}:node:ID` (value: its advertised address and an
incarnation token) with PX = `cluster.membership_ms`, renewed every third of it, and its id
in the set `NS:{NS.members}:ids`. The live set is the ids whose key exists (one MGET:
the hash tag puts every membership key on one shard). Ids whose key lapsed are pruned.

A renewal is `SET key token PX lease XX GET`: atomic, and its answer says whether the key
was still ours. When it was not (it lapsed: the node was frozen, or cut off from the store,
longer than its lease, and the others have taken over its slots), the node is **fenced**: it
answers nothing, drops what it holds (the new owners loaded it from the store) and joins
again as a new incarnation, loading whatever slots it then owns.

Between renewals a member answers while its last acknowledged renewal is younger than the
lease (measured from when that renewal was sent, on the monotonic clock). Past that it answers
only if the store is unreachable (its last renewal failed): the issue's rule that a node keeps
serving from memory while the store is down. A node that was frozen therefore stays silent
from the moment it wakes until its first renewal answers, and that answer fences it.

A store failover is not a lapse. When the primary holding the membership keys dies, every
renewal fails until its replica is promoted, and if that takes longer than the lease the
promoted replica has dropped every member's key (expiry times are absolute). A node whose key
is gone *while its own renewals were failing* therefore sets it again (**re-asserts**)
instead of fencing itself, and the tier checks in the store that none of its slots changed
hands meanwhile (TierMember: a slot whose stored epoch moved past this node's was taken by
another node, during a partition that cut only this one off: that slot is handed over, the
rest kept). For two renewal periods after a store outage ends, members missing from the live
set are kept in it (`settle_until`): each of the others re-asserts its key at its next renewal,
at most one renewal period after the store answers again (a second covers a renewal that was
still waiting out `cluster.timeout_ms` when the store came back), and reading them as gone
would move their slots for nothing. A whole lease would only delay the takeover of a node that
died with the store primary.
"""

from __future__ import annotations

import secrets
import time

from .store import Store

JOINING, MEMBER, FENCED = "joining", "member", "fenced"


def members_prefix(namespace: str) -> str:
    return f"{namespace}:{{{namespace}.members}}"


class Membership:
    def __init__(self, store: Store, namespace: str, node_id: int, advertise: str, lease_ms: int) -> None:
        self.store = store
        self.node_id = node_id
        self.advertise = advertise
        self.lease = lease_ms / 1000
        prefix = members_prefix(namespace)
        self.key = f"{prefix}:node:{node_id}"
        self.ids_key = f"{prefix}:ids"
        self.prefix = prefix
        self.state = JOINING
        self.token = ""
        self.incarnations = 0  # joins (the first and each after a fence)
        self.fences = 0  # times this node found its membership lapsed
        self.reasserts = 0  # times its key was found lost to a store outage and set again
        self.reasserted = False  # a re-assert whose slot check the tier has not made yet
        self.settle_until = -float("inf")  # monotonic: until then the live set keeps missing members
        self.renewed_at = -float("inf")  # monotonic time the last acknowledged renewal was sent
        self.renew_failed = False  # the last renewal got no answer (store unreachable)
        self.live: list[int] = []  # the last live set read (node ids, sorted)
        self.read_ms = 0  # unix ms that read was sent: the view's age in the slot map (newest wins)
        self.addresses: dict[int, str] = {}  # node id -> advertised address, of the live set

    @property
    def renew_every(self) -> float:
        return self.lease / 3

    @property
    def settle(self) -> float:
        """How long after a store outage missing members still count as live (module doc)."""
        return 2 * self.renew_every

    def answering(self, now: float | None = None) -> bool:
        """May this node send hints (and write state) now? See the module doc."""
        if self.state != MEMBER:
            return False
        now = time.monotonic() if now is None else now
        return now - self.renewed_at < self.lease or self.renew_failed

    async def renew(self) -> str:
        """Join, or renew; the state after it (FENCED when the key was found lapsed: the caller
        drops its state, and the next renew joins again)."""
        sent = time.monotonic()
        if self.state != MEMBER:
            token = f"{self.advertise}|{secrets.token_hex(8)}"
            # Plain SET: a key still there under our id is a previous incarnation of this node
            # (a restart within its lease), whose slots are ours again anyway.
            replies = await self.store.pipeline("membership join", lambda pipe: (
                pipe.set(self.key, token, px=int(self.lease * 1000)), pipe.sadd(self.ids_key, self.node_id)))
            if replies is None:
                self.renew_failed = True
                return self.state
            self.state, self.token, self.renewed_at, self.renew_failed = MEMBER, token, sent, False
            self.incarnations += 1
            return self.state
        previous = await self.store.call("membership renewal", lambda c: c.set(
            self.key, self.token, px=int(self.lease * 1000), xx=True, get=True))
        if previous is None and self.store.stats.unreachable:
            self.renew_failed = True
            return self.state
        if previous is None and self.renew_failed:
            return await self._reassert(sent)
        if previous is None or previous.decode() != self.token:
            self.state, self.renew_failed = FENCED, False
            self.fences += 1
            return self.state
        if self.renew_failed:  # the store is back: give the others time to re-assert theirs
            self.settle_until = time.monotonic() + self.settle
        self.renewed_at, self.renew_failed = sent, False
        return self.state

    async def _reassert(self, sent: float) -> str:
        """Our key is gone and our renewals were failing: the store lost it (see the module doc)."""
        done = await self.store.pipeline("membership reassert", lambda pipe: (
            pipe.set(self.key, self.token, px=int(self.lease * 1000)), pipe.sadd(self.ids_key, self.node_id)))
        if done is None:
            return self.state  # still failing: answering from memory, tried again next renewal
        self.renewed_at, self.renew_failed = sent, False
        self.reasserts += 1
        self.reasserted = True
        self.settle_until = time.monotonic() + self.settle
        return self.state

    async def read_live(self) -> list[int] | None:
        """The live set (sorted ids, this node included only while it is a member), or None
        when the store did not answer (the previous one stays)."""
        read_ms = time.time_ns() // 1_000_000
        ids = await self.store.call("membership read", lambda c: c.smembers(self.ids_key))
        if ids is None:
            return None
        ids = sorted(int(i) for i in ids)
        values = await self.store.call("membership read", lambda c: c.mget(
            [f"{self.prefix}:node:{i}" for i in ids])) if ids else []
        if values is None:
            return None
        live = {i: v.decode().split("|", 1)[0] for i, v in zip(ids, values) if v is not None}
        if time.monotonic() < self.settle_until:  # after a store outage: the others are re-asserting
            live.update({i: a for i, a in self.addresses.items() if i not in live and i != self.node_id})
        lapsed = [i for i in ids if i not in live and i != self.node_id]
        if lapsed:
            await self.store.call("membership prune", lambda c: c.srem(self.ids_key, *lapsed))
        if self.state != MEMBER:
            live.pop(self.node_id, None)
        self.live, self.addresses, self.read_ms = sorted(live), live, read_ms
        return self.live

    async def leave(self) -> None:
        """On a clean stop: the others take over at once instead of after the lease."""
        if self.state == MEMBER:
            await self.store.pipeline("membership leave", lambda pipe: (
                pipe.delete(self.key), pipe.srem(self.ids_key, self.node_id)))
        self.state = JOINING
