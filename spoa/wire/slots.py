"""Which slot a connection is in and which LB node owns a slot: what agents and LB nodes both compute.

A connection's slot is the store's own hash, CRC16 (XMODEM, as Redis Cluster computes key
slots), of its key: the server node id (8 bytes, little endian) then the conn_id (16 bytes),
masked to `cluster.slots` (a power of two, so the mask keeps CRC16's uniformity). It is
computed for whole arrays of connections at once: one table lookup per key byte, vectorized.

A slot's owner is the live LB node with the highest rendezvous weight (splitmix64 of node id
and slot): every node computes the same owners from the same live set with no coordination,
and when a node leaves only its slots move (each to the next-highest weight), when one joins
it takes about 1/N from every other.

The agent routes each record to its slot's owner by the same functions the LB nodes own slots
by (spoa.lbnode.cluster.tier), from the live set the LB nodes announce (spoa.wire.tier_map).
"""

from __future__ import annotations

import numpy as np

CONN_KEY_BYTES = 24  # node id (u64 LE) + conn_id (16 bytes)


def _crc16_table() -> np.ndarray:
    table = np.zeros(256, np.uint16)
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table[byte] = crc & 0xFFFF
    return table


_CRC16 = _crc16_table()


def crc16(data: np.ndarray) -> np.ndarray:
    """CRC16-XMODEM (binascii.crc_hqx(·, 0), the store's key hash) of each row of a uint8[n, k] array."""
    crc = np.zeros(len(data), np.uint16)
    for column in range(data.shape[1]):
        crc = (crc << np.uint16(8)) ^ _CRC16[(crc >> np.uint16(8)) ^ data[:, column]]
    return crc


def conn_keys(node_ids: np.ndarray, conn_ids: np.ndarray) -> np.ndarray:
    """Each connection's key, uint8[n, 24]: the field name of its state in its slot's hash."""
    n = len(node_ids)
    keys = np.empty((n, CONN_KEY_BYTES), np.uint8)
    keys[:, :8] = np.ascontiguousarray(node_ids, "<u8").view(np.uint8).reshape(n, 8)
    keys[:, 8:] = np.ascontiguousarray(conn_ids).view(np.uint8).reshape(n, 16)
    return keys


def conn_slots(node_ids: np.ndarray, conn_ids: np.ndarray, slots: int) -> np.ndarray:
    """The slot of each connection (server node ids uint64[n], conn_ids 16 bytes each)."""
    return (crc16(conn_keys(node_ids, conn_ids)) & np.uint16(slots - 1)).astype(np.int64)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # wrapping multiplication is the point
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def owners(live: list[int], slots: int) -> np.ndarray:
    """Index into `live` of each slot's owner (int64[slots]); -1 everywhere when nobody is live."""
    if not live:
        return np.full(slots, -1, np.int64)
    ids = np.array(sorted(set(live)), np.uint64)
    weights = _splitmix64(_splitmix64(ids)[:, None] ^ np.arange(slots, dtype=np.uint64)[None, :])
    best = np.argmax(weights, axis=0)
    # back to positions in `live` as given
    position = {node: i for i, node in enumerate(live)}
    return np.array([position[int(ids[b])] for b in range(len(ids))], np.int64)[best]
