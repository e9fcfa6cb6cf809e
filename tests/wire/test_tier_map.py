"""The tier map and the forward envelope: round trips, and every way a datagram can be wrong
refused with its reason (nothing in a refused one is trusted)."""

from __future__ import annotations

import struct

import pytest

from spoa.wire.forward import decode_forward, encode_forward, is_forward
from spoa.wire.packet import PacketError
from spoa.wire.tier_map import TierMap, decode_tier_map, encode_tier_map, is_tier_map

KEY = b"k" * 32
MAP = TierMap(lbnode_id=9, view_ms=1_700_000_000_123, slots=1024,
              members=((3, "127.0.0.1", 9500), (9, "::1", 9501), (12, "lbnode3.example", 9502)))


def test_tier_map_round_trip():
    data = encode_tier_map(MAP, KEY)
    assert is_tier_map(data) and not is_forward(data)
    assert decode_tier_map(data, KEY) == MAP
    assert decode_tier_map(data, KEY).live == [3, 9, 12]


def _resigned(body: bytes) -> bytes:
    from spoa.wire._packet_py import datagram_tag

    return body + datagram_tag(KEY, body)


@pytest.mark.parametrize("mangle, reason", [
    (lambda d: d[:40], "truncated"),
    (lambda d: b"XMAP" + d[4:], "bad_magic"),
    (lambda d: d[:4] + b"\x02" + d[5:], "bad_version"),
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "bad_hmac"),
    (lambda d: _resigned(d[:24] + struct.pack(">I", 1000) + d[28:-16]), "malformed"),  # slots not a power of 2
    (lambda d: _resigned(d[:6] + struct.pack(">H", 4) + d[8:-16]), "malformed"),  # more members than bytes
    (lambda d: _resigned(d[:-16] + b"x"), "malformed"),  # bytes after the last member
    (lambda d: _resigned(d[:32 + 10] + b"\xff" + d[32 + 11:-16]), "malformed"),  # host length past the end
])
def test_tier_map_refusals(mangle, reason):
    with pytest.raises(PacketError) as err:
        decode_tier_map(mangle(encode_tier_map(MAP, KEY)), KEY)
    assert err.value.reason == reason


def test_tier_map_refuses_members_without_an_address():
    for member in ((1, "", 9500), (1, "127.0.0.1", 0), (1, "h\xe9te", 1)):
        try:
            data = encode_tier_map(TierMap(1, 1, 64, (member,)), KEY)
        except (UnicodeEncodeError, ValueError):
            continue  # the encoder refuses a non-ASCII host itself
        with pytest.raises(PacketError, match="no address"):
            decode_tier_map(data, KEY)


def test_tier_map_encoder_names_what_does_not_fit():
    with pytest.raises(ValueError, match="longer than 255"):
        encode_tier_map(TierMap(1, 1, 64, ((1, "h" * 256, 1),)), KEY)


@pytest.mark.parametrize("sender", [("127.0.0.1", 40000), ("::1", 40001, 0, 0), None])
def test_forward_round_trip(sender):
    inner = b"CPUB" + bytes(range(200))
    data = encode_forward(inner, sender, KEY)
    assert is_forward(data) and not is_tier_map(data)
    got, address = decode_forward(data, KEY)
    assert got == inner
    assert address == (None if sender is None else sender[:2])


def test_forward_refusals():
    data = encode_forward(b"CPUB", ("127.0.0.1", 1), KEY)
    for mangled, reason in ((data[:20], "truncated"), (b"XFWD" + data[4:], "bad_magic"),
                            (data[:4] + b"\x07" + data[5:], "bad_version"),
                            # the return address changed: where hints go must not be forgeable
                            (data[:10] + b"\x08" + data[11:], "bad_hmac"),
                            (_resigned(data[:5] + b"\x05" + data[6:-16]), "malformed")):
        with pytest.raises(PacketError) as err:
            decode_forward(mangled, KEY)
        assert err.value.reason == reason
