"""The server node's lease module: registration from SPOE, SPOE-counter fallback, ids, kernel samples."""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address, IPv6Address

from spoa.servernode.lease_module import LeaseModule, LeaseSettings, connection_id
from spoa.servernode.sampler import TcpSample
from spoa.servernode.tracker import SegmentTracker
from spoa.spop import frames
from spoa.spop.codec import FrameReader, FrameWriter
from spoa.spop.constants import FrameType, Scope
from spoa.wire.records import ConnFlags, CounterSource, pack_key


def message(**args):
    w = FrameWriter()
    frames.write_notify(w, 1, 1, [("lease-request", list(args.items()))])
    r = FrameReader(65536)
    r.feed(w.take())
    return r.next_frame().messages()[0]


def answer(module, msg):
    w = FrameWriter()
    w.begin_frame(FrameType.ACK, 1, 1)
    module.on_message(msg, w)
    w.end_frame()
    r = FrameReader(65536)
    r.feed(w.take())
    return r.next_frame().actions()


IDENTITY = dict(cid="6f1c7b8e-0d3a-4b5e-9c1d-2a3b4c5d6e7f", src=IPv4Address("192.0.2.10"), src_port=40000,
                dst=IPv4Address("198.51.100.1"), dst_port=443, frontend="fe_https")
KEY = pack_key("198.51.100.1", 443, "192.0.2.10", 40000)  # HAProxy's socket: local = dst, remote = src


def test_registers_and_answers_the_lease_in_force():
    module = LeaseModule(SegmentTracker(), None, None, 1000, 1, LeaseSettings())
    actions = answer(module, message(**IDENTITY))
    assert ("set-var", Scope.SESS, "duration_ms", 30000) in actions
    assert ("set-var", Scope.SESS, "source", "standard") in actions
    rec = module.tracker.snapshot(KEY)
    assert rec.conn_id == uuid.UUID(IDENTITY["cid"]).bytes and rec.frontend == "fe_https"
    assert (rec.src, rec.src_port, rec.dst, rec.dst_port) == ("192.0.2.10", 40000, "198.51.100.1", 443)
    assert module.stats.registrations == 1


def test_ipv6_identity_is_keyed_like_the_kernel_socket():
    module = LeaseModule(SegmentTracker(), None, None, 1000, 1, LeaseSettings())
    answer(module, message(**dict(IDENTITY, src=IPv6Address("2001:db8::10"), dst=IPv6Address("2001:db8::1"))))
    assert module.tracker.snapshot(pack_key("2001:db8::1", 443, "2001:db8::10", 40000)).src == "2001:db8::10"


def test_without_cid_the_id_is_a_hash_of_the_4_tuple():
    module = LeaseModule(SegmentTracker(), None, None, 1000, 1, LeaseSettings())
    no_cid = {k: v for k, v in IDENTITY.items() if k != "cid"}
    answer(module, message(**no_cid))
    answer(module, message(**no_cid))  # the same connection again: the same id
    answer(module, message(**dict(no_cid, src_port=40001)))
    ids = [module.tracker.snapshot(k).conn_id for k in module.tracker.keys()]
    assert len(ids) == 2 and all(len(i) == 16 for i in ids) and module.stats.registrations == 3
    assert module.tracker.snapshot(KEY).conn_id == ids[0]


def test_spoe_counters_are_the_fallback_and_say_so():
    module = LeaseModule(SegmentTracker(), None, None, 1000, 1, LeaseSettings())  # no kernel sampler
    answer(module, message(**IDENTITY, bytes_in=1200, bytes_out=50000))
    rec = module.tracker.snapshot(KEY)
    assert (rec.bytes_in_total, rec.bytes_out_total) == (1200, 50000)
    assert rec.counter_source == CounterSource.SPOE


