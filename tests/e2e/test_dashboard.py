"""The Grafana dashboard (docker/grafana) asks only for metrics the daemons
really serve: every query's metric names are looked up in the /metrics of a
running agent publishing to a running LB node."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

from .harness import REPO, AgentProcess, LbNodeProcess, wait_until

DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "spoa-lease.json"
# PromQL words that are not metric names
PROMQL = {"sum", "by", "rate", "without", "avg", "max", "min", "job", "source", "reason"}


def _queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def _served(port: int) -> set[str]:
    """Sample names served, and each counter family's `_total` name (a
    labelled family with no sample yet still names itself in # TYPE)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            names.add(f"{family}_total" if kind == "counter" else family)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_dashboard_query_names_served_metrics(tmp_path):
    key = tmp_path / "lease.key"
    key.write_bytes(b"k" * 32)
    lbnode = LbNodeProcess(tmp_path, config={"lbnode": {"key_file": str(key)}}).start()
    agent = AgentProcess(tmp_path, config={"publish": {"lb_nodes": [f"127.0.0.1:{lbnode.port}"],
                                                       "key_file": str(key)}}).start()
    try:
        wait_until(lambda: "spoa_lease_tracked_connections" in agent.metrics(), timeout=10,
                   what="the agent's lease module metrics")
        served = {"spoa-agent": _served(agent.metrics_port), "spoa-lbnode": _served(lbnode.metrics_port)}
        queries = _queries()
        assert len(queries) >= 10
        for expr in queries:
            job = re.search(r'job="([^"]+)"', expr).group(1)
            names = [w for w in re.findall(r"[a-z_][a-z0-9_]*", re.sub(r'\{[^}]*\}|\[[^]]*\]', "", expr))
                     if w not in PROMQL]
            assert names, expr
            for name in names:
                assert name in served[job], f"{name} ({expr}) is not served by {job}"
    finally:
        agent.stop()
        lbnode.stop()
