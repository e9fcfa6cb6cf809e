"""The tier against a real Valkey/Redis Cluster: state written per slot, adopted on failover with
its totals and deadlines, a lapsed node fenced, an unreachable store survived."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time

import numpy as np
import pytest
import redis

from spoa.lbnode.cluster.membership import FENCED, MEMBER
from spoa.lbnode.cluster.store import slot_key
from spoa.wire.slots import conn_slots
from spoa.lbnode.cluster.writer import COMPACT_EVERY
from spoa.lbnode.node import columns
from spoa.lbnode.packet_receiver import BatchReceiver, UdpEndpoint
from spoa.wire.forward import decode_forward, is_forward
from spoa.wire.hints import decode_hints
from spoa.wire.packet import encode_packet
from spoa.netutil import now_ms
from spoa.wire.records import ConnectionRecord, ConnFlags, HeaderFlags, PacketHeader, SegmentRecord

from .helpers import namespace, record, tier_node

SERVER_NODE = 7
CONNECTIONS = 300
# Short leases so the failover tests take seconds; timeout x 3 <= membership (the config's rule).
FAST = {"membership_ms": 900, "timeout_ms": 300, "grace_ms": 3000, "slots": 64}


def run(coro):
    return asyncio.run(coro)


def feed(lbnode, count: int, total_per_conn, closed=()) -> None:
    """One interval: a record of each connection (cumulative total), then the node's tick."""
    recs = [record(i, total_per_conn(i), ConnFlags.CLOSED if i in closed else 0) for i in range(count)]
    lbnode.on_batch(columns(SERVER_NODE, recs))
    lbnode.tick()


def answered(lbnode, count: int, total_per_conn) -> int:
    """One interval's records, then how many hints the node would send for them."""
    lbnode.on_batch(columns(SERVER_NODE, [record(i, total_per_conn(i)) for i in range(count)]))
    hints = lbnode.tier.own_hints(lbnode.table.end_interval(now_ms()))
    return sum(len(entries) for entries in hints.values())


async def rounds(*lbnodes, seconds: float) -> None:
    """Every node's round, each interval (here 100 ms), for `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for lbnode in lbnodes:
            await lbnode.tier.round()
        await asyncio.sleep(0.1)


def store_view(store_cluster, lbnode, ns: str) -> tuple[dict[int, int], int]:
    """conn number -> last total, as a loader reads the store (base, chunks, deletions); and
    the most fields a slot's hash has."""
    c = redis.RedisCluster.from_url(f"redis://{store_cluster.seeds[0]}")
    try:
        out, most = {}, 0
        for slot in range(lbnode.tier.slots):
            stored = c.hgetall(slot_key(ns, slot))
            most = max(most, len(stored))
            writer = lbnode.tier.writer
            kept = {name: dict(getattr(writer, name)) for name in ("frontends", "chunks", "epochs")}
            was_due = slot in writer.needs_base
            records = lbnode.tier.loader.records(slot, stored)
            for name, before in kept.items():  # records() hands the slot over as if gained: undo
                setattr(writer, name, before)
            if not was_due:
                writer.needs_base.discard(slot)
            out.update({int.from_bytes(bytes(r["key"])[8:], "big"): int(r["table.last_total"]) for r in records})
        return out, most
    finally:
        c.close()


_seen_commands: dict[int, int] = {}


def new_commands(stats) -> int:
    """Store commands written since the previous call (per stats object)."""
    previous = _seen_commands.get(id(stats), 0)
    _seen_commands[id(stats)] = stats.write_commands
    return stats.write_commands - previous


