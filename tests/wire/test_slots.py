"""Connection -> slot (the store's CRC16), slot -> owner (rendezvous over the live nodes)."""

from __future__ import annotations

import binascii

import numpy as np
import redis

from spoa.lbnode.cluster.store import slot_key
from spoa.wire.slots import conn_keys, conn_slots, crc16, owners


def _connections(n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    nodes = rng.integers(0, 2**63, n, dtype=np.uint64)
    conns = rng.integers(0, 256, (n, 16), dtype=np.uint8).view("V16").reshape(n)
    return nodes, conns


def test_crc16_is_the_stores_key_hash():
    keys = conn_keys(*_connections(2000))
    crcs = crc16(keys)
    for key, crc in zip(keys[:500], crcs[:500].tolist()):
        raw = bytes(key)
        assert binascii.crc_hqx(raw, 0) == crc
        if b"{" not in raw:  # no hash tag: the store's slot of the key is its CRC16 mod 16384
            assert redis.crc.key_slot(raw) == crc % 16384


def test_connection_keys_are_node_id_then_conn_id():
    nodes = np.array([0x0102030405060708], np.uint64)
    conns = np.array([bytes(range(16))], "V16")
    assert bytes(conn_keys(nodes, conns)[0]) == bytes.fromhex("0807060504030201") + bytes(range(16))


def test_connections_spread_evenly_over_slots():
    counts = np.bincount(conn_slots(*_connections(200_000), 1024), minlength=1024)
    # as even as random placement: the spread of a Poisson count (sd = sqrt(mean)), no slot far out
    assert counts.std() < 1.2 * np.sqrt(counts.mean())
    assert counts.min() > 0.65 * counts.mean() and counts.max() < 1.35 * counts.mean()


def test_rendezvous_balances_and_moves_only_the_leavers_slots():
    live = [11, 22, 33]
    owner = np.array(live)[owners(live, 1024)]
    shares = np.bincount([live.index(o) for o in owner], minlength=3) / 1024
    assert (abs(shares - 1 / 3) < 0.1 * 1 / 3 + 0.02).all(), shares
    assert (np.array(live[::-1])[owners(live[::-1], 1024)] == owner).all()  # order of the live list: no matter
    after = np.array([11, 33])[owners([11, 33], 1024)]
    moved = owner != after
    assert (owner[moved] == 22).all() and (owner[~moved] == after[~moved]).all()
    joined = np.array(live + [44])[owners(live + [44], 1024)]
    assert ((joined == owner) | (joined == 44)).all()  # a joiner takes from each, nothing else moves


def test_nobody_live_owns_nothing():
    assert (owners([], 16) == -1).all()


def test_slot_keys_hash_as_one_key_each():
    assert slot_key("spoa", 7) == "spoa:{spoa.7}:rows"
    assert redis.crc.key_slot(slot_key("spoa", 7).encode()) == redis.crc.key_slot(b"spoa.7")