def test_message_without_identity_is_counted_and_still_answered():
    module = LeaseModule(SegmentTracker(), None, None, 1000, 1, LeaseSettings())
    actions = answer(module, message(cid="x", src="not-an-address-type", src_port="nope"))
    assert ("set-var", Scope.SESS, "duration_ms", 30000) in actions
    answer(module, message(**dict(IDENTITY, src="192.0.2.300")))  # text, but not an address
    answer(module, message(**dict(IDENTITY, dst_port=70000)))  # not a port
    answer(module, message(**{k: v for k, v in IDENTITY.items() if k != "dst"}))
    assert module.stats.registrations_bad == 4 and len(module.tracker) == 0


def test_port_zero_is_refused_and_later_ports_still_register():
    """A message with dst_port 0 once broke every later new port (the sampler refused the set)."""
    from spoa.servernode.sampler import KernelSampler

    with KernelSampler(()) as sampler:
        module = LeaseModule(SegmentTracker(), sampler, None, 1000, 1, LeaseSettings())
        answer(module, message(**dict(IDENTITY, dst_port=0)))
        assert module.stats.registrations_bad == 1
        actions = answer(module, message(**dict(IDENTITY, dst_port=8443)))
        assert ("set-var", Scope.SESS, "source", "standard") in actions
        module.tick()
        assert sampler.ports == frozenset([8443]) and module.stats.sample_errors == 0


def test_the_port_filter_is_rebuilt_once_per_interval():
    sampler = FakeSampler()
    builds = []
    sampler.set_ports = lambda ports: builds.append(len(ports))
    module = LeaseModule(SegmentTracker(), sampler, None, 1000, 1, LeaseSettings())
    for port in range(1000, 7000):  # past the ~5,400 ports that overflowed the filter
        answer(module, message(**dict(IDENTITY, dst_port=port)))
    assert builds == []
    module.tick()
    module.tick()
    assert builds == [6000]


class FakeSampler:
    """KernelSampler's interface, with the dict a test wants."""

    def __init__(self) -> None:
        self.snapshot: dict = {}
        self.ports = None

    def set_ports(self, ports) -> None:
        self.ports = set(ports)

    def sample(self) -> dict:
        return self.snapshot


def tcp_sample(key: bytes, received: int, acked: int, state: int = 1) -> TcpSample:
    return TcpSample(key, state, received, acked, 5, 6, 3, 4, 0, 0, 100)


def test_kernel_sample_is_joined_on_the_packed_key():
    sampler = FakeSampler()
    module = LeaseModule(SegmentTracker(), sampler, None, 1000, 1, LeaseSettings())
    answer(module, message(**IDENTITY))
    other = pack_key("198.51.100.1", 443, "192.0.2.11", 40000)  # a socket HAProxy did not register
    sampler.snapshot = {KEY: tcp_sample(KEY, 1200, 50000, state=8), other: tcp_sample(other, 1, 1)}
    module.tick()
    assert sampler.ports == {443}
    rec = module.tracker.snapshot(KEY)
    assert (rec.bytes_in_total, rec.bytes_out_total) == (1200, 50000)
    assert rec.counter_source == CounterSource.KERNEL and rec.flags & ConnFlags.CLOSING
    assert module.stats.sources["kernel"] == 1 and len(module.tracker) == 1
    sampler.snapshot = {other: tcp_sample(other, 1, 1)}  # our socket left the dump: closed
    module.tick()
    assert module.stats.connections_closed == 1 and len(module.tracker) == 0


def test_connection_id_from_uuid_or_hash():
    text = "6f1c7b8e-0d3a-4b5e-9c1d-2a3b4c5d6e7f"
    assert connection_id(text) == uuid.UUID(text).bytes
    assert connection_id(text.encode()) == uuid.UUID(text).bytes
    other = connection_id("not-a-uuid-but-36-characters-long!!")
    assert len(other) == 16 and other != connection_id("something else")


def _hint(anomaly: bool, lease_ms: int = 8000):
    from spoa.wire.hints import Hint
    from spoa.wire.records import LeaseSource

    return Hint(connection_id(IDENTITY["cid"]), lease_ms, int(LeaseSource.PREDICTED), 1, anomaly)


