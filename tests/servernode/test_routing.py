"""The agent's routing: each record to its slot's owner by the tier map, through real UDP
sockets; no map, a stale map or a TCP transport: every record to every LB node."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import numpy as np

from spoa.servernode.publisher import PACKET_RECORDS, Publisher
from spoa.servernode.routing import Router
from spoa.wire.packet import ColumnBatch, RecordBatch
from spoa.wire.records import ConnectionRecord, HeaderFlags, PacketHeader
from spoa.wire.slots import conn_slots, owners
from spoa.wire.tier_map import TierMap, encode_tier_map

KEY = b"k" * 32
NODE = 7
SLOTS = 64


def record(i: int) -> ConnectionRecord:
    return ConnectionRecord(conn_id=i.to_bytes(16, "big"), src="192.0.2.1", src_port=1000 + i % 60000,
                            dst="192.0.2.2", dst_port=443, frontend="fe", flags=0, counter_source=0,
                            granularity_level=0, requested_lease_ms=0, predicted_lease_ms=0, lease_source=0,
                            bytes_in_total=0, bytes_out_total=i)


def owner_ids(live: list[int], conns: range) -> list[int]:
    """What the LB nodes compute: each connection's owner (spoa.lbnode.cluster.tier)."""
    conn_ids = np.array([i.to_bytes(16, "big") for i in conns], "V16")
    slots = conn_slots(np.full(len(conns), NODE, np.uint64), conn_ids, SLOTS)
    return [live[k] for k in owners(live, SLOTS)[slots].tolist()]


def tier_map(ports: dict[int, int], view_ms: int, sender: int = 1) -> TierMap:
    return TierMap(sender, view_ms, SLOTS, tuple((i, "127.0.0.1", p) for i, p in sorted(ports.items())))


def test_router_splits_by_the_lb_nodes_owner_and_keeps_the_newest_view():
    router = Router(ttl_ms=60_000)
    assert not router.fresh
    router.take(tier_map({10: 9001, 20: 9002, 30: 9003}, view_ms=100))
    split = router.split(NODE, RecordBatch.from_records([record(i) for i in range(500)]))
    expected = owner_ids([10, 20, 30], range(500))
    got = {}
    for target, group in split:
        member = router.map.members[target][0]
        ids = group.conn_ids()
        numbers = [int.from_bytes(ids[k:k + 16], "big") for k in range(0, len(ids), 16)]
        assert numbers == sorted(numbers)  # order kept
        for number in numbers:
            got[number] = member
    assert [got[i] for i in range(500)] == expected
    assert len(split) == 3 and all(100 < len(g) < 250 for _t, g in split)
    # an older view (a node that has not re-read the live set) does not steer records back
    router.take(tier_map({10: 9001, 20: 9002, 30: 9003, 40: 9004}, view_ms=99))
    assert router.maps_stale == 1 and len(router.map.members) == 3
    router.take(tier_map({10: 9001, 30: 9003}, view_ms=200))  # 20 died
    assert router.changes == 2
    moved = owner_ids([10, 30], range(500))
    assert all(m in (10, 30) for m in moved)
    assert all(before == after for before, after in zip(expected, moved) if before != 20)  # only 20's moved


def test_router_map_goes_stale_and_unresolvable_maps_are_ignored():
    router = Router(ttl_ms=50)
    router.take(tier_map({10: 9001}, view_ms=1))
    assert router.route()
    time.sleep(0.08)
    assert not router.route() and not router.fresh
    router.take(TierMap(1, 2, SLOTS, ((10, "no-such-host.invalid", 9001),)))
    assert router.maps_unresolved == 1 and router.map.view_ms == 1


class Sockets:
    """LB-node stand-ins: bound UDP sockets that collect what they receive."""

    def __init__(self, ids: list[int]) -> None:
        self.socks = {}
        for i in ids:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            self.socks[i] = s

    def port(self, i: int) -> int:
        return self.socks[i].getsockname()[1]

    def received(self, i: int) -> list[tuple[bytes, tuple]]:
        out = []
        while True:
            try:
                out.append(self.socks[i].recvfrom(65535))
            except BlockingIOError:
                return out

    def close(self) -> None:
        for s in self.socks.values():
            s.close()