def test_a_lone_member_owns_every_slot_and_writes_what_changed(tmp_path, store_cluster):
    ns = namespace("lone")
    # a long membership: the test reads the store back between rounds, slower than the renewals
    a = tier_node(tmp_path, 1, store=store_cluster.seeds, namespace=ns, **{**FAST, "membership_ms": 60_000})

    async def scenario():
        await a.tier.round()  # joins, owns everything (alone)
        assert a.tier.membership.state == MEMBER and a.tier.owned.all()
        stats = a.tier.store.stats
        # gained slots get a base each (empty here): per slot one EVALSHA (base, layout, names, PEXPIRE)
        assert stats.write_batches == 1 and new_commands(stats) == FAST["slots"]
        feed(a, CONNECTIONS, lambda i: 1000 * i)
        await a.tier.round()
        assert stats.write_batches == 2 and stats.rows_written == CONNECTIONS and stats.write_errors == 0
        # then one chunk per slot that changed: one EVALSHA setting one field
        assert new_commands(stats) == FAST["slots"]
        assert store_view(store_cluster, a, ns)[0] == {i: 1000 * i for i in range(CONNECTIONS)}
        for step in range(2, 3 + COMPACT_EVERY):  # then chunks, and each slot compacted in its turn
            first = 10 if step > 3 else 0  # 0..9 closed at step 3
            a.on_batch(columns(SERVER_NODE, [record(i, step * 1000 * i, ConnFlags.CLOSED if step == 3 and i < 10
                                                    else 0) for i in range(first, CONNECTIONS)]))
            a.tick()
            await a.tier.round()
            expected = {i: step * 1000 * i for i in range(10 if step >= 3 else 0, CONNECTIONS)}
            connections, most_fields = store_view(store_cluster, a, ns)
            assert connections == expected, step
            # per slot one EVALSHA: a chunk, or in its turn a base, an HDEL of the chunks and a PEXPIRE
            assert new_commands(stats) == FAST["slots"]
            # base and its segments, layout, names, epoch, and at most COMPACT_EVERY chunks and their segments
            assert most_fields <= 2 * COMPACT_EVERY + 5
        assert a.tier.writer.flushes > COMPACT_EVERY and all(
            len(chunks) < COMPACT_EVERY for chunks in a.tier.writer.chunks.values())
        assert stats.write_errors == 0
        await a.tier.close()

    run(scenario())


def two_nodes(tmp_path, store_cluster, name: str):
    """LB nodes 1 and 2 of one tier on the shared store."""
    ns = namespace(name)
    return (tier_node(tmp_path, 1, store=store_cluster.seeds, namespace=ns, **FAST),
            tier_node(tmp_path, 2, store=store_cluster.seeds, namespace=ns, **FAST))


@pytest.mark.parametrize("engine", ["valkey", "redis-7.0"])
def test_killed_node_connections_are_adopted_with_totals_and_deadlines(tmp_path, request, engine):
    store = request.getfixturevalue("store_cluster" if engine == "valkey" else "redis7_store_cluster")
    a, b = two_nodes(tmp_path, store, "failover")

    async def scenario():
        await rounds(a, b, seconds=0.5)  # both members; each owns about half
        assert a.tier.owned.sum() + b.tier.owned.sum() == FAST["slots"] and not (a.tier.owned & b.tier.owned).any()
        share = a.tier.owned.copy()
        # the agent (not built yet) sends each connection to its owner: here, A's share to A
        ids = np.arange(CONNECTIONS)
        conn_ids = np.array([int(i).to_bytes(16, "big") for i in ids], "V16")
        mine = ids[share[conn_slots(np.full(CONNECTIONS, SERVER_NODE, np.uint64), conn_ids, FAST["slots"])]]
        assert 0.3 * CONNECTIONS < len(mine) < 0.7 * CONNECTIONS
        for step in (1, 2, 3):
            a.on_batch(columns(SERVER_NODE, [record(int(i), 1000 * step * int(i)) for i in mine]))
            a.tick()
            await a.tier.round()
        table = a.table
        before = {int(i): (int(table.last_total[table.slot(SERVER_NODE, int(i).to_bytes(16, "big"))]),
                           int(table.expires[table.slot(SERVER_NODE, int(i).to_bytes(16, "big"))]))
                  for i in mine}
        history_before = table.history.series(table.slot(SERVER_NODE, int(mine[0]).to_bytes(16, "big")))
        # A dies (no more rounds, its membership lapses); B takes over A's slots and loads them
        died = now_ms()
        began = time.monotonic()
        while not b.tier.owned.all():
            await b.tier.round()
            await asyncio.sleep(0.05)
            assert time.monotonic() - began < 5, "B did not take A's slots within 5 s"
        failover = time.monotonic() - began
        assert failover < 3 * FAST["membership_ms"] / 1000
        assert b.tier.loader.adopted == len(mine)
        assert b.table.stats.new_connections == 0 and b.table.stats.premature_expiries == 0
        for i, (total, expires) in before.items():
            row = b.table.slot(SERVER_NODE, i.to_bytes(16, "big"))
            assert row is not None, f"connection {i} lost"
            assert int(b.table.last_total[row]) == total
            assert int(b.table.expires[row]) >= max(expires, died + FAST["grace_ms"])
        row = b.table.slot(SERVER_NODE, int(mine[0]).to_bytes(16, "big"))
        np.testing.assert_array_equal(b.table.history.series(row), history_before)
        # the next records refresh them at B: cumulative totals continue, no premature expiry
        b.on_batch(columns(SERVER_NODE, [record(int(i), 4000 * int(i)) for i in mine]))
        b.tick()
        assert b.table.stats.premature_expiries == 0 and b.table.stats.new_connections == 0
        await b.tier.close()

    run(scenario())


