"""LB nodes of a tier, built from their configuration as the service builds them, fed records."""

from __future__ import annotations

import itertools

from spoa.config import LBNODE_SCHEMA, load
from spoa.lbnode.cluster.tier import TierMember
from spoa.lbnode.service import build_lbnode
from spoa.wire.records import ConnectionRecord

_NAMESPACES = itertools.count()


def namespace(name: str) -> str:
    """A key prefix no other test on the shared store uses."""
    return f"t{next(_NAMESPACES)}-{name}"


def lbnode_config(tmp_path, node_id: int, **cluster) -> dict:
    key = tmp_path / "lease.key"
    key.write_bytes(b"k" * 32)
    # the tests end intervals themselves (tick, round): a short interval lets them use short memberships
    overrides = {"lbnode.key_file": str(key), "lbnode.node_id": node_id, "lbnode.interval_ms": 100,
                 "lbnode.listen": f"127.0.0.1:{9000 + node_id}"}
    overrides.update({f"cluster.{k}": v for k, v in cluster.items()})
    return load(LBNODE_SCHEMA, None, overrides)


def tier_node(tmp_path, node_id: int, **cluster):
    """An LbNode with its TierMember attached (no sockets: records go straight to its table)."""
    config = lbnode_config(tmp_path, node_id, **cluster)
    lbnode = build_lbnode(config)
    lbnode.tier = TierMember(lbnode.table, node_id, config["cluster"],
                             config["cluster"]["advertise"] or config["lbnode"]["listen"])
    return lbnode


def record(i: int, total: int, flags: int = 0, frontend: str = "fe") -> ConnectionRecord:
    return ConnectionRecord(conn_id=i.to_bytes(16, "big"), src="192.0.2.1", src_port=1, dst="192.0.2.2",
                            dst_port=2, frontend=frontend, flags=flags, counter_source=0, granularity_level=0,
                            requested_lease_ms=0, predicted_lease_ms=0, lease_source=0, bytes_in_total=0,
                            bytes_out_total=total)
