"""The lbnode `cluster:` section: absent means alone in memory, every mistake named by its key."""

from __future__ import annotations

import pytest

from spoa import config


def _load(tmp_path, text: str) -> dict:
    key = tmp_path / "lease.key"
    key.write_bytes(b"k" * 32)
    path = tmp_path / "lbnode.yaml"
    path.write_text(text)
    return config.load(config.LBNODE_SCHEMA, path, {"lbnode.key_file": str(key)})


def test_absent_section_is_the_lone_node(tmp_path):
    c = _load(tmp_path, "")["cluster"]
    assert c["store"] == [] and c["advertise"] is None


def test_a_tier_config(tmp_path):
    c = _load(tmp_path, "cluster: {store: ['127.0.0.1:7000', 'store-2:7000'], advertise: '10.0.0.5:9400', "
                        "namespace: prod-eu, slots: 256, membership_ms: 6000, grace_ms: 4000}\n")["cluster"]
    assert c["store"] == ["127.0.0.1:7000", "store-2:7000"] and c["advertise"] == "10.0.0.5:9400"
    assert (c["namespace"], c["slots"], c["membership_ms"], c["grace_ms"]) == ("prod-eu", 256, 6000, 4000)


@pytest.mark.parametrize("text, needle", [
    ("cluster: {store: 127.0.0.1:7000}\n", "cluster.store: must be a list"),
    ("cluster: {store: ['127.0.0.1']}\n", "cluster.store[0]:"),
    ("cluster: {store: ['unix:/tmp/s']}\n", "cluster.store[0]: expected HOST:PORT"),
    ("cluster: {advertise: '127.0.0.1:99999'}\n", "cluster.advertise:"),
    ("cluster: {namespace: 'a{b}'}\n", "cluster.namespace: expected 1 to 64 of"),
    ("cluster: {namespace: ''}\n", "cluster.namespace: expected 1 to 64 of"),
    ("cluster: {slots: 1000}\n", "cluster.slots: 1000 is not a power of two"),
    ("cluster: {slots: 32768}\n", "cluster.slots: 32768 is out of range"),
    ("{lbnode: {interval_ms: 100}, cluster: {membership_ms: 1000, timeout_ms: 500}}\n", "cluster.membership_ms: must be at least 3 x"),
    ("{lbnode: {interval_ms: 2000}, cluster: {membership_ms: 3000}}\n",
     "cluster.membership_ms: must be at least 3 x lbnode.interval_ms (2000)"),
    ("cluster: {gc_ms: 60000}\n", "cluster.gc_ms: must be above lease.max_ms (3600000)"),
    ("cluster: {grace_ms: -1}\n", "cluster.grace_ms: -1 is out of range"),
    ("cluster: {seeds: []}\n", "cluster.seeds: unknown key (known: store, advertise"),
])
def test_mistakes_name_their_key(tmp_path, text, needle):
    with pytest.raises(config.ConfigError) as error:
        _load(tmp_path, text)
    assert needle in str(error.value), str(error.value)
