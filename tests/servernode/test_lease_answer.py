"""The lease answer's twins: the compiled one (C path for canonical messages) and the
pure-Python one give the same ACK bytes, tracker state and counters for any message.

Messages are real SPOP bytes, each argument of an explicit SPOP type (the INT32 /
UINT32 ports and string addresses a config could send, not only what
FrameWriter.put_typed infers), with arguments missing, repeated, of the wrong type
or out of range; hints fresh, stale, out of bounds; a full tracker; a reload.
"""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spoa.servernode._lease_answer_py as twin_answer
import spoa.servernode._tracker_py as twin_tracker
from spoa.netutil import now_ms
from spoa.servernode import lease_answer as facade
from spoa.servernode.lease_message import LeaseSettings, connection_id, is_uuid
from spoa.spop.codec import FrameReader, FrameWriter
from spoa.spop.constants import DataType, FrameType
from spoa.wire.records import LeaseSource
from tests.conftest import compiled_disabled, compiled_fixture

compiled_answer = compiled_fixture("lease_answer")
compiled_tracker = compiled_fixture("tracker")

TTL = 5000
SETTINGS = LeaseSettings(hint_ttl_ms=TTL, min_ms=1000, max_ms=600_000)
RELOADED = LeaseSettings(standard_ms=90_000, hint_ttl_ms=TTL, min_ms=2000, max_ms=3_600_000)
CIDS = [str(uuid.UUID(int=i * 0x1234567 + 1)) for i in range(6)]


def test_compiled_lease_answer_loaded(request):
    if compiled_disabled(request.config):
        assert facade.IMPLEMENTATION == "python"
        return
    import spoa.servernode._lease_answer  # noqa: F401 - an ImportError here names the build problem

    assert facade.IMPLEMENTATION == "cython", "spoa.servernode._lease_answer did not load: run `pip install -e .`"


def test_the_compiled_answer_goes_with_the_compiled_tracker(compiled_answer, compiled_tracker):
    assert type(facade.lease_answer(compiled_tracker.SegmentTracker(), SETTINGS)) is compiled_answer.LeaseAnswer
    assert type(facade.lease_answer(twin_tracker.SegmentTracker(), SETTINGS)) is twin_answer.LeaseAnswer


def notify(args: list[tuple[str, int, object]]) -> object:
    """A lease-request Message of (name, SPOP type, value) arguments, decoded from its bytes."""
    w = FrameWriter()
    w.begin_frame(FrameType.NOTIFY, 1, 1)
    w.put_name("lease-request")
    w.put_uint8(len(args))
    for name, dtype, value in args:
        w.put_name(name)
        w.put_typed_as(dtype, value)
    w.end_frame()
    r = FrameReader(1 << 16)
    r.feed(w.take())
    return r.next_frame().messages()[0]


def ack(answer, message) -> bytes:
    w = FrameWriter()
    w.begin_frame(FrameType.ACK, 1, 1)
    answer(message, w)
    w.end_frame()
    return w.take()


def canonical(cid: str, src: str, src_port: int, dst: str, dst_port: int, frontend: str = "fe") -> list:
    return [("cid", DataType.STRING, cid), ("src", DataType.IPV4, IPv4Address(src)),
            ("src_port", DataType.INT32, src_port), ("dst", DataType.IPV4, IPv4Address(dst)),
            ("dst_port", DataType.INT32, dst_port), ("frontend", DataType.STRING, frontend)]


# -- values, each with a type HAProxy could send it as ------------------------------------------
cids = st.one_of(
    st.sampled_from(CIDS),
    st.sampled_from(CIDS).map(str.upper),  # bytes.fromhex reads either case
    st.sampled_from(CIDS).map(lambda c: c[:35] + "g"),  # 36 characters, not hex
    st.sampled_from(CIDS).map(lambda c: c.replace("-", "")[:32] + "abcd"),  # 36 hex digits, no dashes
    st.sampled_from(CIDS).map(lambda c: c[:8] + "-" + c[9:13] + "--" + c[14:35]),  # a dash out of place
    st.text(max_size=40),
).map(lambda c: ("cid", DataType.STRING, c))
other_cids = st.one_of(st.just(("cid", DataType.NULL, None)), st.just(("cid", DataType.INT64, 7)),
                       st.just(("cid", DataType.BINARY, CIDS[0].encode())))
