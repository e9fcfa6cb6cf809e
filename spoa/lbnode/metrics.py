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
        if getattr(self._lbnode, "tier", None) is not None:
            yield from tier_metrics(p, self._lbnode.tier)
            node = self._lbnode
            yield CounterMetricFamily(f"{p}_tier_maps_sent", "tier map datagrams sent to server nodes",
                                      value=node.maps_sent)
            yield CounterMetricFamily(f"{p}_forwarded_datagrams_received", "datagrams another LB node forwarded "
                                      "here (records of slots this node owns)", value=r.forwarded_in)
            errors = CounterMetricFamily(f"{p}_send_errors", "datagrams the socket refused, by kind (hint, map, "
                                         "forward)", labels=["kind"])
            for kind, n in sorted(node.send_errors.items()):
                errors.add_metric([kind], n)
            yield errors
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


def tier_metrics(p: str, tier) -> Iterator:
    """An LB node in a tier (lbnode `cluster:`): what it owns, adopted, wrote, and whether it is fenced."""
    store, membership = tier.store.stats, tier.membership
    yield GaugeMetricFamily(f"{p}_slots_owned", "ownership slots this LB node owns", value=int(tier.owned.sum()))
    yield GaugeMetricFamily(f"{p}_tier_members", "LB nodes in the live set last read", value=len(membership.live))
    yield GaugeMetricFamily(f"{p}_fenced", "1 while this node's membership lapsed (it answers nothing)",
                            value=int(tier.fenced))
    yield GaugeMetricFamily(f"{p}_answering", "1 while this node sends hints (member, membership confirmed or "
                            "store unreachable)", value=int(tier.answering()))
    yield GaugeMetricFamily(f"{p}_store_unreachable", "1 while the last store call failed (serving from memory)",
                            value=int(store.unreachable))
    yield GaugeMetricFamily(f"{p}_store_write_last_seconds", "latency of the last acknowledged state write",
                            value=store.last_write_seconds)
    for name, doc, value in (
            ("connections_adopted", "connections whose state was loaded from the store after an ownership change",
             tier.loader.adopted),
            ("connections_handed_over", "connections let go to their new owner", tier.handed_over),
            ("records_not_owned", "records received for slots another LB node owns (not ingested)",
             tier.records_not_owned),
            ("records_forwarded", "of those, records passed on to their owner (sent here by a server node's "
             "older tier map)", tier.records_forwarded),
            ("fences", "times this node found its membership lapsed", membership.fences),
            ("membership_reasserts", "times its membership key was found lost to a store outage (a failover) "
             "and set again, its slots kept", membership.reasserts),
            ("store_errors", "store calls that failed or timed out", store.errors),
            ("store_write_batches", "state writes acknowledged (one pipeline per interval)", store.write_batches),
            ("store_write_commands", "store commands in them", store.write_commands),
            ("store_write_bytes", "field and value bytes in them", store.write_bytes),
            ("store_write_rows", "connection states in them", store.rows_written),
            ("store_write_errors", "state writes not acknowledged (kept for the next)", store.write_errors),
            ("store_stale_writes", "slot writes the store refused: another LB node gained the slot",
             store.stale_writes),
            ("store_write_seconds", "summed latency of the acknowledged state writes", store.write_seconds),
            ("state_loads", "loads of gained slots", store.load_batches),
            ("state_load_errors", "loads of gained slots the store did not answer (retried)", store.load_errors),
            ("state_load_seconds", "summed time of those loads", store.load_seconds),
            ("class_priors_written", "traffic-class priors written to the store", tier.priors.written),
            ("class_priors_seeded", "traffic classes seeded from the store's priors on joining", tier.priors.seeded),
            ("state_rows_refused", "stored connections not adopted: another layout", store.rows_refused),
            ("state_rings_inexact", "loaded records whose history ring could not be continued exactly "
             "(two chunks in a row lost)", store.rings_inexact)):
        yield CounterMetricFamily(f"{p}_{name}", doc, value=value)


def serve_lbnode_metrics(address: str, lbnode, receiver, tcp_listener=None) -> tuple:
    registry = CollectorRegistry()
    registry.register(LbNodeCollector(lbnode, receiver, tcp_listener))
    return start_metrics_server(address, registry)