def test_a_node_whose_membership_lapsed_is_fenced_and_rejoins(tmp_path, store_cluster):
    a, b = two_nodes(tmp_path, store_cluster, "fence")

    async def scenario():
        await rounds(a, b, seconds=0.5)
        feed(a, 50, lambda i: 100 * i)
        assert 10 < len(a.table) < 40 and a.tier.answering()  # its share of the 50
        assert a.tier.records_not_owned == 50 - len(a.table)
        # A "frozen" longer than its lease: B takes everything meanwhile
        end = time.monotonic() + 2 * FAST["membership_ms"] / 1000
        while time.monotonic() < end:
            await b.tier.round()
            await asyncio.sleep(0.1)
        assert b.tier.owned.all()
        assert not a.tier.answering()  # awake, but its membership is unconfirmed: silent
        assert answered(a, 50, lambda i: 200 * i) == 0  # refreshed, but it sends no hint
        await a.tier.round()  # its renewal finds the key lapsed
        assert a.tier.membership.state == FENCED and a.tier.membership.fences == 1
        assert len(a.table) == 0 and not a.tier.owned.any()
        await rounds(a, b, seconds=0.6)  # rejoins as a new incarnation; the slots split again
        assert a.tier.membership.state == MEMBER and a.tier.membership.incarnations == 2
        assert a.tier.owned.any() and (a.tier.owned ^ b.tier.owned).all()
        await a.tier.close()
        await b.tier.close()

    run(scenario())


def test_store_down_keeps_serving_from_memory_and_catches_up(tmp_path, new_store_cluster):
    cluster = new_store_cluster(primaries=1, replicas=0)
    ns = namespace("down")
    a = tier_node(tmp_path, 1, store=cluster.seeds, namespace=ns, **FAST)

    async def scenario():
        await a.tier.round()
        assert a.tier.owned.all()
        cluster.kill(cluster.nodes[0])  # the whole store gone
        for step in (1, 2, 3):
            assert answered(a, 20, lambda i: 100 * step * i) == 20  # from memory
            a.tier.after_interval(np.flatnonzero(a.table.keys.in_use))
            await rounds(a, seconds=0.4)
        stats = a.tier.store.stats
        assert stats.unreachable and stats.write_errors >= 2 and stats.errors >= 3
        assert len(a.table) == 20 and a.tier.answering()
        # kept for when it is back: the newest state of each row, once
        assert sum(len(fields) for fields in a.tier.writer.pending.values()) >= 20
        await a.tier.close()  # does not hang on a dead store

    run(scenario())


def test_unreachable_seed_never_joins_and_never_raises(tmp_path):
    from spoa.testing import free_port

    a = tier_node(tmp_path, 1, store=[f"127.0.0.1:{free_port()}"], namespace="down", **FAST)

    async def scenario():
        await rounds(a, seconds=0.5)
        assert a.tier.membership.state != MEMBER and not a.tier.answering()
        assert a.tier.store.stats.errors >= 1

    run(scenario())


