"""Length-prefixed datagrams over TCP: framing survives any split; garbage closes."""

from __future__ import annotations

from spoa.stream_transport import MAX_MESSAGE, DatagramStream, frame


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
