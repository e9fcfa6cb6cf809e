"""BatchReceiver: the LB node's receive path into one ColumnBatch.

- over a real UDP socket (open_batch_receiver): good datagrams land in the
  batches in order, bad ones are rejected by reason exactly as PacketReceiver
  counts them, a replayed datagram is taken back out of the batch;
- flushes: one per drain of the socket, one per event-loop turn for
  datagram_received (the TCP option), at once outside a loop, at the size
  threshold, and from LbNode.tick before the interval ends;
- a failing callback is counted and the batch still cleared;
- DatagramStream cuts many messages from one read.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import replace

import pytest

from spoa.lbnode.node import LbNode
from spoa.lbnode.packet_receiver import BatchReceiver, open_batch_receiver
from spoa.wire.stream_transport import DatagramStream, frame

from .test_lbnode_batch import table
from ..wire.test_packet import HEADER, KEY, MALFORMED, OTHER_KEY, packet, sample_record  # noqa: F401, F811 - fixture
from ..wire.test_packet_columns import records_of


class Sink:
    """on_batch that keeps what each flush held."""

    def __init__(self) -> None:
        self.flushes: list[list] = []

    def __call__(self, batch) -> None:
        self.flushes.append(records_of(batch))

    @property
    def records(self) -> list:
        return [rec for flush in self.flushes for _, rec in flush]


def test_udp_batches_and_rejections(packet):
    sink = Sink()
    senders = []
    good = packet.encode_packet(HEADER, [sample_record(i, nseg=8) for i in range(12)], KEY)
    flipped = bytearray(good[0])
    flipped[100] ^= 4
    bad = [
        ("replayed", good[1]),
        ("truncated", good[2][:50]),
        ("bad_magic", b"XPUB" + good[0][4:]),
        ("bad_version", good[0][:4] + b"\x02" + good[0][5:]),
        ("bad_hmac", bytes(flipped)),
        ("bad_hmac", packet.encode_packet(replace(HEADER, sequence=5000), [sample_record()], OTHER_KEY)[0]),
        ("malformed", MALFORMED["direction 2"]),
        ("replayed", packet.encode_packet(replace(HEADER, sequence=HEADER.sequence - 64), [], KEY)[0]),
    ]

    async def run():
        receiver = BatchReceiver(KEY, sink, lambda header, addr: senders.append(addr), batch=packet.ColumnBatch())
        endpoint = await open_batch_receiver("127.0.0.1", 0, receiver)
        try:
            address = endpoint.get_extra_info("sockname")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                for data in good + [data for _, data in bad]:
                    sender.sendto(data, address)
                deadline = time.monotonic() + 10
                while receiver.accepted + sum(receiver.rejected.values()) < len(good) + len(bad):
                    assert time.monotonic() < deadline, receiver.stats()
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0)
                return receiver, sender.getsockname()
        finally:
            endpoint.close()

    receiver, sender_address = asyncio.run(run())
    expected = dict.fromkeys(receiver.rejected, 0)
    for why, _ in bad:
        expected[why] += 1
    assert receiver.rejected == expected
    assert receiver.accepted == len(good) and receiver.records == 12 and receiver.callback_errors == 0
    assert sink.records == [sample_record(i, nseg=8) for i in range(12)]
    assert 1 <= receiver.flushes == len(sink.flushes) <= len(good) + len(bad)
    assert senders == [("127.0.0.1", sender_address[1])] * len(good)


def test_one_flush_per_loop_turn_for_streamed_datagrams(packet):
    sink = Sink()
    datagrams = packet.encode_packet(HEADER, [sample_record(i) for i in range(30)], KEY)
    assert len(datagrams) > 3

    async def run():
        receiver = BatchReceiver(KEY, sink, batch=packet.ColumnBatch())
        stream = DatagramStream(receiver.datagram_received)
        stream.data_received(b"".join(frame(d) for d in datagrams))  # one read, many messages
        assert sink.flushes == []  # not yet: at the end of this turn
        await asyncio.sleep(0)
        return receiver

    receiver = asyncio.run(run())
    assert len(sink.flushes) == 1 and sink.records == [sample_record(i) for i in range(30)]
    assert receiver.accepted == len(datagrams)


def test_flush_outside_a_loop_and_at_the_threshold(packet):
    sink = Sink()
    datagrams = packet.encode_packet(HEADER, [sample_record(i) for i in range(30)], KEY)
    receiver = BatchReceiver(KEY, sink, batch=packet.ColumnBatch())
    receiver.datagram_received(datagrams[0], None)
    assert len(sink.flushes) == 1  # no event loop: at once
    receiver = BatchReceiver(KEY, sink, batch=packet.ColumnBatch(), flush_records=10)
    receiver._scheduled = True  # as within a drain
    for d in datagrams[1:]:  # 7, 7, 7 and 2 records
        receiver.datagram_received(d, None)
    receiver.flush()
    assert [len(f) for f in sink.flushes] == [7, 14, 9]
    assert sink.records == [sample_record(i) for i in range(30)]


def test_failing_callbacks_are_counted_and_the_batch_cleared(packet, caplog):
    def broken(batch):
        raise KeyError("consumer bug")

    def broken_datagram(header, addr):
        raise RuntimeError("address book bug")

    (data,) = packet.encode_packet(HEADER, [sample_record()], KEY)
    receiver = BatchReceiver(KEY, broken, broken_datagram, batch=packet.ColumnBatch())
    receiver.datagram_received(data, None)
    assert receiver.accepted == 1 and receiver.callback_errors == 2 and receiver.batch.n == 0
    assert "consumer bug" in caplog.text and "address book bug" in caplog.text
    with pytest.raises(ValueError, match="at least 16 bytes"):
        BatchReceiver(b"short", broken)


def test_lbnode_tick_ingests_what_arrived_first(packet):
    node = LbNode(table(), KEY, lbnode_id=9, interval_ms=1000)
    receiver = BatchReceiver(KEY, node.on_batch, node.on_datagram, batch=packet.ColumnBatch())
    node.receiver = receiver
    receiver._scheduled = True  # a flush is pending on the loop: nothing ingested yet
    for d in packet.encode_packet(HEADER, [sample_record(i) for i in range(5)], KEY):
        receiver.datagram_received(d, ("192.0.2.9", 4000))
    assert len(node.table) == 0

    class Transport:
        sent: list = []

        def sendto(self, data, addr):
            self.sent.append(addr)

    node.transport = Transport()
    node.tick()
    assert len(node.table) == 5 and node.table.stats.hints_sent == 5
    assert Transport.sent == [("192.0.2.9", 4000)]