def test_node_dying_with_a_store_primary_loses_nothing_acknowledged(tmp_path, new_store_cluster):
    cluster = new_store_cluster(primaries=3, replicas=1)
    ns = namespace("both")
    a, b = (tier_node(tmp_path, n, store=cluster.seeds, namespace=ns, **FAST) for n in (1, 2))

    async def scenario():
        await rounds(a, b, seconds=0.5)
        feed(a, CONNECTIONS, lambda i: 100 * i)  # A ingests its share
        for _ in range(3):
            feed(a, CONNECTIONS, lambda i: 200 * i)
            await a.tier.round()
        held = len(a.table)
        # A dies, and with it the store primary of A's slot 0 (its replica takes over)
        victim = cluster.primary_for_slot(redis.crc.key_slot(slot_key(ns, int(np.flatnonzero(a.tier.owned)[0]))
                                                             .encode()))
        cluster.kill(victim)
        began = time.monotonic()
        while not b.tier.owned.all():  # loads from the dead primary fail and are retried until promotion
            await b.tier.round()
            await asyncio.sleep(0.1)
            assert time.monotonic() - began < 20, "B did not load A's slots within 20 s of the failover"
        assert b.tier.loader.adopted == held and b.table.stats.new_connections == 0
        assert b.tier.store.stats.errors > 0  # it did meet the failover
        await b.tier.close()

    run(scenario())


def test_a_former_owner_that_has_not_noticed_yet_cannot_overwrite_the_new_one(tmp_path, store_cluster):
    a, b = two_nodes(tmp_path, store_cluster, "stale")
    ns = a.tier.writer.namespace

    async def scenario():
        await a.tier.round()  # A alone: every slot
        feed(a, CONNECTIONS, lambda i: 100 * i)
        await a.tier.round()
        await b.tier.round()  # B joins and gains about half, loading it (epochs incremented)
        assert b.tier.loader.adopted > 0 and not a.tier.owned.sum() < FAST["slots"]
        feed(b, CONNECTIONS, lambda i: 300 * i)  # B's share moves on
        await b.tier.writer.flush()
        feed(a, CONNECTIONS, lambda i: 200 * i)  # A, not rebalanced yet, writes every slot
        await a.tier.writer.flush()
        assert a.tier.store.stats.stale_writes == int(b.tier.owned.sum())  # refused by the store
        view = store_view(store_cluster, b, ns)[0]
        for i, total in view.items():
            slot = int(conn_slots(np.array([SERVER_NODE], np.uint64), np.array([i.to_bytes(16, "big")], "V16"),
                                  FAST["slots"])[0])
            assert total == (300 if b.tier.owned[slot] else 200) * i
        await a.tier.close()
        await b.tier.close()

    run(scenario())


def test_a_record_routed_to_a_former_owner_is_forwarded_to_the_owner_with_the_agent_address(tmp_path, store_cluster):
    """A server node's older map sent B's records to A: A passes the datagram on to B in an
    envelope naming the server node; B ingests its records, A keeps its own, and B's hints go
    straight to the server node. What came unrouted (to every LB node) is never forwarded."""
    ns = namespace("forward")
    socks = {name: socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for name in ("a", "b", "agent")}
    for sock in socks.values():
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(2)
    address = {name: sock.getsockname() for name, sock in socks.items()}
    a, b = (tier_node(tmp_path, i, store=store_cluster.seeds, namespace=ns,
                      advertise=f"127.0.0.1:{address[name][1]}", **FAST) for i, name in ((1, "a"), (2, "b")))
    loop = asyncio.new_event_loop()
    try:
        for node, name in ((a, "a"), (b, "b")):
            node.transport = UdpEndpoint(socks[name], loop)
            node.receiver = BatchReceiver(node.key, node.on_batch, node.on_datagram)
        loop.run_until_complete(rounds(a, b, seconds=0.5))
        conn_ids = np.array([i.to_bytes(16, "big") for i in range(40)], "V16")
        slot = conn_slots(np.full(40, SERVER_NODE, np.uint64), conn_ids, FAST["slots"])
        of_b = {i for i in range(40) if b.tier.owned[slot[i]]}
        assert 0 < len(of_b) < 40
        records = [record(i, 100 * (i + 1)) for i in range(40)]
        routed = encode_packet(PacketHeader(SERVER_NODE, 50, now_ms(), 100, HeaderFlags.ROUTED), records, a.key, 9000)
        assert len(routed) == 1
        a.receiver.datagram_received(routed[0], address["agent"])
        a.receiver.flush()
        assert len(a.table) == 40 - len(of_b) and a.tier.records_forwarded == len(of_b)
        envelope, _ = socks["b"].recvfrom(65535)
        assert decode_forward(envelope, a.key) == (routed[0], address["agent"])
        b.receiver.datagram_received(envelope, address["a"])
        b.receiver.flush()
        held = {int.from_bytes(bytes(c), "big") for c in b.table.conn_id[np.flatnonzero(b.table.keys.in_use)]}
        assert held == of_b and b.receiver.forwarded_in == 1 and b.tier.records_forwarded == 0
        assert b.addresses[SERVER_NODE] == address["agent"]  # its hints go to the server node
        b.tick()
        hints, sender = socks["agent"].recvfrom(65535)
        assert sender == address["b"]
        assert {int.from_bytes(h.conn_id, "big") for h in decode_hints(hints, b.key)[1]} == of_b
        # the same records sent to every LB node (no map): A drops B's, forwards nothing
        unrouted = encode_packet(PacketHeader(SERVER_NODE, 51, now_ms(), 100), records, a.key, 9000)
        a.receiver.datagram_received(unrouted[0], address["agent"])
        a.receiver.flush()
        assert a.tier.records_forwarded == len(of_b)
        socks["b"].settimeout(0.2)
        with pytest.raises(TimeoutError):
            while True:  # only hints or maps may have come; no second envelope
                assert not is_forward(socks["b"].recvfrom(65535)[0])
        # a tampered envelope (another return address) is refused, counted, not ingested
        forged = envelope[:10] + b"\x09" + envelope[11:]
        b.receiver.datagram_received(forged, address["a"])
        assert b.receiver.rejected["bad_hmac"] == 1
        loop.run_until_complete(a.tier.close())
        loop.run_until_complete(b.tier.close())
    finally:
        for sock in socks.values():
            sock.close()
        loop.close()


