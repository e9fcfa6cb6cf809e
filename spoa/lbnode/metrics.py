"""Prometheus exposition of the LB node (prometheus_client, read at scrape time)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

from ..netutil import start_metrics_server, udp_drops


class LbNodeCollector:
    """The LB node: connections held, leases, premature expiries, packets, hints."""

    def __init__(self, lbnode, receiver, tcp_listener=None, prefix: str = "spoa_lbnode") -> None:
        self._lbnode = lbnode
        self._receiver = receiver
        self._tcp = tcp_listener
        self._prefix = prefix

    def collect(self) -> Iterator:
        p, table, r = self._prefix, self._lbnode.table, self._receiver
        s = table.stats
        yield GaugeMetricFamily(f"{p}_connections", "connections held under a lease", value=len(table))
        for name, doc in (("records", "connection records ingested"),
                          ("refreshes", "lease refreshes"),
                          ("new_connections", "connections first seen"),
                          ("closed", "connections released on their closed record"),
                          ("expired", "connections whose lease ran out"),
                          ("premature_expiries", "refreshes for connections whose lease had already run out"),
                          ("refused", "connections refused: no free slot"),
                          ("hints_sent", "lease hints sent"),
                          ("hint_datagrams", "hint datagrams sent"),
                          ("anomalies", "connection-intervals flagged as anomalous")):
            yield CounterMetricFamily(f"{p}_{name}", doc, value=getattr(s, name))
        leases = CounterMetricFamily(f"{p}_leases", "leases granted by source", labels=["source"])
        for source, n in sorted(s.leases.items()):
            leases.add_metric([source], n)
        yield leases
        yield CounterMetricFamily(f"{p}_forecast_abs_error", "sum of |forecast - actual| bytes per interval",
                                  value=s.forecast_abs_error)
        yield CounterMetricFamily(f"{p}_forecast_samples", "forecasts scored", value=s.forecast_samples)
        segments = table.segments
        yield GaugeMetricFamily(f"{p}_segments", "segments with cached state and history", value=len(segments))
        yield CounterMetricFamily(f"{p}_segments_refused", "segments not tracked: segment history full",
                                  value=segments.refused)
        yield CounterMetricFamily(f"{p}_segments_dropped", "segment slots reclaimed (merged away or released)",
                                  value=segments.dropped)
        yield CounterMetricFamily(f"{p}_packets_accepted", "datagrams accepted", value=r.accepted)
        rejected = CounterMetricFamily(f"{p}_packets_rejected", "datagrams rejected, by reason", labels=["reason"])
        for reason, n in sorted(r.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield CounterMetricFamily(f"{p}_hint_send_errors", "hint datagrams the socket refused",
                                  value=s.hint_send_errors)
        sock = getattr(getattr(self._lbnode, "transport", None), "sock", None)
        drops = udp_drops(sock) if sock is not None else None
        if drops is not None:
            yield CounterMetricFamily(f"{p}_udp_drops", "datagrams the kernel dropped: receive buffer full "
                                      "(raise lbnode.receive_buffer)", value=drops)
        tcp = self._tcp
        if tcp is not None:
            yield GaugeMetricFamily(f"{p}_tcp_connections", "agents connected over TCP", value=len(tcp.streams))
            yield GaugeMetricFamily(f"{p}_tcp_buffered_bytes", "bytes of unfinished TCP messages held",
                                    value=tcp.buffered_bytes)
            for name, doc in (("idle_timeouts", "TCP peers closed after lbnode.tcp_idle_timeout of silence"),
                              ("message_timeouts", "TCP peers closed with a message unfinished after "
                               "lbnode.tcp_message_timeout"),
                              ("budget_closes", "TCP peers closed for exceeding lbnode.tcp_max_buffered_bytes")):
                yield CounterMetricFamily(f"{p}_tcp_{name}", doc, value=getattr(tcp, name))


def serve_lbnode_metrics(address: str, lbnode, receiver, tcp_listener=None) -> tuple:
    registry = CollectorRegistry()
    registry.register(LbNodeCollector(lbnode, receiver, tcp_listener))
    return start_metrics_server(address, registry)
