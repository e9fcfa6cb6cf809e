"""The demo's last line: one JSON object saying what flowed, end to end.

Where each figure comes from:

    connections          client connections HAProxy registered with the agent over
                         SPOE (tracker event "registered"); client_connections: opened by
                         the traffic generator; lbnode_connections: first seen by
                         the LB node
    packets_published    publishing packets the agent sent (spoa_lease_packets_sent)
    leases_predicted     HAProxy log lines whose sess.lease.source was "predicted":
    leases_fallback      the lease HAProxy itself applied; client_leases counts the
    leases_standard      same from the X-Lease response header, lbnode_leases what
                         the LB node granted, agent_leases what the agent answered
    premature_expiries   refreshes for connections whose lease had run out (LB node)
    anomalies            connection-intervals the LB node flagged
    lbnodes              LB nodes run (--lbnodes); the lbnode_* figures above are their sums
    lbnode_nodes         per LB node (name -> slots_owned, connections, new_connections,
                         adopted, hints_sent, premature_expiries, fenced, answering,
                         members; slots_owned and members null for the single LB node),
                         from its own /metrics at the end
    store                the tier's store cluster (seeds, primaries, replicas, started_s,
                         pids); null for the single LB node
    errors               anything that went wrong: a process that died or exited
                         non-zero, error lines in its log, a client error, an SPOE
                         error, HAProxy alerts, rejected packets; empty on success
"""

from __future__ import annotations

from .stack import Stack, by_label, metric
from .tier import node_figures


def collect_errors(stack: Stack) -> list[str]:
    errors = list(stack.errors)
    a, lb = stack.agent_metrics, stack.lbnode_metrics
    if stack.loadgen is not None:
        s = stack.loadgen.stats
        if s.errors:
            errors.append(f"traffic generator: {s.errors} error(s), first: {s.last_errors[0]}")
        if s.leases_missing:
            errors.append(f"traffic generator: {s.leases_missing} response(s) without a lease in X-Lease")
    if stack.backend is not None and stack.backend.stats.errors:
        errors.append(f"backend: {stack.backend.stats.errors} error(s), first: {stack.backend.stats.last_errors[0]}")
    log = stack.haproxy_log
    if log is not None:
        if log.spoe_errors:
            errors.append(f"HAProxy: {log.spoe_errors} request(s) with an SPOE error (txn.lease.error)")
        if log.alerts:
            errors.append(f"HAProxy: {len(log.alerts)} alert(s), first: {log.alerts[0]}")
        server_errors = sum(n for status, n in log.statuses.items() if status.startswith("5"))
        if server_errors:
            errors.append(f"HAProxy: {server_errors} response(s) with a 5xx status")
    for name, label in (("spoa_agent_handler_errors_total", "agent handler errors"),
                        ("spoa_agent_handler_timeouts_total", "agent handler timeouts"),
                        ("spoa_agent_protocol_errors_total", "agent protocol errors (DISCONNECTs sent)"),
                        ("spoa_lease_sample_errors_total", "kernel sample errors")):
        if metric(a, name):
            errors.append(f"{label}: {int(metric(a, name))}")
    rejected = {k: int(v) for k, v in by_label(lb, "spoa_lbnode_packets_rejected_total").items() if v}
    if rejected:
        errors.append(f"LB node rejected packets: {rejected}")
    if stack.tap is not None and stack.tap.rejected:
        errors.append(f"tap rejected {stack.tap.rejected} packet(s)")
    return errors


def build_summary(stack: Stack, stopped_by: str) -> dict:
    a, lb = stack.agent_metrics, stack.lbnode_metrics
    log = stack.haproxy_log
    sources = log.sources if log is not None else {}
    loadgen = stack.loadgen.stats if stack.loadgen is not None else None
    tap = stack.tap
    samples = metric(lb, "spoa_lbnode_forecast_samples_total")
    binary = stack.binary
    return {
        "haproxy_version": binary.version if binary else None,
        "haproxy_line": stack.opts.haproxy,
        "policy": stack.opts.policy,
        "duration_s": round(stack.elapsed(), 1),
        "stopped_by": stopped_by,
        "connections": int(by_label(a, "spoa_lease_tracker_events_total").get("registered", 0)),
        "client_connections": loadgen.connections if loadgen else 0,
        "lbnode_connections": int(metric(lb, "spoa_lbnode_new_connections_total")),
        "requests": log.requests if log is not None else 0,
        "packets_published": int(metric(a, "spoa_lease_packets_sent_total")),
        "records_published": int(metric(a, "spoa_lease_records_published_total")),
        "records_deferred": int(metric(a, "spoa_lease_records_deferred_total")),
        "leases_predicted": int(sources.get("predicted", 0)),
        "leases_fallback": int(sources.get("fallback", 0)),
        "leases_standard": int(sources.get("standard", 0)),
        "client_leases": dict(loadgen.leases) if loadgen else {},
        "agent_leases": {k: int(v) for k, v in by_label(a, "spoa_lease_leases_total").items()},
        "lbnode_leases": {k: int(v) for k, v in by_label(lb, "spoa_lbnode_leases_total").items()},
        "hints_sent": int(metric(lb, "spoa_lbnode_hints_sent_total")),
        "hints_applied": int(metric(a, "spoa_lease_hints_applied_total")),
        "premature_expiries": int(metric(lb, "spoa_lbnode_premature_expiries_total")),
        "expired": int(metric(lb, "spoa_lbnode_expired_total")),
        "anomalies": int(metric(lb, "spoa_lbnode_anomalies_total")),
        "forecast_mae_bytes": round(metric(lb, "spoa_lbnode_forecast_abs_error_total") / samples) if samples else None,
        "segments_peak": stack.peak_segments,
        "tracked_connections_peak": stack.peak_tracked,
        "tracker_events": {k: int(v) for k, v in by_label(a, "spoa_lease_tracker_events_total").items()},
        "segment_levels_seen": {str(k): v for k, v in sorted(tap.levels_seen.items())} if tap else {},
        "counter_updates": {k: int(v) for k, v in by_label(a, "spoa_lease_counter_updates_total").items()},
        "tap_records": tap.records if tap else 0,
        "lbnodes": stack.opts.lbnodes,
        "lbnode_nodes": {name: node_figures(m) for name, m in stack.lbnode_metrics_by_node.items()},
        "store": _store(stack.store),
        "pids": {name: proc.pid for name, proc in stack.procs.items()},
        "exit_codes": dict(stack.exit_codes),
        "warnings": stack.warnings + (log.warnings if log is not None else []),
        "errors": collect_errors(stack),
    }


def _store(store) -> dict | None:
    if store is None:
        return None
    return {"seeds": store.seeds, "primaries": store.primaries, "replicas": store.replicas,
            "started_s": round(store.started_s, 2),
            "pids": [node.process.pid for node in store.nodes if node.process is not None]}