def test_a_joining_node_starts_from_the_tiers_class_priors_not_from_nothing(tmp_path, store_cluster):
    ns = namespace("priors")
    a = tier_node(tmp_path, 1, store=store_cluster.seeds, namespace=ns, **FAST)

    async def scenario():
        await rounds(a, seconds=0.4)
        # A learns the class "fe" of server node 7: leases granted, and closes for its end bound
        closes = range(0, 40, 2)
        for step in (1, 2, 3, 4):
            feed(a, 40, lambda i: 1000 * step * (i + 1) if step < 3 or i % 2 else 3000 * (i + 1),
                 closed=closes if step == 4 else ())
        cid = a.table.classes[(SERVER_NODE, "fe")]
        learnt = a.table.class_lease[cid]
        assert not np.isnan(learnt)
        bound = a.table.policy.end_bound
        assert bound.idle_at_close.count[cid] == len(closes)
        await a.tier.close()  # a clean stop writes the priors too
        assert a.tier.priors.written == 1
        # C joins a tier that has seen the class: it knows it before any of its connections
        c = tier_node(tmp_path, 3, store=store_cluster.seeds, namespace=ns, **FAST)
        c.table.class_of(SERVER_NODE, "other")  # a class of its own: kept as it is
        await rounds(c, seconds=0.4)
        assert c.tier.priors.seeded == 1
        cc = c.table.classes[(SERVER_NODE, "fe")]
        assert c.table.class_lease[cc] == learnt
        ring = c.table.policy.end_bound.idle_at_close
        assert ring.count[cc] == len(closes)
        np.testing.assert_array_equal(ring.series(cc), bound.idle_at_close.series(cid))
        assert np.isnan(c.table.class_lease[c.table.classes[(SERVER_NODE, "other")]])
        # what C learnt itself is never overwritten by a later read
        c.table.class_lease[cc] = 1234.0
        assert c.tier.priors.seed(c.tier.priors.encode() | {b"7|fe": a.tier.priors.encode()[b"7|fe"]}) == 0
        assert c.table.class_lease[cc] == 1234.0
        # records of another layout (another end-bound window) or a bad name are refused
        assert c.tier.priors.seed({b"7|new": b"short", b"x|fe": a.tier.priors.encode()[b"7|fe"]}) == 0
        await c.tier.close()


