"""What a lease-* SPOE message means, shared by both lease answers (spoa.servernode.lease_answer).

A message names HAProxy's client connection (sess.cid and the 4-tuple); the
answer is the lease in force for it, as sess.lease.* set-var actions. The
compiled answer reads canonical messages (uuid cid, typed addresses, integer
ports) in C and hands every other message to identity() here; its pure-Python
twin hands it every message. Both encode answers with encode_answer().
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from ..spop.codec import FrameWriter
from ..spop.constants import FrameType, Scope
from ..wire.records import LeaseSource, pack_key

# The arguments the answer reads, in one Message.get_addresses() pass (haproxy/spoe-lease.conf).
IDENTITY_ARGS = ("cid", "src", "src_port", "dst", "dst_port", "frontend")
# Distinct encoded answers kept (lease ms x source x level x anomaly): predicted
# leases vary, so the cache is bounded, not per connection.
MAX_ENCODED_ANSWERS = 4096

LEASE_SOURCE_NAMES = {LeaseSource.STANDARD: "standard", LeaseSource.PREDICTED: "predicted",
                      LeaseSource.FALLBACK: "fallback"}
LEASE_SOURCE_IDS = {name: int(source) for source, name in LEASE_SOURCE_NAMES.items()}

_HEX = frozenset("0123456789abcdefABCDEF")
_UUID_DASHES = (8, 13, 18, 23)


@dataclass(frozen=True)
class LeaseSettings:
    """What this server node accepts from the LB nodes (the spec's "pre-defined bounds")."""

    standard_ms: int = 30000  # used without a hint, or when a hint is refused
    min_ms: int = 1000  # a hint below this is refused (fallback)
    max_ms: int = 3_600_000  # a hint above this is refused (fallback)
    hint_ttl_ms: int = 5000  # a hint older than this is stale: the LB node went quiet
    refresh_fraction: float = 0.34  # publish a connection every lease * this (>= every interval)
    # sess.lease.class: "short" up to the first bound, "medium" up to the
    # second, "long" above: what TCP-mode frontends route on (no set-timeout there).
    class_bounds_ms: tuple[int, int] = (60_000, 600_000)

    def lease_class(self, lease_ms: int) -> str:
        short, medium = self.class_bounds_ms
        return "short" if lease_ms <= short else "medium" if lease_ms <= medium else "long"


def is_uuid(text: str) -> bool:
    """HAProxy's uuid form: 8-4-4-4-12 hex digits (either case)."""
    return (len(text) == 36 and all(text[i] == "-" for i in _UUID_DASHES)
            and _HEX.issuperset(text.replace("-", "")) and text.count("-") == 4)


def connection_id(cid: Any) -> bytes:
    """16 bytes for HAProxy's sess.cid: the UUID itself, or a hash of any other text."""
    # The codec gives a str: tested first and by type, it is every message's case.
    if type(cid) is not str:
        cid = cid.decode("utf-8", "surrogateescape") if isinstance(cid, bytes) else str(cid)
    if is_uuid(cid):
        return bytes.fromhex(cid.replace("-", ""))  # 10x cheaper than uuid.UUID
    return hashlib.blake2b(cid.encode("utf-8", "surrogateescape"), digest_size=16).digest()


def identity(message: Any) -> tuple[bytes, bytes, str, int, str, int, str] | None:
    """(key, conn_id, src, src_port, dst, dst_port, frontend) of the connection a
    message names, None when it names none (an argument missing, or not an
    address or a port): such a message is counted and still answered."""
    cid, src, src_port, dst, dst_port, frontend = message.get_addresses(IDENTITY_ARGS)
    # bool is an int to Python, not a port to anyone
    if type(src_port) is not int or type(dst_port) is not int or not 0 < dst_port < 65536:
        return None  # dst_port is HAProxy's listening port: 0 is no socket's
    try:
        key = pack_key(dst, dst_port, src, src_port)  # HAProxy's socket: local, remote
    except (TypeError, ValueError, OSError, struct.error):
        return None
    # Without a cid, a hash of the 4-tuple: the same id for every message of the connection.
    conn_id = connection_id(cid) if cid is not None else hashlib.blake2b(key, digest_size=16).digest()
    return key, conn_id, src, src_port, dst, dst_port, str(frontend or "")


def lease_in_force(settings: LeaseSettings, lease_ms: int, source: int, level: int, anomaly: int, received: int,
                   now: int) -> tuple[int, str, int, int]:
    """(lease ms, source name, granularity level, anomaly 0/1) in force for a
    connection whose last hint was (lease_ms, source, level, anomaly) received
    at unix ms received (without a hint the answer is the standard lease,
    source "standard", no level nor anomaly).

    A hint is honoured only inside [min_ms, max_ms] and while fresh; any
    other case is the standard lease ("fallback": a hint was refused or went
    stale). The anomaly flag is the last hint's (whatever its lease's
    bounds: the flag is about the traffic, not the lease) while that hint is
    fresh, 0 once it is stale: a quiet LB node's old judgement must not hold
    a connection flagged. The compiled answer does the same in C.
    """
    fresh = now - received <= settings.hint_ttl_ms
    anomaly = 1 if fresh and anomaly else 0
    if fresh and source == LeaseSource.PREDICTED and settings.min_ms <= lease_ms <= settings.max_ms:
        return lease_ms, "predicted", level, anomaly
    return settings.standard_ms, "fallback", level, anomaly


def encode_answer(settings: LeaseSettings, lease_ms: int, source: str, level: int | None,
                  anomaly: int | None) -> bytes:
    """The sess.lease.* set-var actions of one lease, encoded (answers cache them)."""
    w = FrameWriter()
    w.begin_frame(FrameType.ACK, 0, 0)
    start = w.mark()
    w.set_var(Scope.SESS, "duration_ms", lease_ms)
    w.set_var(Scope.SESS, "source", source)
    w.set_var(Scope.SESS, "class", settings.lease_class(lease_ms))
    if level is not None:
        w.set_var(Scope.SESS, "granularity", level)
        # Always 0 or 1 once hints flow, never only-when-1: a sess variable
        # outlives the request, so a flag that clears must be overwritten.
        w.set_var(Scope.SESS, "anomaly", anomaly)
    w.end_frame()
    return w.take()[start:]
