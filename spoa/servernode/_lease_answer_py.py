"""The lease answer, pure Python: the twin of cext/spoa/servernode/_lease_answer.pyx.

LeaseAnswer is the handler of the lease-* SPOE messages: it registers the
connection a message names with the segment tracker and answers the lease in
force for it (sess.lease.*), plus txn.lease.seq, a fresh number per answer.
Both twins give the same ACK bytes, tracker state and counters for the same
messages (tests/servernode/test_lease_answer.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..netutil import now_ms
from ..spop.constants import Scope
from .lease_message import MAX_ENCODED_ANSWERS, LeaseSettings, encode_answer, identity, lease_in_force


class LeaseAnswer:
    """Handler of the lease-* messages (spoa.spop handler API: answer(message, actions)).

    spoe_counters(key, message, now), when given, is called for each
    registered message: the counters HAProxy sends where the kernel cannot be
    read. ports holds the frontend ports seen, ports_changed says a new one
    came (the lease module rebuilds the sampler's filter from them).
    """

    def __init__(self, tracker: Any, settings: LeaseSettings,
                 spoe_counters: Callable[[bytes, Any, int], None] | None = None) -> None:
        self.tracker = tracker
        self.spoe_counters = spoe_counters
        self.registrations = 0  # messages that registered or refreshed a connection
        self.registrations_bad = 0  # messages naming no connection (identity arguments missing or wrong)
        self._leases = {"standard": 0, "predicted": 0, "fallback": 0}
        self.ports: set[int] = set()
        self.ports_changed = False
        self._seq = 0
        self.settings = settings

    @property
    def settings(self) -> LeaseSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: LeaseSettings) -> None:
        """Also on a live reload: the cached answers follow the new settings."""
        self._settings = settings
        self._standard_answer = encode_answer(settings, settings.standard_ms, "standard", None, None)
        self._answers: dict[tuple, bytes] = {}

    @property
    def leases(self) -> dict[str, int]:
        """Answers given, by lease source."""
        return dict(self._leases)

    def __call__(self, message: Any, actions: Any) -> None:
        now = now_ms()
        found = identity(message)
        hint = None
        if found is None:
            self.registrations_bad += 1
        else:
            key, conn_id, src, src_port, dst, dst_port, frontend = found
            if self.tracker.register(key, conn_id, src, src_port, dst, dst_port, frontend, now):
                hint = self.tracker.hint(key)
                self.registrations += 1
                if dst_port not in self.ports:
                    # The sampler's filter is rebuilt once per interval, not per new port.
                    self.ports.add(dst_port)
                    self.ports_changed = True
                if self.spoe_counters is not None:
                    self.spoe_counters(key, message, now)
        if hint is None:
            # No hint (yet): the standard answer, the same bytes every time.
            self._leases["standard"] += 1
            actions.put_raw(self._standard_answer)
        else:
            lease = lease_in_force(self._settings, *hint, now)
            self._leases[lease[1]] += 1
            answer = self._answers.get(lease)
            if answer is None:
                if len(self._answers) >= MAX_ENCODED_ANSWERS:
                    self._answers.clear()
                answer = self._answers[lease] = encode_answer(self._settings, *lease)
            actions.put_raw(answer)
        # A fresh number per answer: shows in HAProxy that the value is live.
        self._seq += 1
        actions.set_var(Scope.TXN, "seq", self._seq)