def test_writes_go_on_after_the_store_forgets_the_write_script(tmp_path, new_store_cluster):
    """A primary without the script (promoted replica, restarted node) answers NOSCRIPT: that
    write is kept, the script loaded again, and the next write carries both intervals."""
    store = new_store_cluster(primaries=1, replicas=0)
    ns = namespace("noscript")
    a = tier_node(tmp_path, 1, store=store.seeds, namespace=ns, **{**FAST, "membership_ms": 60_000})

    async def scenario():
        await a.tier.round()
        stats = a.tier.store.stats
        feed(a, CONNECTIONS, lambda i: 1000 * i)
        await a.tier.round()
        for node in store.nodes:
            store.client(node).script_flush()
        feed(a, CONNECTIONS, lambda i: 2000 * i)
        await a.tier.round()
        assert stats.write_errors == 1  # NOSCRIPT: the write kept
        await a.tier.round()
        assert stats.write_errors == 1 and store_view(store, a, ns)[0] == {i: 2000 * i for i in range(CONNECTIONS)}
        await a.tier.close()

    run(scenario())


def lose_newest_chunks(store_cluster, lbnode) -> int:
    """Each of the node's slots loses its newest chunk (rows and segments), as a primary's
    failover loses its last acknowledged write; how many slots lost one."""
    c = redis.RedisCluster.from_url(f"redis://{store_cluster.seeds[0]}")
    try:
        lost = 0
        for slot in np.flatnonzero(lbnode.tier.owned).tolist():
            key = slot_key(lbnode.tier.writer.namespace, slot)
            chunks = [f for f in c.hkeys(key) if f.startswith(b"c:")]
            if chunks:
                newest = max(chunks, key=lambda f: int(f[2:]))
                lost += c.hdel(key, newest, b"g:" + newest[2:]) == 2
        return lost
    finally:
        c.close()


@pytest.mark.parametrize("lost", [False, True], ids=["all-chunks", "newest-chunk-lost"])
def test_adopted_connections_keep_their_segments_and_segment_histories(tmp_path, store_cluster, lost):
    """Segments (last report and rolling history) go to the store with their connections; the
    successor restores them, and the connection's next record continues each history. Chunks
    carry only each ring's newest cells: with a chunk lost (`lost`: the newest before the last
    write) the next one repairs it, and the successor's state is the same."""
    a, b = two_nodes(tmp_path, store_cluster, "segments-lost" if lost else "segments")

    def with_segments(i: int, step: int) -> ConnectionRecord:
        segs = tuple(SegmentRecord(direction=d, start_byte_offset=0 if k == 0 else 1 << 20, byte_count=100 * step,
                                   bytes_transferred=100 * (i + 1) * (k + 1), packets_transferred=1,
                                   timestamp_last_activity_ms=now_ms(), level=k)
                     for d in (0, 1) for k in range(2))
        return dataclasses.replace(record(i, 1000 * step * (i + 1)), segments=segs)

    async def scenario():
        await rounds(a, b, seconds=0.5)
        ids = range(60)
        conn_ids = np.array([i.to_bytes(16, "big") for i in ids], "V16")
        mine = [i for i, s in zip(ids, conn_slots(np.full(60, SERVER_NODE, np.uint64), conn_ids, FAST["slots"]))
                if a.tier.owned[s]]
        for step in (1, 2, 3, 4):
            a.on_batch(columns(SERVER_NODE, [with_segments(i, step) for i in mine]))
            a.tick()
            await a.tier.round()
            if lost and step == 3:
                assert lose_newest_chunks(store_cluster, a) > 0

        def state(node, i):
            table = node.table
            row = table.slot(SERVER_NODE, i.to_bytes(16, "big"))
            segs = table.segments.of_connection(row)
            return [(int(table.segments.direction[s]), int(table.segments.start[s]), int(table.segments.byte_count[s]),
                     int(table.segments.level[s]), table.segments.history.series(s).tolist()) for s in segs] + [
                table.history.series(row).tolist(), int(table.last_total[row])]

        before = {i: state(a, i) for i in mine}
        assert all(len(segs) == 6 and len(segs[0][4]) == 4 for segs in before.values())
        began = time.monotonic()
        while not b.tier.owned.all():  # A died
            await b.tier.round()
            await asyncio.sleep(0.05)
            assert time.monotonic() - began < 5
        assert b.tier.loader.segments_adopted == 4 * len(mine)
        assert {i: state(b, i) for i in mine} == before
        b.on_batch(columns(SERVER_NODE, [with_segments(i, 5) for i in mine]))
        b.tick()
        after = state(b, mine[0])[:4]
        assert [len(s[4]) for s in after] == [5, 5, 5, 5]  # continued, not restarted
        assert [s[4][:4] for s in after] == [s[4] for s in before[mine[0]][:4]]
        assert b.tier.store.stats.rings_inexact == 0
        await b.tier.close()

    run(scenario())


