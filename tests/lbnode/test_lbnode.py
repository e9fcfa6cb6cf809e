"""LB node: lease table bookkeeping and the hint codec (no network)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest

from spoa.lbnode.forecast import SES
from spoa.lbnode.lease_policy import LeaseBounds, VolumePolicy
from spoa.lbnode.metrics import LbNodeCollector
from spoa.lbnode.node import LeaseTable
from spoa.lbnode.segment_history import SegmentHistory
from spoa.wire.hints import Hint, decode_hints, encode_hints, max_hints
from spoa.wire.packet import PacketError
from spoa.wire.records import ConnectionRecord, ConnFlags, LeaseSource, SegmentRecord

KEY = b"k" * 32
BOUNDS = LeaseBounds(min_ms=1000, max_ms=60_000, standard_ms=30_000)


def record(conn_id: bytes, total: int, flags: int = 0, frontend: str = "fe") -> ConnectionRecord:
    return ConnectionRecord(conn_id=conn_id, src="192.0.2.1", src_port=1, dst="192.0.2.2", dst_port=2,
                            frontend=frontend, flags=flags, counter_source=0, granularity_level=0,
                            requested_lease_ms=0, predicted_lease_ms=0, lease_source=0, bytes_in_total=0,
                            bytes_out_total=total)


def table(capacity: int = 8) -> LeaseTable:
    return LeaseTable(capacity, SES(capacity, alpha=0.5), VolumePolicy(BOUNDS, 10.0), BOUNDS.standard_ms, 1000)


def test_refresh_then_predicted_lease_and_hint():
    t = table()
    t.ingest(1, [record(b"a" * 16, 100_000)], now=1000)
    hints = t.end_interval(1000)
    (hint,) = hints[1]  # one HINT_DTYPE entry, as it goes on the wire
    assert hint["conn_id"] == b"a" * 16 and hint["source"] == LeaseSource.PREDICTED
    assert BOUNDS.min_ms <= hint["lease_ms"] <= BOUNDS.max_ms
    assert t.stats.new_connections == 1 and len(t) == 1


def test_lapsed_lease_then_refresh_is_a_premature_expiry():
    t = table()
    t.ingest(1, [record(b"a" * 16, 10)], now=0)
    t.end_interval(0)
    lease = int(t.lease[t.slot(1, b"a" * 16)])
    t.end_interval(lease + 1)  # nothing refreshed it in time
    assert t.stats.expired == 1 and len(t) == 0
    t.ingest(1, [record(b"a" * 16, 20)], now=lease + 500)  # ... but it was alive
    assert t.stats.premature_expiries == 1
    # resumed where it was: 10 new bytes, not its whole cumulative 20
    assert t.volume[t.slot(1, b"a" * 16)] == 10


def test_closed_record_releases_without_counting_expiry():
    t = table()
    t.ingest(1, [record(b"a" * 16, 10)], now=0)
    t.ingest(1, [record(b"a" * 16, 20, flags=ConnFlags.CLOSED)], now=500)
    assert len(t) == 0 and t.stats.closed == 1
    t.end_interval(10**9)
    assert t.stats.expired == 0 and t.stats.premature_expiries == 0


def test_new_connection_starts_from_its_class_prior():
    t = table()
    t.ingest(1, [record(b"a" * 16, 500_000, frontend="video")], now=0)
    t.end_interval(0)
    granted = int(t.lease[t.slot(1, b"a" * 16)])
    t.ingest(1, [record(b"b" * 16, 0, frontend="video"), record(b"c" * 16, 0, frontend="chat")], now=100)
    assert int(t.lease[t.slot(1, b"b" * 16)]) == granted  # same class: its prior
    assert int(t.lease[t.slot(1, b"c" * 16)]) == BOUNDS.standard_ms  # cold class: standard


def test_full_table_refuses_and_counts():
    t = table(capacity=1)
    t.ingest(1, [record(b"a" * 16, 1), record(b"b" * 16, 1)], now=0)
    assert len(t) == 1 and t.stats.refused == 1


def test_volume_is_taken_from_cumulative_totals_across_skipped_intervals():
    t = table()
    t.ingest(1, [record(b"a" * 16, 1000)], now=0)
    t.end_interval(0)
    t.ingest(1, [record(b"a" * 16, 4000)], now=3000)  # three intervals later
    slot = t.slot(1, b"a" * 16)
    assert t.volume[slot] == 3000 and t.elapsed[slot] == 3


def test_hint_arrays_encode_like_hint_objects():
    t = table()
    t.ingest(1, [record(b"a" * 16, 100_000), record(b"b" * 16, 0)], now=1000)
    entries = t.end_interval(1000)[1]
    decoded = decode_hints(encode_hints(1, 1, 1, entries, KEY)[0], KEY)[1]
    assert [(h.conn_id, h.lease_ms, h.source) for h in decoded] == \
        [(e["conn_id"], int(e["lease_ms"]), int(e["source"])) for e in entries]
    assert encode_hints(1, 1, 1, decoded, KEY) == encode_hints(1, 1, 1, entries, KEY)


def test_hints_round_trip_and_split_by_mtu():
    hints = [Hint(bytes([i]) * 16, 1000 + i, LeaseSource.PREDICTED, i % 5 - 2, i % 2 == 0) for i in range(120)]
    datagrams = encode_hints(7, 42, 123456, hints, KEY, mtu=1400)
    assert len(datagrams) == -(-120 // max_hints(1400)) and all(len(d) <= 1400 for d in datagrams)
    decoded = []
    for i, d in enumerate(datagrams):
        header, part = decode_hints(d, KEY)
        assert (header.node_id, header.sequence, header.timestamp_ms) == (7, 42 + i, 123456)
        decoded += part
    assert decoded == hints


@pytest.mark.parametrize("mutate, reason", [
    (lambda d: d[:20], "truncated"),
    (lambda d: b"XXXX" + d[4:], "bad_magic"),
    (lambda d: d[:4] + b"\x09" + d[5:], "bad_version"),
    (lambda d: d[:40] + bytes([d[40] ^ 1]) + d[41:], "bad_hmac"),
])
def test_bad_hint_datagrams_are_refused_with_a_reason(mutate, reason):
    (datagram,) = encode_hints(1, 1, 1, [Hint(b"a" * 16, 5000, LeaseSource.PREDICTED, 0)], KEY)
    with pytest.raises(PacketError) as err:
        decode_hints(mutate(datagram), KEY)
    assert err.value.reason == reason


def test_hint_from_the_wrong_key_is_refused():
    (datagram,) = encode_hints(1, 1, 1, [], b"x" * 32)
    with pytest.raises(PacketError) as err:
        decode_hints(datagram, KEY)
    assert err.value.reason == "bad_hmac"



def test_metrics_export_segment_history_state_and_counts():
    # room for 3 segments: the second connection's second segment is refused, and counted
    t = LeaseTable(8, SES(8, alpha=0.5), VolumePolicy(BOUNDS, 10.0), BOUNDS.standard_ms, 1000,
                   segments=SegmentHistory(3, 8))
    segs = (SegmentRecord(0, 0, 10, 10, 1, 1000, 0), SegmentRecord(1, 0, 20, 20, 1, 1000, 0))
    t.ingest(1, [replace(record(b"a" * 16, 30), segments=segs), replace(record(b"b" * 16, 30), segments=segs)],
             now=1000)
    receiver = SimpleNamespace(accepted=1, rejected={"bad_hmac": 2})
    samples = {s.name: s.value for family in LbNodeCollector(SimpleNamespace(table=t), receiver).collect()
               for s in family.samples}
    assert samples["spoa_lbnode_segments"] == 3
    assert samples["spoa_lbnode_segments_refused_total"] == 1
    assert samples["spoa_lbnode_segments_dropped_total"] == 0
    assert samples["spoa_lbnode_connections"] == 2


def test_idle_lb_node_at_the_default_limits_is_small(tmp_path):
    """Its tables grow with the connections held: at the default
    max_connections (1 M) an idle LB node was ~430 MB of preallocated arrays."""
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    code = ("import sys; from spoa import config; from spoa.lbnode.service import build_lbnode; "
            "node = build_lbnode(config.load(config.LBNODE_SCHEMA, overrides={'lbnode.key_file': sys.argv[1]})); "
            "print(node.table.capacity, node.table.max_capacity, "
            "next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS:')))")
    out = subprocess.run([sys.executable, "-c", code, str(key)], capture_output=True, text=True, timeout=60,
                         check=True).stdout.split()
    capacity, bound, rss_kib = map(int, out)
    assert (capacity, bound) == (1024, 1_000_000)
    assert rss_kib < 120 * 1024, f"idle LB node RSS {rss_kib / 1024:.0f} MiB"


def test_a_changed_tier_map_is_sent_in_each_of_the_next_intervals_then_periodically():
    """One lost map after a change must not leave a server node routing to a dead LB node until
    the next periodic one: a changed view goes out MAP_AFTER_CHANGE intervals running."""
    from spoa.lbnode.node import MAP_AFTER_CHANGE, MAP_EVERY_INTERVALS, LbNode
    from spoa.wire.tier_map import TierMap, decode_tier_map

    sent = []
    node = LbNode(LeaseTable(64, SES(64), VolumePolicy(LeaseBounds(1000, 60000, 30000), 1.0), 30000, 1000), b"k" * 32, 9, 1000)
    node.transport = SimpleNamespace(sendto=lambda data, addr: sent.append(data))
    node.addresses = {7: ("127.0.0.1", 40000)}
    view = {"members": ((1, "127.0.0.1", 9001), (9, "127.0.0.1", 9009))}
    tier = SimpleNamespace(tier_map=lambda lbnode_id: TierMap(lbnode_id, 1, 64, view["members"]))
    pattern = []
    for interval in range(12):
        if interval == 6:
            view["members"] = ((9, "127.0.0.1", 9009),)  # node 1 died
        before = len(sent)
        node._announce(tier)
        pattern.append(len(sent) - before)
    # the first view 3 times, the periodic one in the 4th interval, the change 3 times, the 12th
    assert (MAP_AFTER_CHANGE, MAP_EVERY_INTERVALS) == (3, 4)
    assert pattern == [1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 1]
    assert decode_tier_map(sent[-1], b"k" * 32).live == [9]
    assert node.maps_sent == len(sent)
