"""The server node's LB module: registration from SPOE, SPOE-counter fallback, ids."""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address

from spoa import frames
from spoa.codec import FrameReader, FrameWriter
from spoa.constants import FrameType, Scope
from spoa.lb_module import LbModule, LeaseSettings, connection_id
from spoa.records import CounterSource
from spoa.tracker import SegmentTracker


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


def test_registers_and_answers_the_lease_in_force():
    module = LbModule(SegmentTracker(), None, None, 1000, 1, LeaseSettings())
    actions = answer(module, message(**IDENTITY))
    assert ("set-var", Scope.SESS, "duration_ms", 30000) in actions
    assert ("set-var", Scope.SESS, "source", "standard") in actions
    rec = module.tracker.snapshot(("198.51.100.1", 443, "192.0.2.10", 40000))
    assert rec.conn_id == uuid.UUID(IDENTITY["cid"]).bytes and rec.frontend == "fe_https"
    assert module.stats.registrations == 1


def test_spoe_counters_are_the_fallback_and_say_so():
    module = LbModule(SegmentTracker(), None, None, 1000, 1, LeaseSettings())  # no kernel sampler
    answer(module, message(**IDENTITY, bytes_in=1200, bytes_out=50000))
    rec = module.tracker.snapshot(("198.51.100.1", 443, "192.0.2.10", 40000))
    assert (rec.bytes_in_total, rec.bytes_out_total) == (1200, 50000)
    assert rec.counter_source == CounterSource.SPOE


def test_message_without_identity_is_counted_and_still_answered():
    module = LbModule(SegmentTracker(), None, None, 1000, 1, LeaseSettings())
    actions = answer(module, message(cid="x", src="not-an-address-type", src_port="nope"))
    assert module.stats.registrations_bad == 1 and len(module.tracker) == 0
    assert ("set-var", Scope.SESS, "duration_ms", 30000) in actions


def test_connection_id_from_uuid_or_hash():
    text = "6f1c7b8e-0d3a-4b5e-9c1d-2a3b4c5d6e7f"
    assert connection_id(text) == uuid.UUID(text).bytes
    assert connection_id(text.encode()) == uuid.UUID(text).bytes
    other = connection_id("not-a-uuid-but-36-characters-long!!")
    assert len(other) == 16 and other != connection_id("something else")