def _vars(actions) -> dict:
    return {(scope, name): value for _, scope, name, value in actions}



def test_anomaly_flag_of_the_last_hint_reaches_haproxy():
    from spoa.wire.records import PacketHeader

    header = PacketHeader(node_id=3, sequence=1, timestamp_ms=0, interval_ms=0)
    module = LeaseModule(SegmentTracker(), None, None, 1000, 1, LeaseSettings())
    before = _vars(answer(module, message(**IDENTITY)))
    assert (Scope.SESS, "anomaly") not in before  # no hint yet: nothing to say (like granularity)

    module.on_hints(header, [_hint(anomaly=True)])
    flagged = _vars(answer(module, message(**IDENTITY)))
    assert flagged[(Scope.SESS, "anomaly")] == 1 and flagged[(Scope.SESS, "source")] == "predicted"

    module.on_hints(header, [_hint(anomaly=False)])  # the LB node cleared it: HAProxy's sess var must be too
    assert _vars(answer(module, message(**IDENTITY)))[(Scope.SESS, "anomaly")] == 0

    # the flag is about the traffic: a hint whose lease is refused still carries it
    module.on_hints(header, [_hint(anomaly=True, lease_ms=10)])
    refused = _vars(answer(module, message(**IDENTITY)))
    assert refused[(Scope.SESS, "anomaly")] == 1 and refused[(Scope.SESS, "source")] == "fallback"


def test_a_stale_anomaly_flag_is_cleared():
    import time

    from spoa.wire.records import PacketHeader

    module = LeaseModule(SegmentTracker(), None, None, 1000, 1, LeaseSettings(hint_ttl_ms=20))
    answer(module, message(**IDENTITY))
    module.on_hints(PacketHeader(node_id=3, sequence=1, timestamp_ms=0, interval_ms=0), [_hint(anomaly=True)])
    assert _vars(answer(module, message(**IDENTITY)))[(Scope.SESS, "anomaly")] == 1
    time.sleep(0.05)  # the LB node went quiet: its old judgement must not hold the connection flagged
    stale = _vars(answer(module, message(**IDENTITY)))
    assert stale[(Scope.SESS, "anomaly")] == 0 and stale[(Scope.SESS, "source")] == "fallback"


def test_answers_are_the_set_vars_in_order_and_follow_a_reload():
    # The encoded answers are cached (LeaseModule._answer_bytes): what
    # HAProxy reads must be exactly the actions, in order, of the settings in force.
    from spoa.wire.records import PacketHeader

    module = LeaseModule(SegmentTracker(), None, None, 1000, 1, LeaseSettings())
    first, second = answer(module, message(**IDENTITY)), answer(module, message(**IDENTITY))
    assert first[:3] == second[:3] == [("set-var", Scope.SESS, "duration_ms", 30000),
                                       ("set-var", Scope.SESS, "source", "standard"),
                                       ("set-var", Scope.SESS, "class", "short")]
    assert [a[2] for a in first] == ["duration_ms", "source", "class", "seq"]
    assert second[3][3] == first[3][3] + 1  # seq is fresh per answer
    module.lease = LeaseSettings(standard_ms=90_000)  # what a SIGHUP does (spoa.cli.on_reload)
    assert _vars(answer(module, message(**IDENTITY)))[(Scope.SESS, "class")] == "medium"
    module.on_hints(PacketHeader(node_id=3, sequence=1, timestamp_ms=0, interval_ms=0), [_hint(anomaly=True)])
    hinted = answer(module, message(**IDENTITY))
    assert [a[2] for a in hinted] == ["duration_ms", "source", "class", "granularity", "anomaly", "seq"]
    assert hinted[:5] == answer(module, message(**IDENTITY))[:5]
    assert module.stats.leases == {"standard": 3, "predicted": 2, "fallback": 0}
