"""The local store cluster: real valkey/redis-server processes formed into a cluster, data on it,
a primary's SIGKILL failed over to its replica, a clear error without a server binary."""

from __future__ import annotations

import signal
import time

import pytest
import redis

from spoa.tools import store_cluster
from spoa.tools.store_cluster import StoreCluster, StoreServerNotFound, find_server_binary


def test_formed_cluster_serves_every_slot(store_cluster):
    assert len(store_cluster.nodes) == 6 and all(node.alive for node in store_cluster.nodes)
    c = redis.RedisCluster.from_url(f"redis://{store_cluster.seeds[0]}")
    try:
        info = c.cluster_info()
        assert info["cluster_state"] == "ok" and int(info["cluster_slots_assigned"]) == 16384
        assert int(info["cluster_known_nodes"]) == 6 and int(info["cluster_size"]) == 3
        keys = {f"test-store-cluster:{{{i}}}": str(i) for i in range(64)}  # hash tags spread over the shards
        for key, value in keys.items():
            c.set(key, value, px=60_000)
        assert {key: c.get(key).decode() for key in keys} == keys
        assert len({store_cluster.primary_for_slot(redis.crc.key_slot(k.encode())).port for k in keys}) == 3
    finally:
        for key in keys:
            c.delete(key)
        c.close()


def test_killed_primary_fails_over_and_keeps_acknowledged_writes(new_store_cluster):
    cluster = new_store_cluster(primaries=3, replicas=1)
    key = b"failover:{x}"
    slot = redis.crc.key_slot(key)
    victim = cluster.primary_for_slot(slot)
    direct = cluster.client(victim)
    direct.set(key, b"kept")
    assert direct.execute_command("WAIT", 1, 2000) == 1  # the replica acknowledged it
    direct.close()
    cluster.kill(victim, signal.SIGKILL)
    began = time.monotonic()
    deadline = began + 15
    while True:  # promotion takes about 2 x cluster-node-timeout
        try:
            promoted = cluster.primary_for_slot(slot)
            if promoted is not victim and promoted.alive:
                break
        except RuntimeError:
            pass
        assert time.monotonic() < deadline, "replica not promoted within 15 s"
        time.sleep(0.1)
    cluster.wait_ok(timeout=15)
    c = cluster.client(promoted)
    try:
        assert c.get(key) == "kept"
    finally:
        c.close()
    assert time.monotonic() - began < 15


def test_stop_ends_every_process(new_store_cluster):
    cluster = new_store_cluster(primaries=1, replicas=1)
    cluster.kill(cluster.nodes[1], signal.SIGSTOP)  # a frozen node must not hold stop() up
    processes = [node.process for node in cluster.nodes]
    cluster.stop(grace=2)
    assert all(p.poll() is not None for p in processes)


def test_no_server_binary_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(store_cluster.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(StoreServerNotFound, match="spoa-lease\\[local-store\\].*redis-server"):
        find_server_binary()


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="primaries must be >= 1"):
        StoreCluster(primaries=0)
    with pytest.raises(ValueError, match="node_timeout_ms"):
        StoreCluster(node_timeout_ms=1)


def test_server_exiting_at_start_names_its_port(tmp_path):
    fake = tmp_path / "valkey-server"
    fake.write_text("#!/bin/sh\necho 'bad config' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match="exited with 3: bad config"):
        StoreCluster(primaries=1, replicas=0, binary=str(fake)).start(timeout=10)
