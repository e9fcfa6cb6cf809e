"""What the agent answers with no handlers of the operator's own.

The `lease-*` messages of haproxy/spoe-lease.conf get the standard lease as
session variables (read in HAProxy as sess.lease.duration_ms and
sess.lease.source) and a per-agent sequence number in txn.lease.seq, which
shows in responses that the variable really came from this agent.
Any other message is still answered (a no-op ACK), and counted as unknown.
"""

from __future__ import annotations

from itertools import count
from typing import Any

from .agent import Agent
from .constants import Scope

LEASE_MESSAGES = ("lease-session", "lease-request")


def install(agent: Agent, standard_lease_ms: int) -> None:
    sequence = count(1)
    sess, txn = int(Scope.SESS), int(Scope.TXN)

    def standard_lease(message: Any, actions: Any) -> None:
        actions.set_var(sess, "duration_ms", standard_lease_ms)
        actions.set_var(sess, "source", "standard")
        actions.set_var(txn, "seq", next(sequence))

    for name in LEASE_MESSAGES:
        agent.registry.register(name, standard_lease)
