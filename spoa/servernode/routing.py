"""Which LB node each connection's record goes to: the tier map's owner of its slot.

With a tier of LB nodes (docs/tier.md) each connection belongs to one slot and each slot to
one live LB node. The LB nodes tell the server node who is live (spoa.wire.tier_map); the
Router computes every slot's owner from that with the LB nodes' own function
(spoa.wire.slots.owners) and splits each interval's records by owner: each LB node gets its
share, not everything.

Until a map comes (LB nodes without a tier never send one), and when none has come for
`ttl_ms` (every announcing LB node silent: a map would be stale), there is no route and the
publisher sends every record to every configured LB node, as without a tier; each keeps only
its own. Of several maps the newest view wins (TierMap.view_ms): an LB node that has not yet
re-read the live set after a change cannot steer records back to a dead node.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import numpy as np

from ..wire.packet import RecordBatch
from ..wire.slots import conn_slots, owners
from ..wire.tier_map import TierMap

log = logging.getLogger("spoa.servernode.routing")


class Router:
    def __init__(self, ttl_ms: int) -> None:
        self.ttl = ttl_ms / 1000
        self.map: TierMap | None = None
        self.targets: list[tuple[int, Any]] = []  # (family, socket address) of each member, map order
        self.owner: np.ndarray | None = None  # index into targets of each slot's owner
        self.maps_accepted = 0  # newer views taken (changed or not)
        self.maps_stale = 0  # maps older than the one held, ignored
        self.maps_unresolved = 0  # maps refused: a member's address does not resolve
        self.changes = 0  # times the live set changed (routes recomputed)
        self._expires = 0.0  # monotonic time the held map goes stale
        self._expired_said = False

    @property
    def fresh(self) -> bool:
        """Is there a map to route by (one came, and not longer than the TTL ago)?"""
        return self.map is not None and time.monotonic() < self._expires

    def route(self) -> bool:
        """fresh, for a send: a map gone stale is said once."""
        if self.fresh:
            return True
        if self.map is not None and not self._expired_said:
            self._expired_said = True
            log.warning("no tier map from any LB node for %.1f s: sending every record to every LB node until "
                        "one comes", self.ttl)
        return False

    def take(self, tier_map: TierMap) -> None:
        """A map an LB node sent (authenticated): kept if its view is not older than ours."""
        held = self.map
        if held is not None and tier_map.view_ms < held.view_ms:
            self.maps_stale += 1
            return
        if held is None or tier_map.members != held.members or tier_map.slots != held.slots:
            try:
                infos = [socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
                         for _node_id, host, port in tier_map.members]
            except OSError as exc:
                self.maps_unresolved += 1
                log.warning("tier map from LB node %d names an address that does not resolve (%s): ignored",
                            tier_map.lbnode_id, exc)
                return
            self.targets = [(info[0], info[4]) for info in infos]
            self.owner = owners(tier_map.live, tier_map.slots)
            self.changes += 1
            log.info("tier map from LB node %d: %d LB nodes live (%s); records go to their slots' owners",
                     tier_map.lbnode_id, len(tier_map.members),
                     ", ".join(f"{host}:{port}" for _id, host, port in tier_map.members))
        self.map = tier_map
        self.maps_accepted += 1
        self._expires = time.monotonic() + self.ttl
        self._expired_said = False

    def split(self, node_id: int, batch: RecordBatch) -> list[tuple[int, RecordBatch]]:
        """(target index, its records) for each member owning some of `batch`, order kept."""
        n = len(batch)
        conn_ids = np.frombuffer(batch.conn_ids(), "S16")
        slots = conn_slots(np.full(n, node_id, np.uint64), conn_ids, self.map.slots)
        owner = self.owner[slots]
        order = np.argsort(owner, kind="stable")
        bounds = np.flatnonzero(np.diff(owner[order])) + 1
        return [(int(owner[group[0]]), batch.take(group)) for group in np.split(order, bounds) if len(group)]
