"""Prometheus exposition of the server node: the SPOP agent's AgentStats and the
lease module's tracking and publishing (prometheus_client, read at scrape time).

Counters stay plain ints on the hot path; these collectors turn them into
metric families only when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry

from ..netutil import start_metrics_server
from ..spop.stats import DEPTH_BUCKETS, AgentStats

_COUNTERS = {
    "connections_total": "SPOP connections accepted",
    "connections_refused": "connections closed at once over max_connections",
    "hellos": "HELLO handshakes completed",
    "healthchecks": "health-check HELLOs answered",
    "frames_in": "frames received",
    "frames_out": "frames sent",
    "bytes_in": "bytes received",
    "bytes_out": "bytes sent",
    "notify_frames": "NOTIFY frames received",
    "fragments": "NOTIFY fragments received (2.x)",
    "messages": "SPOE messages received",
    "acks": "ACK frames sent",
    "unknown_messages": "messages with no registered handler",
    "handler_errors": "handler exceptions (the ACK still went out)",
    "handler_timeouts": "async handlers cut off by handler_timeout",
    "acks_truncated": "ACKs whose actions exceeded max-frame-size",
    "resets": "connections closed by RST/EPIPE (normal on HAProxy 3.1+)",
    "eof_mid_frame": "connections closed in the middle of a frame",
    "idle_timeouts": "connections closed after agent.idle_timeout without a frame",
    "frame_timeouts": "connections closed with a frame unfinished after agent.frame_timeout",
    "buffer_budget_closes": "connections refused for exceeding agent.max_buffered_bytes with partial frames",
}
_GAUGES = {
    "connections_active": "open SPOP connections",
    "inflight": "NOTIFYs being answered by async handlers",
    "max_inflight": "highest inflight seen",
    "max_pipeline_depth": "most NOTIFYs outstanding together on one connection",
    "buffered_bytes": "bytes of partial frames and reassemblies held (at the last sweep)",
}


class AgentCollector:
    def __init__(self, stats: AgentStats, prefix: str = "spoa_agent") -> None:
        self._stats = stats
        self._prefix = prefix

    def collect(self) -> Iterator:
        s, p = self._stats, self._prefix
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"{p}_{name}", doc, value=getattr(s, name))
        for name, doc in _GAUGES.items():
            yield GaugeMetricFamily(f"{p}_{name}", doc, value=getattr(s, name))
        errors = CounterMetricFamily(f"{p}_protocol_errors", "DISCONNECTs sent, by status", labels=["status"])
        for status, n in sorted(s.errors.items()):
            errors.add_metric([status], n)
        yield errors
        received = CounterMetricFamily(
            f"{p}_disconnects_received", "DISCONNECTs received from HAProxy, by status code", labels=["status"]
        )
        for status, n in sorted(s.disconnects_received.items()):
            received.add_metric([str(status)], n)
        yield received
        buckets, total = [], 0
        for bound in DEPTH_BUCKETS:
            total += s.pipeline_depth.get(bound, 0)
            buckets.append((str(bound), total))
        total += s.pipeline_depth.get(0, 0)
        buckets.append(("+Inf", total))
        yield HistogramMetricFamily(
            f"{p}_pipeline_depth", "NOTIFYs outstanding together per read", buckets=buckets, sum_value=0
        )


class ModuleCollector:
    """The server node's tracking and publishing (spoa.servernode.lease_module.LeaseModule)."""

    def __init__(self, module, prefix: str = "spoa_lease") -> None:
        self._module = module
        self._prefix = prefix

    def collect(self) -> Iterator:
        m, p = self._module, self._prefix
        yield GaugeMetricFamily(f"{p}_tracked_connections", "connections being tracked", value=len(m.tracker))
        yield GaugeMetricFamily(f"{p}_segments", "segments across tracked connections",
                                value=m.tracker.total_segments)
        events = CounterMetricFamily(f"{p}_tracker_events", "tracker events by kind", labels=["event"])
        for event, n in sorted(m.tracker.stats.items()):
            events.add_metric([event], n)
        yield events
        s = m.stats
        for name, doc in (("registrations", "lease messages that registered or refreshed a connection"),
                          ("registrations_bad", "lease messages without src/dst arguments"),
                          ("samples", "kernel sock_diag dumps"),
                          ("sample_errors", "failed kernel dumps"),
                          ("packets_sent", "publishing packets sent"),
                          ("records_published", "connection records published"),
                          ("connections_closed", "connections closed on leaving the kernel dump"),
                          ("records_deferred", "quiet records not republished under a long lease"),
                          ("hints_applied", "lease hints taken for a tracked connection"),
                          ("lbnode_silences", "times no lease hint came for longer than lease.hint_ttl_ms")):
            yield CounterMetricFamily(f"{p}_{name}", doc, value=getattr(s, name))
        # What the LB nodes sent = hints_applied + hints_refused (all reasons).
        refused = CounterMetricFamily(f"{p}_hints_refused", "lease hints not taken, by reason: the datagram's "
                                      "(replayed, bad_hmac, ...) or the hint's own", labels=["reason"])
        reasons = dict(s.hints_refused)
        if m.publisher is not None:
            for reason, n in m.publisher.hint_entries_rejected.items():
                reasons[reason] = reasons.get(reason, 0) + n
        for reason, n in sorted(reasons.items()):
            refused.add_metric([reason], n)
        yield refused
        yield CounterMetricFamily(f"{p}_sample_seconds", "time spent in kernel dumps", value=s.sample_seconds)
        leases = CounterMetricFamily(f"{p}_leases", "leases answered to HAProxy, by source", labels=["source"])
        for source, n in sorted(s.leases.items()):
            leases.add_metric([source], n)
        yield leases
        sources = CounterMetricFamily(f"{p}_counter_updates", "counter updates by source", labels=["source"])
        for source, n in sorted(s.sources.items()):
            sources.add_metric([source], n)
        yield sources
        if m.publisher is not None:
            for name, doc in (("datagrams_sent", "publishing datagrams sent"),
                              ("bytes_sent", "publishing bytes sent"),
                              ("send_errors", "datagrams the socket refused"),
                              ("hint_datagrams", "hint datagrams accepted"),
                              ("hints_received", "lease hints in accepted datagrams")):
                yield CounterMetricFamily(f"{p}_{name}", doc, value=getattr(m.publisher, name))
            rejected = CounterMetricFamily(f"{p}_hint_datagrams_rejected", "hint datagrams refused, by reason",
                                           labels=["reason"])
            for reason, n in sorted(m.publisher.hints_rejected.items()):
                rejected.add_metric([reason], n)
            yield rejected
            router = m.publisher.router
            yield CounterMetricFamily(f"{p}_records_routed", "records sent only to their slot's owner by the tier "
                                      "map (the others went to every LB node)", value=m.publisher.records_routed)
            yield GaugeMetricFamily(f"{p}_tier_members", "LB nodes in the tier map routed by (0: no map, every "
                                    "record to every LB node)", value=len(router.map.members) if router.fresh else 0)
            for name, doc in (("maps_accepted", "tier maps taken (a view not older than the one held)"),
                              ("maps_stale", "tier maps ignored: an older view than the one held"),
                              ("maps_unresolved", "tier maps ignored: a member's address does not resolve"),
                              ("changes", "tier map changes (records re-routed)")):
                yield CounterMetricFamily(f"{p}_tier_{name}", doc, value=getattr(router, name))
            maps = CounterMetricFamily(f"{p}_tier_maps_rejected", "tier map datagrams refused, by reason",
                                       labels=["reason"])
            for reason, n in sorted(m.publisher.maps_rejected.items()):
                maps.add_metric([reason], n)
            yield maps
            last = m.publisher.last_hint_ms
            yield GaugeMetricFamily(f"{p}_last_hint_timestamp_seconds", "unix time of the last hint datagram "
                                    "accepted (0: none yet)", value=0 if last is None else last / 1000)


def serve_metrics(address: str, stats: AgentStats, module=None) -> tuple:
    registry = CollectorRegistry()
    registry.register(AgentCollector(stats))
    if module is not None:
        registry.register(ModuleCollector(module))
    return start_metrics_server(address, registry)