@contextlib.asynccontextmanager
async def publishing_to(ids: list[int]):
    """(LB-node stand-ins, the agent's real Publisher configured with all of them, open)."""
    lbnodes = Sockets(ids)
    publisher = Publisher([f"127.0.0.1:{lbnodes.port(i)}" for i in ids], KEY, 1400)
    await publisher.open()
    try:
        yield lbnodes, publisher
    finally:
        publisher.close()
        lbnodes.close()


def decoded(got: list[tuple[bytes, tuple]]) -> tuple[ColumnBatch, list[PacketHeader]]:
    """What an LB-node stand-in received: its records as one batch, and each datagram's header."""
    batch = ColumnBatch()
    return batch, [batch.append_datagram(d, KEY)[0] for d, _ in got]


async def _publish_routed():
    async with publishing_to([10, 20, 30]) as (lbnodes, publisher):
        records = [record(i) for i in range(300)]
        header = PacketHeader(node_id=NODE, sequence=1000, timestamp_ms=1, interval_ms=500)
        assert publisher.send(header, records) == 1000  # no map yet: to everyone, one sequence
        await asyncio.sleep(0.05)
        for i in (10, 20, 30):
            got = lbnodes.received(i)
            agent = got[0][1]  # where the LB node answers (hints, maps)
            batch, headers = decoded(got)
            assert not any(h.flags & HeaderFlags.ROUTED for h in headers)
            assert batch.n == 300
        # a tier map from LB node 20, on the agent's own socket (as LbNode.tick sends it)
        ports = {i: lbnodes.port(i) for i in (10, 20, 30)}
        lbnodes.socks[20].sendto(encode_tier_map(tier_map(ports, view_ms=5, sender=20), KEY), agent)
        lbnodes.socks[20].sendto(b"CMAP" + bytes(60), agent)  # garbage: counted, the map held stays
        await asyncio.sleep(0.05)
        assert publisher.router.fresh and publisher.maps_rejected["bad_version"] == 1
        last = publisher.send(PacketHeader(node_id=NODE, sequence=2000, timestamp_ms=2, interval_ms=500), records)
        assert last == 2002  # one sequence per LB node routed to
        await asyncio.sleep(0.05)
        expected = owner_ids([10, 20, 30], range(300))
        sequences = set()
        for i in (10, 20, 30):
            batch, headers = decoded(lbnodes.received(i))
            assert all(h.flags & HeaderFlags.ROUTED for h in headers)
            sequences.update((h.sequence, i) for h in headers)
            got = sorted(int.from_bytes(bytes(c), "big") for c in batch.conn_id)
            assert got == [c for c in range(300) if expected[c] == i]  # its share, nothing else
        assert len({s for s, _ in sequences}) == 3  # each LB node its own sequence
        assert publisher.records_routed == 300


def test_publisher_routes_each_record_to_its_owner_once_a_map_comes():
    asyncio.run(_publish_routed())


async def _tcp_keeps_broadcast():
    publisher = Publisher(["127.0.0.1:1"], KEY, 1400, transport="tcp")
    publisher.router.take(tier_map({10: 9001}, view_ms=1))
    try:
        assert publisher.send(PacketHeader(NODE, 5, 1, 500), [record(1)]) == 5
        assert publisher.records_routed == 0
    finally:
        publisher.close()


def test_tcp_transport_sends_to_the_configured_lb_nodes_even_with_a_map():
    asyncio.run(_tcp_keeps_broadcast())


def test_a_one_member_map_routes_everything_to_it_in_order():
    router = Router(ttl_ms=60_000)
    router.take(tier_map({10: 9001}, view_ms=1))
    batch = RecordBatch.from_records([record(i) for i in range(50)])
    assert [(target, group.conn_ids()) for target, group in router.split(NODE, batch)] == [(0, batch.conn_ids())]


async def _large_interval():
    async with publishing_to([10]) as (_lbnodes, publisher):
        records = [record(i) for i in range(2 * PACKET_RECORDS + 5)]
        assert publisher.send(PacketHeader(NODE, 100, 1, 500), records) == 102  # three packets
        assert publisher.send_errors == 0


def test_an_interval_larger_than_a_packet_goes_out_as_several():
    """A million connections are more records than one packet's u16 datagram count holds."""
    asyncio.run(_large_interval())