v4 = st.sampled_from(["192.0.2.1", "192.0.2.2", "198.51.100.7", "0.0.0.0"])
v6 = st.sampled_from(["2001:db8::1", "::ffff:192.0.2.1", "::1", "fe80::1"])
addresses = st.one_of(
    v4.map(lambda a: (DataType.IPV4, IPv4Address(a))),
    v6.map(lambda a: (DataType.IPV6, IPv6Address(a))),
    v4.map(lambda a: (DataType.STRING, a)),  # text, as str(src) in a config would send
    st.sampled_from(["192.0.2.300", "", "not an address", "1.2.3"]).map(lambda a: (DataType.STRING, a)),
    st.just((DataType.INT32, 5)),
    st.just((DataType.NULL, None)),
)
ports = st.one_of(
    st.tuples(st.sampled_from([DataType.INT32, DataType.INT64, DataType.UINT32, DataType.UINT64]),
              st.sampled_from([0, 1, 443, 8080, 40000, 65535, 65536, (1 << 31) - 1])),
    st.tuples(st.sampled_from([DataType.INT32, DataType.INT64]), st.sampled_from([-1, -443])),
    st.just((DataType.BOOL, True)),
    st.just((DataType.STRING, "443")),
    st.just((DataType.NULL, None)),
)
frontends = st.one_of(st.sampled_from(["fe", "fe_https", "", "fé"]).map(lambda f: (DataType.STRING, f)),
                      st.just((DataType.NULL, None)), st.just((DataType.INT32, 3)), st.just((DataType.BOOL, False)))


# Six connections, three of them most of the time: messages and hints meet, and a
# tracker of four refuses some.
connections = st.sampled_from([0, 0, 1, 1, 2, 2, 3, 4, 5])


@st.composite
def messages(draw) -> list:
    """Mostly canonical lease-request arguments (a few connections, so that they repeat),
    some with one argument replaced, dropped, repeated or reordered."""
    i = draw(connections)
    args = canonical(CIDS[i], f"192.0.2.{1 + i % 3}", 40000 + i % 4, "198.51.100.7", draw(st.sampled_from([443, 8443])),
                     draw(st.sampled_from(["fe", "fe_tls"])))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        k = draw(st.integers(0, 5))
        name = args[k][0]
        if name == "cid":
            args[k] = draw(st.one_of(cids, other_cids))
        elif name in ("src", "dst"):
            args[k] = (name, *draw(addresses))
        elif name.endswith("port"):
            args[k] = (name, *draw(ports))
        else:
            args[k] = (name, *draw(frontends))
    if draw(st.booleans()):
        args.append(("method", DataType.STRING, "GET"))
    edit = draw(st.sampled_from(["none"] * 5 + ["drop", "repeat", "reverse"]))
    if edit == "drop":
        del args[draw(st.integers(0, len(args) - 1))]
    elif edit == "repeat":  # the first argument of a name wins
        k = draw(st.integers(0, len(args) - 1))
        args.append((args[k][0], DataType.STRING, "again"))
    elif edit == "reverse":
        args.reverse()
    return args


