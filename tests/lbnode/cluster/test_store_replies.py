"""A state write's integer replies read in bulk off the connection (store.read_integers)."""

from __future__ import annotations

import asyncio

import pytest

from spoa.lbnode.cluster.store import ReplyError, read_integers, resp


def replies(*chunks: bytes, count: int) -> list[int]:
    async def read() -> list[int]:
        reader = asyncio.StreamReader()
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        return await read_integers(reader, count)

    return asyncio.run(read())


def test_replies_split_anywhere_across_reads_come_back_in_order():
    assert replies(b":1\r\n:0\r", b"\n:1", b"2\r\n", count=3) == [1, 0, 12]


def test_an_error_reply_fails_the_read():
    with pytest.raises(ReplyError, match="NOSCRIPT"):
        replies(b":1\r\n-NOSCRIPT No matching script\r\n", count=2)


def test_more_than_asked_means_out_of_step():
    with pytest.raises(ReplyError, match="out of step"):
        replies(b":1\r\n:1\r\n", count=1)


def test_a_closed_connection_before_every_reply_fails_the_read():
    with pytest.raises(ConnectionError):
        replies(b":1\r\n", count=2)


def test_resp_frames_bytes_like_arguments_as_given():
    record = memoryview(b"\x00\x01\x02")
    parts = resp([b"EVALSHA", b"1", record])
    assert b"".join(parts) == b"*3\r\n$7\r\nEVALSHA\r\n$1\r\n1\r\n$3\r\n\x00\x01\x02\r\n"
    assert any(part is record for part in parts)  # the records are not copied
