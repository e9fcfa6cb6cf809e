"""Hints reach every connection: many datagrams per interval, several LB nodes, restarts.

Real UDP on 127.0.0.1 between an in-process LB node (its own receiver, table
and hint sender) and the agent's publisher and lease module.
"""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address

import pytest

from spoa import config as cfg
from spoa.lbnode.service import open_lbnode
from spoa.servernode.lease_module import LeaseModule, LeaseSettings
from spoa.servernode.publisher import Publisher
from spoa.servernode.tracker import SegmentTracker
from spoa.spop import frames
from spoa.spop.codec import FrameReader, FrameWriter
from spoa.spop.constants import FrameType
from spoa.wire.hints import max_hints
from spoa.wire.records import PacketHeader

KEY = b"k" * 32


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(KEY)
    return str(path)


async def start_lbnode(key_file: str, node_id=None, port: int = 0):
    overrides = {"lbnode.listen": f"127.0.0.1:{port}", "lbnode.key_file": key_file, "lbnode.node_id": node_id,
                 "lbnode.max_connections": 10_000, "lease.min_ms": 1000}
    return await open_lbnode(cfg.load(cfg.LBNODE_SCHEMA, None, overrides))


def register(module: LeaseModule, count: int, first: int = 0) -> None:
    """`count` connections as HAProxy's lease-request messages register them (real SPOP frames)."""
    notify = FrameWriter()
    for i in range(first, first + count):
        cid = f"{i:08x}-0000-4000-8000-000000000000"
        args = [("cid", cid), ("src", IPv4Address(f"10.0.{i >> 8}.{i & 255}")), ("src_port", 40000 + i % 20000),
                ("dst", IPv4Address("127.0.0.1")), ("dst_port", 8080), ("frontend", "fe")]
        frames.write_notify(notify, i + 1, 1, [("lease-request", args)])
    reader = FrameReader(1 << 16)
    reader.feed(notify.take())
    actions = FrameWriter()
    while (frame := reader.next_frame()) is not None:
        actions.begin_frame(FrameType.ACK, frame.stream_id, frame.frame_id)
        module.on_message(frame.messages()[0], actions)
        actions.end_frame()


async def exchange(module: LeaseModule, lbnodes: list, rounds: int = 2) -> None:
    """Publish, let the LB nodes ingest and answer, let the hints arrive."""
    for _ in range(rounds):
        module.tick()
        await asyncio.sleep(0.1)
        for lbnode in lbnodes:
            lbnode.tick()
        await asyncio.sleep(0.1)


async def agent_for(lbnodes: list) -> LeaseModule:
    return await agent_for_address(*(f"127.0.0.1:{n.transport.get_extra_info('sockname')[1]}" for n in lbnodes))


async def agent_for_address(*targets: str) -> LeaseModule:
    publisher = Publisher(list(targets), KEY, 1400)
    await publisher.open()
    return LeaseModule(SegmentTracker(), None, publisher, 1000, 7, LeaseSettings(min_ms=1000))


@pytest.mark.parametrize("connections", [1000, 3000])
def test_every_connection_gets_its_hint_across_many_datagrams(key_file, connections):
    async def run():
        lbnode = await start_lbnode(key_file)
        module = await agent_for([lbnode])
        register(module, connections)
        await exchange(module, [lbnode])
        stats = lbnode.table.stats
        assert stats.hint_datagrams >= connections // max_hints(1400)  # many datagrams per interval
        assert module.publisher.hints_rejected["replayed"] == 0
        # every hint sent was applied, none lost on the way
        assert module.stats.hints_applied == stats.hints_sent >= 2 * connections
        assert all(module.tracker.hint(key) is not None for key in module.tracker.keys())
        assert len(module.tracker) == connections
        module.publisher.close()
        lbnode.transport.close()

    asyncio.run(run())


def test_two_lb_nodes_with_default_ids_are_both_heard(key_file):
    async def run():
        first, second = await start_lbnode(key_file), await start_lbnode(key_file)
        assert first.lbnode_id != second.lbnode_id  # derived from the listen address
        module = await agent_for([first, second])
        register(module, 200)
        await exchange(module, [first, second])
        sent = first.table.stats.hints_sent + second.table.stats.hints_sent
        assert module.stats.hints_applied == sent and sum(module.publisher.hints_rejected.values()) == 0
        module.publisher.close()
        first.transport.close()
        second.transport.close()

    asyncio.run(run())


def test_a_restarted_lb_node_is_not_replayed(key_file):
    """A restart within the same millisecond range the old process used must still be heard."""
    async def run():
        lbnode = await start_lbnode(key_file, node_id=5)
        module = await agent_for([lbnode])
        register(module, 3000)  # ~54 datagrams per interval: sequences run ahead of the clock
        await exchange(module, [lbnode], rounds=3)
        port = lbnode.transport.get_extra_info("sockname")[1]
        lbnode.transport.close()
        restarted = await start_lbnode(key_file, node_id=5, port=port)
        before = module.stats.hints_applied
        register(module, 300, first=3000)  # new connections: published at once (the rest are deferred)
        await exchange(module, [restarted])
        assert module.publisher.hints_rejected["replayed"] == 0
        assert module.stats.hints_applied - before == restarted.table.stats.hints_sent > 0
        module.publisher.close()
        restarted.transport.close()

    asyncio.run(run())


def test_silent_lb_nodes_are_said_once_and_their_return_too(caplog):
    async def run():
        module = await agent_for_address("127.0.0.1:9")  # nothing answers there
        register(module, 3)
        module._started_ms -= 10_000  # as if started 10 s ago, and no hint since
        with caplog.at_level("INFO", logger="spoa.servernode.lease_module"):
            module.tick()
            module.tick()
            assert module.stats.lbnode_silences == 1
            assert [r.levelname for r in caplog.records if "no lease hint" in r.message] == ["WARNING"]
            assert "127.0.0.1:9" in caplog.text and "standard 30000 ms" in caplog.text
            module.on_hints(PacketHeader(node_id=1, sequence=1, timestamp_ms=0, interval_ms=0), [])
            assert "lease hints arrive again" in caplog.text
        module.publisher.close()

    asyncio.run(run())