steps = st.lists(st.one_of(
    messages().map(lambda args: ("message", args)),
    messages().map(lambda args: ("message", args)),
    st.tuples(st.just("hint"), connections, st.sampled_from([10, 5000, 20_000, 900_000]),
              st.sampled_from([int(s) for s in LeaseSource]), st.integers(-3, 3), st.booleans(),
              st.sampled_from([-TTL * 3, -TTL // 2, 0, TTL])),  # received: stale, fresh, now, ahead
    st.just(("reload",)),
), min_size=5, max_size=40)


def state(answer, tracker) -> tuple:
    keys = sorted(tracker.keys())
    return (answer.registrations, answer.registrations_bad, answer.leases, sorted(answer.ports), answer.ports_changed,
            dict(tracker.stats), keys, [tracker.snapshot(k) for k in keys], [tracker.hint(k) for k in keys])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_twins_answer_every_message_alike(compiled_answer, compiled_tracker, ops):
    trackers = [compiled_tracker.SegmentTracker(max_connections=4), twin_tracker.SegmentTracker(max_connections=4)]
    answers = [compiled_answer.LeaseAnswer(trackers[0], SETTINGS), twin_answer.LeaseAnswer(trackers[1], SETTINGS)]
    for op in ops:
        if op[0] == "message":
            message = notify(op[1])
            out = [ack(a, message) for a in answers]
            assert out[0] == out[1], op
        elif op[0] == "hint":
            _, i, lease_ms, source, level, anomaly, ago = op
            received = now_ms() + ago
            for t in trackers:
                t.set_hint(connection_id(CIDS[i]), lease_ms, source, level, anomaly, received, lease_ms, source)
        else:
            for a in answers:
                a.settings = RELOADED
        assert state(answers[0], trackers[0]) == state(answers[1], trackers[1]), op


def test_the_c_path_reads_what_identity_reads(compiled_answer, compiled_tracker):
    """Canonical messages of every address family and port type land on the twin's key and record."""
    from spoa.wire.records import pack_key

    cases = [
        (canonical(CIDS[0], "192.0.2.1", 40000, "198.51.100.7", 443), pack_key("198.51.100.7", 443, "192.0.2.1", 40000)),
        ([("cid", DataType.STRING, CIDS[1].upper()), ("src", DataType.IPV6, IPv6Address("2001:db8::10")),
          ("src_port", DataType.UINT32, 0), ("dst", DataType.IPV6, IPv6Address("::ffff:198.51.100.7")),
          ("dst_port", DataType.UINT64, 65535)],
         pack_key("198.51.100.7", 65535, "2001:db8::10", 0)),
    ]
    for args, key in cases:
        for tracker, answer in ((t, a.LeaseAnswer(t, SETTINGS)) for t, a in
                                ((compiled_tracker.SegmentTracker(), compiled_answer),
                                 (twin_tracker.SegmentTracker(), twin_answer))):
            ack(answer, notify(args))
            rec = tracker.snapshot(key)
            assert rec is not None and rec.conn_id == uuid.UUID(args[0][2]).bytes
            assert answer.registrations == 1 and answer.ports == {key[16] << 8 | key[17]}


def test_uuid_form_is_strict():
    assert is_uuid(CIDS[0]) and is_uuid(CIDS[0].upper())
    for text in (CIDS[0].replace("-", "") + "abcd", CIDS[0][:35] + " ", " " + CIDS[0][1:], CIDS[0][:35] + "-"):
        assert not is_uuid(text)
        assert connection_id(text) not in (uuid.UUID(CIDS[0]).bytes,) and len(connection_id(text)) == 16


@pytest.mark.parametrize("impl", ["compiled", "twin"])
def test_spoe_counters_get_the_key_and_the_message(impl, request):
    if impl == "compiled":
        tracker, make = request.getfixturevalue("compiled_tracker").SegmentTracker(), \
            request.getfixturevalue("compiled_answer").LeaseAnswer
    else:
        tracker, make = twin_tracker.SegmentTracker(), twin_answer.LeaseAnswer
    seen = []
    answer = make(tracker, SETTINGS, lambda key, message, now: seen.append((key, message.get("bytes_in"))))
    args = canonical(CIDS[0], "192.0.2.1", 40000, "198.51.100.7", 443)
    ack(answer, notify(args + [("bytes_in", DataType.INT64, 1200)]))
    ack(answer, notify(args[:2]))  # names no connection: no counters
    assert [(k, b) for k, b in seen] == [(sorted(tracker.keys())[0], 1200)]