def test_a_failover_of_the_membership_keys_primary_fences_nobody(tmp_path, new_store_cluster):
    """The primary holding every membership key dies; its replica takes longer than the lease to
    be promoted, so it comes up without the keys. The nodes, whose renewals were failing, set
    theirs again: nobody is fenced, nobody drops what it holds, every slot stays with its owner."""
    cluster = new_store_cluster(primaries=3, replicas=1)
    ns = namespace("members-failover")
    a, b = (tier_node(tmp_path, n, store=cluster.seeds, namespace=ns, **FAST) for n in (1, 2))

    async def scenario():
        await rounds(a, b, seconds=0.5)
        feed(a, CONNECTIONS, lambda i: 100 * i)
        feed(b, CONNECTIONS, lambda i: 100 * i)
        held, owned = (len(a.table), len(b.table)), (a.tier.owned.copy(), b.tier.owned.copy())
        assert all(held) and owned[0].sum() + owned[1].sum() == FAST["slots"]
        members = cluster.primary_for_slot(redis.crc.key_slot(a.tier.membership.key.encode()))
        cluster.kill(members)
        began = time.monotonic()
        step = iter(range(2, 1000))

        async def intervals(seconds: float) -> None:  # the agents' records keep coming, as do the rounds
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                total = 100 * next(step)
                feed(a, CONNECTIONS, lambda i: total * i)
                feed(b, CONNECTIONS, lambda i: total * i)
                await rounds(a, b, seconds=0.1)

        while not (a.tier.membership.reasserts and b.tier.membership.reasserts):
            await intervals(0.1)
            assert time.monotonic() - began < 20, "the nodes did not re-assert within 20 s of the failover"
        outage = time.monotonic() - began
        assert outage > FAST["membership_ms"] / 1000  # the keys did lapse on the promoted replica
        await intervals(1.5)  # the settling lease, then a few normal renewals
        for node, was_held, was_owned in zip((a, b), held, owned):
            assert node.tier.membership.fences == 0 and node.tier.answering()
            assert len(node.table) == was_held  # nothing dropped
            np.testing.assert_array_equal(node.tier.owned, was_owned)  # no slot moved
            assert node.tier.membership.live == [1, 2]
        await a.tier.close()
        await b.tier.close()

    run(scenario())


def test_a_reasserting_node_hands_over_the_slots_another_node_took_meanwhile(tmp_path, store_cluster):
    """A partition cut only A off: B took A's slots. A's key is gone when A reaches the store
    again; it re-asserts, finds the slots' epochs moved past its own and hands them over (its
    copy is stale: B served them meanwhile); back in the live set, it gets its share again,
    loaded from what B wrote."""
    a, b = two_nodes(tmp_path, store_cluster, "partition")

    async def scenario():
        await rounds(a, b, seconds=0.5)
        feed(a, CONNECTIONS, lambda i: 100 * i)
        await rounds(a, b, seconds=0.3)  # written
        mine, held = a.tier.owned.copy(), len(a.table)
        # A cannot reach the store: its calls fail (as a partition makes them), B renews on
        real = a.tier.store.call

        async def cut_off(what, operation):
            a.tier.store.stats.errors += 1
            a.tier.store.stats.unreachable = True
            return None

        a.tier.store.call = cut_off
        began = time.monotonic()
        while not b.tier.owned.all():
            await rounds(a, b, seconds=0.1)
            assert time.monotonic() - began < 5
        assert a.tier.answering() and len(a.table)  # serving from memory, as the issue wants
        a.tier.store.call = real  # the partition heals
        await rounds(a, b, seconds=2.0)  # re-assert, the check, then A live again: its share comes back
        assert a.tier.membership.reasserts == 1 and a.tier.membership.fences == 0
        assert a.tier.handed_over == held  # its stale copies went
        np.testing.assert_array_equal(a.tier.owned, mine)
        assert not (a.tier.owned & b.tier.owned).any() and a.tier.owned.sum() + b.tier.owned.sum() == FAST["slots"]
        assert a.tier.loader.adopted == held == len(a.table)  # loaded back from what B wrote
        assert b.tier.handed_over == held
        await a.tier.close()
        await b.tier.close()

    run(scenario())
