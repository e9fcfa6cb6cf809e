"""Length-prefixed datagrams over TCP: framing survives any split; garbage closes."""

from __future__ import annotations

import asyncio

from spoa.wire.stream_transport import MAX_MESSAGE, DatagramListener, DatagramStream, frame


class FakeTransport:
    def __init__(self) -> None:
        self.closed = False
        self.written = b""

    def get_extra_info(self, name):
        return ("127.0.0.1", 1)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        self.written += data


def test_datagrams_come_out_whole_whatever_the_split():
    got = []
    stream = DatagramStream(lambda data, peer: got.append(data))
    stream.connection_made(FakeTransport())
    messages = [b"a", b"", b"y" * 5000, b"last"]
    wire = b"".join(frame(m) for m in messages)
    for i in range(len(wire)):  # one byte at a time
        stream.data_received(wire[i:i + 1])
    assert got == messages


def test_an_oversize_length_closes_the_connection():
    got = []
    stream = DatagramStream(lambda data, peer: got.append(data))
    transport = FakeTransport()
    stream.connection_made(transport)
    stream.data_received((MAX_MESSAGE + 1).to_bytes(4, "big") + b"junk")
    assert transport.closed and got == []


def test_send_frames_the_datagram():
    stream = DatagramStream(lambda data, peer: None)
    transport = FakeTransport()
    stream.connection_made(transport)
    stream.send(b"hint")
    assert transport.written == frame(b"hint") == b"\x00\x00\x00\x04hint"


# -- the LB node's listener: idle peers, slow peers, the byte budget (real sockets) --


async def _listener(**limits) -> tuple[DatagramListener, int, list]:
    got: list = []
    settings = {"idle_timeout": 60.0, "message_timeout": 60.0, "max_buffered_bytes": 1 << 20, **limits}
    listener = DatagramListener(lambda data, peer: got.append(data), **settings)
    await listener.start("127.0.0.1", 0)
    return listener, listener._server.sockets[0].getsockname()[1], got


async def _closed(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except ConnectionResetError:
        return True


def test_a_silent_peer_is_closed_after_the_idle_timeout():
    async def run():
        listener, port, got = await _listener(idle_timeout=1.0)
        silent = await asyncio.open_connection("127.0.0.1", port)
        talker = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(7):
            talker[1].write(frame(b"packet"))
            await asyncio.sleep(0.2)
        assert await _closed(silent[0], 1.0)
        assert listener.idle_timeouts == 1 and len(listener.streams) == 1
        talker[1].write(frame(b"still"))
        await asyncio.sleep(0.05)
        assert got[-1] == b"still"
        listener.close()

    asyncio.run(run())


def test_an_unfinished_message_is_closed_after_the_message_timeout():
    async def run():
        listener, port, got = await _listener(message_timeout=0.5)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        wire = frame(b"x" * 1000)
        for i in range(5):  # a trickle: reads keep coming, the message never ends
            writer.write(wire[i * 10:i * 10 + 10])
            await asyncio.sleep(0.08)
        assert await _closed(reader, 1.5)
        assert listener.message_timeouts == 1 and listener.buffered_bytes == 0 and got == []
        listener.close()

    asyncio.run(run())


def test_unfinished_messages_are_held_to_the_budget():
    async def run():
        listener, port, got = await _listener(max_buffered_bytes=50_000)
        wire = frame(b"y" * 30_000)
        first = await asyncio.open_connection("127.0.0.1", port)
        first[1].write(wire[:-1])
        await asyncio.sleep(0.1)
        assert listener.buffered_bytes == len(wire) - 1
        second = await asyncio.open_connection("127.0.0.1", port)
        second[1].write(wire[:-1])
        assert await _closed(second[0], 1.0)
        assert listener.budget_closes == 1 and listener.buffered_bytes == len(wire) - 1
        first[1].write(wire[-1:])  # the one within the budget still arrives
        await asyncio.sleep(0.1)
        assert got == [b"y" * 30_000] and listener.buffered_bytes == 0
        listener.close()

    asyncio.run(run())
