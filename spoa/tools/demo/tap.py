"""The demo's tap: a second LB-node target that sees every connection record.

The agent publishes to every address in `publish.lb_nodes`; the demo adds
this UDP listener next to the real LB node. It holds the shared key, so
`spoa.lbnode.packet_receiver.PacketReceiver` verifies and decodes each datagram like
the LB node does (HMAC, replay guard), and the tap keeps the latest record
of each connection: segments, granularity level, byte totals, the lease the
agent has in force and its source.

"predicted vs actual volume" per connection: the LB node's forecaster is not
observable from outside, so the tap mirrors it on the same inputs: the bytes
between two records of a connection, per interval, smoothed with the LB
node's own formula (SES, ``level += alpha * (y - level)``, alpha from its
config). "predicted" is the forecast made before the interval, "actual" what
came. The LB node's aggregate error is on its /metrics (forecast_abs_error).
The tap never answers: hints come from the LB node only.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ...lbnode.packet_receiver import PacketReceiver
from ...servernode.lease_module import LEASE_SOURCE_NAMES
from ...wire.records import ConnFlags, ConnectionRecord, CounterSource, PacketHeader

KEEP_CLOSED_S = 6.0
MAX_CONNECTIONS = 5000


@dataclass
class ConnView:
    conn_id: bytes
    src_port: int
    frontend: str
    first_seen: float  # monotonic
    last_seen: float = 0.0
    last_ts_ms: int = 0  # packet timestamp of the last record
    records: int = 0
    closed: bool = False
    level: int = 0
    segments: int = 0
    segment_levels: tuple = ()
    bytes_in: int = 0
    bytes_out: int = 0
    actual: float = 0.0  # bytes per interval, last record
    predicted: float | None = None  # forecast made before that interval (None: first record)
    level_ses: float | None = None  # the mirror's SES level
    lease_ms: int = 0  # lease in force on the agent (0: the standard lease, never hinted)
    hinted_ms: int = 0  # the LB node's last hint for it
    lease_source: str = "standard"
    counter_source: str = "none"

    @property
    def total(self) -> int:
        return self.bytes_in + self.bytes_out


class Tap:
    def __init__(self, key: bytes, interval_ms: int, alpha: float = 0.3) -> None:
        self.interval_ms = interval_ms
        self.alpha = alpha
        self.receiver = PacketReceiver(key, self._on_packet)
        self.conns: dict[bytes, ConnView] = {}
        self.records = 0
        self.closed = 0
        self.levels_seen: dict[int, int] = {}  # segment level -> segments seen at it (all records)
        self.max_segments = 0  # most segments one connection had
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    async def open(self, host: str = "127.0.0.1", port: int = 0) -> Tap:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: self.receiver, local_addr=(host, port))
        self.port = self.transport.get_extra_info("sockname")[1]
        return self

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    @property
    def rejected(self) -> int:
        return sum(self.receiver.rejected.values())

    def _on_packet(self, header: PacketHeader, records: list[ConnectionRecord], addr) -> None:
        now = time.monotonic()
        for rec in records:
            self.records += 1
            view = self.conns.get(rec.conn_id)
            if view is None:
                if len(self.conns) >= MAX_CONNECTIONS:
                    self.prune(now, force=True)
                view = self.conns[rec.conn_id] = ConnView(rec.conn_id, rec.src_port, rec.frontend, now)
            self._update(view, header, rec, now)

    def _update(self, view: ConnView, header: PacketHeader, rec: ConnectionRecord, now: float) -> None:
        total = rec.bytes_in_total + rec.bytes_out_total
        if view.records:
            elapsed = max(1, round((header.timestamp_ms - view.last_ts_ms) / self.interval_ms))
            y = max(0, total - view.total) / elapsed
        else:
            y = float(total)  # the LB node counts a new connection's bytes so far as its first interval
        view.predicted = view.level_ses
        view.actual = y
        view.level_ses = y if view.level_ses is None else view.level_ses + self.alpha * (y - view.level_ses)
        view.records += 1
        view.last_seen = now
        view.last_ts_ms = header.timestamp_ms
        view.level = rec.granularity_level
        view.segments = len(rec.segments)
        view.segment_levels = tuple(seg.level for seg in rec.segments)
        for level in view.segment_levels:
            self.levels_seen[level] = self.levels_seen.get(level, 0) + 1
        self.max_segments = max(self.max_segments, view.segments)
        view.bytes_in, view.bytes_out = rec.bytes_in_total, rec.bytes_out_total
        source = LEASE_SOURCE_NAMES.get(rec.lease_source, str(rec.lease_source))
        view.lease_source = source
        view.lease_ms = rec.requested_lease_ms  # the lease in force (0: the standard one, never hinted)
        view.hinted_ms = rec.predicted_lease_ms  # the LB node's last hint (0: none yet)
        view.counter_source = CounterSource(rec.counter_source).name.lower() \
            if rec.counter_source in CounterSource._value2member_map_ else str(rec.counter_source)
        if rec.flags & (ConnFlags.CLOSED | ConnFlags.EXPIRED) and not view.closed:
            view.closed = True
            self.closed += 1

    def prune(self, now: float | None = None, force: bool = False) -> None:
        """Forget connections closed a while ago (all closed ones when force)."""
        now = time.monotonic() if now is None else now
        for conn_id, view in list(self.conns.items()):
            if view.closed and (force or now - view.last_seen > KEEP_CLOSED_S):
                del self.conns[conn_id]

    def live(self) -> list[ConnView]:
        return [v for v in self.conns.values() if not v.closed]

    def level_histogram(self) -> dict[int, int]:
        """Live connections by granularity level."""
        hist: dict[int, int] = {}
        for view in self.live():
            hist[view.level] = hist.get(view.level, 0) + 1
        return dict(sorted(hist.items()))

    def segment_level_histogram(self) -> dict[int, int]:
        """Segments of live connections by their level."""
        hist: dict[int, int] = {}
        for view in self.live():
            for level in view.segment_levels:
                hist[level] = hist.get(level, 0) + 1
        return dict(sorted(hist.items()))
