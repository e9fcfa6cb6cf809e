"""spoa.servernode.sampler against the real kernel, real sockets on 127.0.0.1 and ::1.

- Byte counters: exactly N bytes each way show up as bytes_received /
  bytes_acked of the server-side socket (the one whose LOCAL port is the
  listening port, as for HAProxy's client-side socket), for IPv4, IPv6 and
  IPv4-mapped IPv6; a client FIN adds 1 to bytes_received.
- The port filter runs in the kernel: the datagrams received hold only the
  filtered sockets (the parser never looks at ports), the unfiltered dump
  holds more; single ports, ranges, several ranges, S_EQ and S_GE/S_LE
  bytecode, and the bytecode checked offline against a port of the kernel's
  inet_diag_bc_audit()/inet_diag_bc_run().
- Closing: CLOSE_WAIT then gone; an active close disappears (orphaned
  FIN_WAIT2 sockets have no tcp_info and are skipped).
- ss(8) gives the same counters for the same sockets.
- Keys: each socket's spoa.wire.records.pack_key, IPv4 and IPv4-mapped IPv6 alike,
  from both parser twins; the compiled pack_key twin gives records.pack_key's
  result or error for any input.
- Multi-datagram dumps, a kernel NLMSG_ERROR (EINVAL) and recovery, EINTR
  storms, an unprivileged user (no CAP_NET_ADMIN) reading root's sockets.
- Parser robustness, both twins: truncated, mutated and random buffers raise
  SamplerError only (never IndexError/struct.error), both twins give the same
  result or the same error; a shorter (older kernel) tcp_info gives 0 for the
  missing fields.

Every wait is bounded (WAIT seconds); hypothesis runs a fixed budget.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spoa
from spoa.servernode import sampler as S
from spoa.servernode.sampler import KernelSampler, SamplerError, TcpSample, TcpState
from spoa.wire import records
from spoa.wire.records import pack_key, unpack_key

pytestmark = pytest.mark.skipif(not KernelSampler.available(), reason="NETLINK_SOCK_DIAG unavailable here")

REPO_ROOT = Path(spoa.__file__).resolve().parent.parent
WAIT = 3.0  # seconds, for anything that needs the kernel to catch up
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

PARSERS = {"python": S._parse_chunk_py}
if S._compiled is not None:
    PARSERS["cython"] = S._compiled.parse_chunk


@pytest.fixture(params=["cython", "python"])
def parser(request):
    if request.param not in PARSERS:
        pytest.skip("spoa.servernode._sampler is not built (or SPOA_NO_EXTENSIONS=1)")
    return PARSERS[request.param]


# --- helpers -----------------------------------------------------------------


class Conn:
    """A listener, one accepted server-side socket and its client."""

    def __init__(self, family: int = socket.AF_INET, host: str = "127.0.0.1", connect_to: str | None = None,
                 port: int = 0, dualstack: bool = False) -> None:  # fmt: skip
        if dualstack:
            self.listener = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
        else:
            self.listener = socket.create_server((host, port), family=family)
        self.port = self.listener.getsockname()[1]
        target = connect_to or host
        cfam = socket.AF_INET6 if ":" in target else socket.AF_INET
        self.client = socket.socket(cfam, socket.SOCK_STREAM)
        self.client.settimeout(WAIT)
        self.client.connect((target, self.port))
        self.listener.settimeout(WAIT)
        self.server, _ = self.listener.accept()
        self.server.settimeout(WAIT)

    @property
    def server_key(self) -> bytes:
        """The server-side socket's key, from its own idea of its addresses (text)."""
        return pack_key(*self.server.getsockname()[:2], *self.server.getpeername()[:2])

    def transfer(self, n_in: int, n_out: int) -> None:
        """Exactly n_in bytes client -> server and n_out server -> client, all read."""
        _pump(self.client, self.server, n_in)
        _pump(self.server, self.client, n_out)

    def close(self) -> None:
        for s in (self.client, self.server, self.listener):
            s.close()


def _pump(src: socket.socket, dst: socket.socket, n: int) -> None:
    if n == 0:
        return
    data = os.urandom(n)
    t = threading.Thread(target=src.sendall, args=(data,))
    t.start()
    got = 0
    while got < n:
        chunk = dst.recv(min(1 << 20, n - got))
        assert chunk, "peer closed early"
        got += len(chunk)
    t.join(WAIT)
    assert not t.is_alive()


def poll(sampler: KernelSampler, pred, timeout: float = WAIT) -> dict:
    """Sample until pred(snapshot) or timeout; returns the last snapshot."""
    deadline = time.monotonic() + timeout
    while True:
        snap = sampler.sample()
        if pred(snap) or time.monotonic() > deadline:
            return snap
        time.sleep(0.01)


@pytest.fixture
def conns():
    made: list[Conn] = []

    def make(*args, **kw) -> Conn:
        c = Conn(*args, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def free_consecutive_ports(count: int) -> list[socket.socket]:
    """`count` listeners on consecutive ports below the ephemeral range."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000)
        socks = []
        try:
            for p in range(base, base + count):
                socks.append(socket.create_server(("127.0.0.1", p)))
            return socks
        except OSError:
            for s in socks:
                s.close()
    pytest.skip("no free consecutive ports")


def connect_to(listener: socket.socket, n: int = 1) -> list[socket.socket]:
    out = []
    for _ in range(n):
        c = socket.create_connection(listener.getsockname()[:2], timeout=WAIT)
        s, _ = listener.accept()
        out += [c, s]
    return out


# --- real kernel: counters ----------------------------------------------------


@pytest.mark.parametrize(
    "family,host,connect,dual",
    [
        (socket.AF_INET, "127.0.0.1", None, False),
        (socket.AF_INET6, "::1", None, False),
        (socket.AF_INET6, "::", "127.0.0.1", True),  # IPv4-mapped on a dual-stack listener
    ],
    ids=["ipv4", "ipv6", "v4mapped"],
)
def test_exact_bytes_each_way(conns, family, host, connect, dual):
    n_in, n_out = 123_457, 654_321
    c = conns(family, host, connect_to=connect, dualstack=dual)
    c.transfer(n_in, n_out)
    with KernelSampler([c.port]) as ks:
        key = c.server_key
        snap = poll(ks, lambda d: key in d and d[key].bytes_acked == n_out)
        assert key in snap, snap
        s = snap[key]
        assert s.bytes_received == n_in
        assert s.bytes_acked == n_out  # the SYN-ACK is not counted on the passive side
        assert s.state == TcpState.ESTABLISHED
        assert s.data_segs_in > 0 and s.data_segs_out > 0
        assert s.segs_in >= s.data_segs_in and s.segs_out >= s.data_segs_out
        assert 0 <= s.last_data_recv_ms < 10_000 and 0 <= s.last_data_sent_ms < 10_000
        assert s.last_data_sent_ms <= s.last_data_recv_ms + 50  # we sent after we received
        assert s.rtt_us > 0
        assert s.inode == os.fstat(c.server.fileno()).st_ino
        assert s.key is next(iter(snap))  # the sample carries its key
        # Only the server-side socket: the client's local port is ephemeral.
        assert list(snap) == [key]
        if dual:  # an AF_INET6 socket with v4-mapped addresses: the IPv4 key
            assert key == pack_key("127.0.0.1", c.port, "127.0.0.1", c.client.getsockname()[1])
        assert ks.available_fields == frozenset(S.FIELD_MIN_INFO_LEN)  # this kernel: full tcp_info
        assert ks.info_len is not None and ks.info_len >= S.FULL_INFO_LEN


def test_counters_grow_between_samples(conns):
    c = conns()
    with KernelSampler([c.port]) as ks:
        c.transfer(1000, 2000)
        first = poll(ks, lambda d: d.get(c.server_key) and d[c.server_key].bytes_acked == 2000)[c.server_key]
        c.transfer(10, 20)
        second = poll(ks, lambda d: d[c.server_key].bytes_acked == 2020)[c.server_key]
    assert (first.bytes_received, second.bytes_received) == (1000, 1010)
    assert second.data_segs_in > first.data_segs_in and second.data_segs_out > first.data_segs_out


# --- real kernel: the port filter --------------------------------------------


def test_filter_runs_in_the_kernel(conns):
    a, b = conns(), conns()
    a.transfer(10, 10)
    b.transfer(10, 10)
    with KernelSampler([a.port]) as filtered, KernelSampler(None) as everything:
        got = filtered.sample()
        assert list(got) == [a.server_key]
        # The parser keeps every socket message it gets: if only `a` came back,
        # the kernel dropped the rest (b's server side, both client sides).
        assert filtered.last_stats["sockets"] + filtered.last_stats["skipped"] == 1
        f_bytes = filtered.last_stats["bytes"]
        all_ = everything.sample()
        assert {a.server_key, b.server_key} <= set(all_)
        client_key = pack_key(*b.client.getsockname(), "127.0.0.1", b.port)
        assert client_key in all_  # a socket the filter removed
        assert everything.last_stats["sockets"] >= 4
        assert everything.last_stats["bytes"] > f_bytes
        # Raw datagrams: the filtered dump's messages are all for a.port.
        raw = b"".join(filtered.dump_raw())
        assert {unpack_key(k)[1] for k in S.parse_dump(raw)} == {a.port}


@pytest.mark.parametrize("use_eq", [True, False], ids=["S_EQ", "S_GE+S_LE"])
def test_filter_port_sets(use_eq):
    ls = free_consecutive_ports(4)  # p, p+1, p+2, p+3
    ports = [s.getsockname()[1] for s in ls]
    held = []
    try:
        for s in ls:
            held += connect_to(s)
        cases = [
            [ports[0]],
            [ports[3]],
            [ports[0], ports[2]],  # two single ports
            [ports[1], ports[2]],  # one range
            [ports[0], ports[1], ports[3]],  # range + single
            [ports[0], ports[1], ports[2], ports[3]],
            [ports[2], 1, 2, 3, 65535],  # unrelated ports around it
        ]
        for want in cases:
            with KernelSampler(want, use_eq=use_eq) as ks:
                got = ks.sample()
                assert sorted(unpack_key(k)[1] for k in got) == sorted(p for p in want if p in ports), want
                assert ks.last_stats["sockets"] == len(got)
    finally:
        for s in held + ls:
            s.close()


def test_empty_port_set_and_bad_ports():
    with KernelSampler([]) as ks:
        assert ks.sample() == {}
        assert ks.last_stats["recv_calls"] == 0
    for bad in ([0], [65536], [-1]):
        with pytest.raises(ValueError):
            KernelSampler(bad)


@FUZZ
@given(ports=st.sets(st.integers(1, 65535), min_size=S.MAX_RANGES + 1, max_size=3 * S.MAX_RANGES),
       use_eq=st.booleans())  # fmt: skip
def test_many_ports_make_a_bounded_superset_filter(ports, use_eq):
    bc = S.build_bytecode(ports, use_eq)
    assert kernel_audit(bc) and len(bc) <= 20 * S.MAX_RANGES
    assert all(kernel_run(bc, p) for p in ports)


def test_every_port_at_once_is_one_small_filter():
    """32k isolated frontend ports (the probe broke past ~5,400) build at once, and match them all."""
    ports = range(1, 65536, 2)
    started = time.perf_counter()
    bc = S.build_bytecode(ports)
    assert time.perf_counter() - started < 1.0 and len(bc) <= 20 * S.MAX_RANGES
    assert all(kernel_run(bc, p) for p in ports[::97])


def test_no_ipv6_handler_means_ipv4_only(conns, monkeypatch):
    c = conns()
    with KernelSampler([c.port]) as ks:
        real = ks._dump

        def dump(family, out, stats):
            if family == socket.AF_INET6:
                raise SamplerError(errno.ENOENT, "sock_diag request failed: No such file or directory")
            return real(family, out, stats)

        monkeypatch.setattr(ks, "_dump", dump)
        assert list(ks.sample()) == [c.server_key]
        assert ks._families == (socket.AF_INET,)
        assert list(ks.sample()) == [c.server_key]


def test_set_ports(conns):
    a, b = conns(), conns()
    with KernelSampler([a.port]) as ks:
        assert set(ks.sample()) == {a.server_key}
        ks.set_ports([b.port])
        assert set(ks.sample()) == {b.server_key}
        ks.set_ports([a.port, b.port])
        assert set(ks.sample()) == {a.server_key, b.server_key}
        assert ks.ports == frozenset([a.port, b.port])


# --- offline bytecode check: a port of the kernel's audit and run ----------------


def kernel_audit(bc: bytes) -> bool:
    """net/ipv4/inet_diag.c inet_diag_bc_audit() for the port ops we emit."""
    length = len(bc)

    def valid_cc(cc: int) -> bool:
        pos, ln = 0, length
        while ln >= 0:
            if cc > ln:
                return False
            if cc == ln:
                return True
            yes = bc[pos + 1]
            if yes < 4 or yes & 3:
                return False
            ln -= yes
            pos += yes
        return False

    pos, ln = 0, length
    while ln > 0:
        code, yes, no = struct.unpack_from("=BBH", bc, pos)
        min_len = 4
        if code in (S.INET_DIAG_BC_S_EQ, S.INET_DIAG_BC_S_GE, S.INET_DIAG_BC_S_LE):
            if ln < 8:
                return False
            min_len = 8
        elif code != S.INET_DIAG_BC_JMP:
            return False
        if no < min_len or no > ln + 4 or no & 3:
            return False
        if no < ln and not valid_cc(ln - no):
            return False
        if yes < min_len or yes > ln + 4 or yes & 3:
            return False
        pos += yes
        ln -= yes
    return ln == 0


def kernel_run(bc: bytes, sport: int) -> bool:
    """inet_diag_bc_run() for a socket with local port `sport`."""
    pos, ln = 0, len(bc)
    while ln > 0:
        code, yes, no = struct.unpack_from("=BBH", bc, pos)
        if code == S.INET_DIAG_BC_JMP:
            ok = False
        else:
            port = struct.unpack_from("=BBH", bc, pos + 4)[2]
            ok = {S.INET_DIAG_BC_S_EQ: sport == port, S.INET_DIAG_BC_S_GE: sport >= port,
                  S.INET_DIAG_BC_S_LE: sport <= port}[code]  # fmt: skip
        step = yes if ok else no
        ln -= step
        pos += step
    return ln == 0


@FUZZ
@given(ports=st.sets(st.integers(1, 65535), min_size=1, max_size=40) | st.sets(st.integers(990, 1010), min_size=1),
       use_eq=st.booleans())  # fmt: skip
def test_bytecode_matches_kernel_semantics(ports, use_eq):
    bc = S.build_bytecode(ports, use_eq)
    assert kernel_audit(bc)
    probe = set(ports) | {p + d for p in ports for d in (-1, 1)} | {1, 65535}
    for p in probe:
        if 0 < p < 65536:
            assert kernel_run(bc, p) == (p in ports), p


# --- real kernel: closing --------------------------------------------------------


def test_close_passive_then_gone(conns):
    c = conns()
    c.transfer(500, 700)
    with KernelSampler([c.port]) as ks:
        key = c.server_key
        c.client.close()  # FIN from the client: our socket goes CLOSE_WAIT
        snap = poll(ks, lambda d: key in d and d[key].state == TcpState.CLOSE_WAIT)
        assert snap[key].state == TcpState.CLOSE_WAIT
        assert snap[key].bytes_received == 501  # the FIN counts as one byte
        c.server.close()  # LAST_ACK, then gone (the client is closed: RST or ACK)
        snap = poll(ks, lambda d: key not in d)
        assert key not in snap


def test_close_active_disappears(conns):
    c = conns()
    c.transfer(5, 5)
    with KernelSampler([c.port]) as ks:
        key = c.server_key
        assert key in ks.sample()
        c.server.close()  # we close first: FIN_WAIT1 -> FIN_WAIT2 (orphan, no tcp_info) -> TIME_WAIT
        snap = poll(ks, lambda d: key not in d)
        assert key not in snap


# --- real kernel: ss oracle ----------------------------------------------------


@pytest.mark.skipif(shutil.which("ss") is None, reason="iproute2 ss not installed")
def test_same_counters_as_ss(conns):
    a = conns()
    b = conns(socket.AF_INET6, "::1", port=0)
    extra = [conns(port=0) for _ in range(2)]
    a.transfer(1111, 2222)
    b.transfer(3333, 4444)
    for i, e in enumerate(extra):
        e.transfer(10 * i, 0)
    ports = [a.port, b.port] + [e.port for e in extra]
    with KernelSampler(ports) as ks:
        mine = poll(ks, lambda d: d.get(a.server_key) and d[a.server_key].bytes_acked == 2222
                    and d.get(b.server_key) and d[b.server_key].bytes_acked == 4444)  # fmt: skip
        theirs = S.ss_sample(ports)
    assert set(mine) == set(theirs)
    for k, m in mine.items():
        o = theirs[k]
        for f in ("state", "bytes_received", "bytes_acked", "segs_in", "segs_out", "data_segs_in",
                  "data_segs_out", "inode"):  # fmt: skip
            assert getattr(m, f) == getattr(o, f), (k, f)
        assert abs(m.rtt_us - o.rtt_us) <= 1 or abs(m.rtt_us - o.rtt_us) <= m.rtt_us // 1000  # ss rounds
    assert unpack_key(b.server_key)[0] == "::1"


def test_parse_ss_text():
    text = (
        "ESTAB 0 0 [::ffff:127.0.0.1]:8080 [::ffff:127.0.0.1]:40000 ino:42 sk:1 <->\n"
        "\t bbr wscale:7,7 rto:204 rtt:1.5/0.7 bytes_acked:10 bytes_received:20 segs_out:3 segs_in:4 "
        "data_segs_out:1 data_segs_in:2 lastsnd:5 lastrcv:6 lastack:7\n"
        "FIN-WAIT-2 0 0 [fe80::1%lo]:8080 [fe80::2%lo]:1\n\t \n"
        "CLOSE-WAIT 1 0 10.0.0.1:8080 10.0.0.2:2\n\t cubic rtt:0.01/0.005\n"
    )
    got = S.parse_ss(text)
    mapped = pack_key("127.0.0.1", 8080, "127.0.0.1", 40000)  # ss prints the v4-mapped form
    assert set(got) == {mapped, pack_key("10.0.0.1", 8080, "10.0.0.2", 2)}
    s = got[mapped]
    assert s.key == mapped
    assert (s.bytes_acked, s.bytes_received, s.segs_out, s.segs_in, s.data_segs_out, s.data_segs_in) == (10, 20, 3, 4, 1, 2)
    assert (s.last_data_sent_ms, s.last_data_recv_ms, s.last_ack_recv_ms, s.rtt_us, s.inode) == (5, 6, 7, 1500, 42)
    assert got[pack_key("10.0.0.1", 8080, "10.0.0.2", 2)].state == TcpState.CLOSE_WAIT


# --- real kernel: dumps, errors, signals, privilege -------------------------------


def test_multi_datagram_dump():
    lst = socket.create_server(("127.0.0.1", 0), backlog=1024)
    port = lst.getsockname()[1]
    held = connect_to(lst, 600)  # ~400 bytes each: several 32 KiB datagrams
    try:
        with KernelSampler([port]) as ks:
            got = ks.sample()
            assert len(got) == 600
            assert ks.last_stats["recv_calls"] >= 4
            chunks = ks.dump_raw()
            assert len(chunks) >= 4
            # The recorded dump parses the same with both twins.
            recorded = b"".join(chunks)
            results = [S.parse_dump(recorded, p) for p in PARSERS.values()]
            assert all(r == results[0] for r in results) and len(results[0]) == 600
            servers = {os.fstat(s.fileno()).st_ino for s in held[1::2]}
            assert {v.inode for v in got.values()} == servers
    finally:
        for s in held:
            s.close()
        lst.close()


def test_kernel_error_is_sampler_error_and_recovers(conns):
    c = conns()
    with KernelSampler([c.port], use_eq=False) as ks:  # use_eq=False: no S_EQ -> S_GE/S_LE retry
        good = ks._bytecode
        ks._bytecode = struct.pack("=BBH", 200, 4, 4)  # unknown op: inet_diag_bc_audit() says EINVAL
        with pytest.raises(SamplerError) as ei:
            ks.sample()
        assert ei.value.errno == errno.EINVAL
        assert "sock_diag" in str(ei.value)
        ks._bytecode = good
        assert c.server_key in ks.sample()


def test_s_eq_rejected_falls_back_to_ranges(conns):
    """An EINVAL for the S_EQ bytecode (a kernel before 4.16) makes sample() retry with S_GE/S_LE."""
    c = conns()
    with KernelSampler([c.port], use_eq=True) as ks:
        assert ks.bytecode is not None and ks.bytecode[0] == S.INET_DIAG_BC_S_EQ
        ks._bytecode = struct.pack("=BBH", 200, 4, 4)  # what an old kernel would refuse
        assert list(ks.sample()) == [c.server_key]
        assert ks.bytecode[0] == S.INET_DIAG_BC_S_GE
        assert list(ks.sample()) == [c.server_key]


def test_eintr_storm_does_not_break_a_dump():
    lst = socket.create_server(("127.0.0.1", 0), backlog=1024)
    port = lst.getsockname()[1]
    held = connect_to(lst, 300)
    hits = []
    old = signal.signal(signal.SIGALRM, lambda *a: hits.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
        with KernelSampler([port]) as ks:
            for _ in range(30):
                assert len(ks.sample()) == 300
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
        for s in held:
            s.close()
        lst.close()
    assert hits  # the signals did arrive during the dumps


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to nobody")
def test_unprivileged_user_reads_other_users_tcp_info(conns):
    """No CAP_NET_ADMIN, another uid: still every socket's tcp_info (documented in docs/sampler.md)."""
    c = conns()
    c.transfer(777, 555)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            caps = re.search(r"CapEff:\s*(\w+)", Path("/proc/self/status").read_text()).group(1)
            with KernelSampler([c.port]) as ks:
                got = {k.hex(): [v.bytes_received, v.bytes_acked, v.inode] for k, v in ks.sample().items()}
            os.write(w, json.dumps({"uid": os.getuid(), "caps": caps, "got": got}).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    res = json.loads(data)
    assert res["uid"] == 65534 and int(res["caps"], 16) == 0
    assert res["got"] == {c.server_key.hex(): [777, 555, os.fstat(c.server.fileno()).st_ino]}


def test_closed_sampler_and_context_manager(conns):
    c = conns()
    ks = KernelSampler([c.port])
    with ks:
        assert ks.sample()
    with pytest.raises(SamplerError):
        ks.sample()
    ks.close()  # idempotent


def test_sample_object():
    s = TcpSample(pack_key("1.2.3.4", 1, "5.6.7.8", 2), 1, 3, 4, 5, 6, 7, 8, 9, 10, 11)
    assert (s.last_ack_recv_ms, s.inode) == (0, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.bytes_acked = 1  # type: ignore[misc]
    assert not hasattr(s, "__dict__")
    assert hash(s) == hash(dataclasses.replace(s))
    assert issubclass(SamplerError, OSError)


def test_compiled_sampler_loaded():
    """Once setup.py lists _sampler in MODULES, a missing build is a failure, not a silent fallback."""
    listed = re.search(r"MODULES\s*=\s*\{[^}]*[\"']_sampler[\"']", (REPO_ROOT / "setup.py").read_text())
    if os.environ.get("SPOA_NO_EXTENSIONS", "") not in ("", "0"):
        assert S.IMPLEMENTATION == "python"
        return
    if not listed and S._compiled is None:
        pytest.skip("spoa.servernode._sampler not built and not in setup.py MODULES yet")
    assert S.IMPLEMENTATION == "cython"
    assert S.DIRECT_SLOTS
    assert S.pack_key is S._compiled.pack_key


# --- parser: recorded, crafted, mutated and random buffers ----------------------


@pytest.fixture(scope="module")
def recorded() -> bytes:
    """A real dump (both families) of 3 server-side sockets: v4, v6, v4-mapped."""
    made = [Conn(), Conn(socket.AF_INET6, "::1"), Conn(connect_to="127.0.0.1", dualstack=True)]
    try:
        for i, c in enumerate(made):
            c.transfer(100 + i, 200 + i)
        with KernelSampler([c.port for c in made]) as ks:
            poll(ks, lambda d: len(d) == 3)
            data = b"".join(ks.dump_raw())
        assert len(S.parse_dump(data)) == 3
        return data
    finally:
        for c in made:
            c.close()


def messages(buf: bytes) -> list[bytes]:
    out, off = [], 0
    while off < len(buf):
        mlen = struct.unpack_from("=I", buf, off)[0]
        out.append(buf[off : off + ((mlen + 3) & ~3)])
        off += (mlen + 3) & ~3
    return out


def nlmsg(mtype: int, payload: bytes, seq: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), mtype, S.NLM_F_MULTI, seq, 0) + payload


DONE = nlmsg(S.NLMSG_DONE, struct.pack("=i", 0))


def outcome(p, data: bytes):
    """What a parser does with `data`: ('ok', result) or ('err', errno, message)."""
    try:
        out: dict = {}
        r = p(data, out, -1)
        return ("ok", r, sorted(out.items()))
    except SamplerError as e:
        return ("err", e.errno, e.strerror)


def test_twins_agree_on_recorded(recorded):
    results = [S.parse_dump(recorded, p) for p in PARSERS.values()]
    assert all(r == results[0] for r in results)
    locals_ = sorted(unpack_key(k)[0] for k in results[0])
    assert locals_ == ["127.0.0.1", "127.0.0.1", "::1"]  # v4, v4-mapped, v6


def test_truncated_everywhere(parser, recorded):
    # The recorded buffer is two dumps (AF_INET, AF_INET6): a cut right after
    # the first NLMSG_DONE is a complete dump; any other cut is an error.
    done_ends, off = set(), 0
    for m in messages(recorded):
        off += len(m)
        if struct.unpack_from("=H", m, 4)[0] == S.NLMSG_DONE:
            done_ends.add(off)
    assert len(done_ends) == 2
    for cut in range(len(recorded)):
        if cut in done_ends:
            assert S.parse_dump(recorded[:cut], parser)
            continue
        with pytest.raises(SamplerError):
            S.parse_dump(recorded[:cut], parser)


def test_message_cut_short_inside_a_chunk(parser, recorded):
    first = messages(recorded)[0]
    for cut in range(1, len(first)):
        # A message whose length says more than the chunk holds, then garbage lengths.
        with pytest.raises(SamplerError):
            parser(first[:cut], {}, -1)


@pytest.mark.parametrize(
    "data,code,text",
    [
        (nlmsg(S.NLMSG_ERROR, struct.pack("=i", -errno.EPERM) + bytes(16)), errno.EPERM, "request failed"),
        (nlmsg(S.NLMSG_DONE, struct.pack("=i", -errno.EINTR)), errno.EINTR, "dump failed"),
        (nlmsg(S.NLMSG_ERROR, b"\0\0"), errno.EBADMSG, S.E_TRUNC_ERROR),
        (nlmsg(S.NLMSG_OVERRUN, b""), errno.ENOBUFS, S.E_OVERRUN),
        (nlmsg(99, b""), errno.EBADMSG, S.E_BAD_TYPE),
        (nlmsg(S.SOCK_DIAG_BY_FAMILY, bytes(71)), errno.EBADMSG, S.E_TRUNC_DIAG),
        (nlmsg(S.SOCK_DIAG_BY_FAMILY, bytes([7]) + bytes(71)), errno.EBADMSG, S.E_BAD_FAMILY),
        (nlmsg(S.SOCK_DIAG_BY_FAMILY, bytes([2]) + bytes(71) + struct.pack("=HH", 3, 2)), errno.EBADMSG, S.E_BAD_ATTR),
        (nlmsg(S.SOCK_DIAG_BY_FAMILY, bytes([2]) + bytes(71) + struct.pack("=HH", 64, 2)), errno.EBADMSG, S.E_BAD_ATTR),
        (nlmsg(S.SOCK_DIAG_BY_FAMILY, bytes([2]) + bytes(71) + b"\0\0"), errno.EBADMSG, S.E_BAD_ATTR),
        (struct.pack("=IHHII", 8, 3, 0, 0, 0), errno.EBADMSG, S.E_BAD_LEN),
        (b"\x10\0\0", errno.EBADMSG, S.E_TRUNC_HDR),
        (nlmsg(S.NLMSG_DONE, struct.pack("=i", -(2**31))), 2**31, "Unknown error 2147483648"),
        (nlmsg(S.NLMSG_ERROR, struct.pack("=i", -(2**31)) + bytes(16)), 2**31, "Unknown error 2147483648"),
    ],
    ids=["error-eperm", "done-eintr", "short-error", "overrun", "type", "short-diag", "family",
         "attr-short", "attr-long", "attr-tail", "nlmsg-len", "short-hdr", "done-int-min", "error-int-min"],  # fmt: skip
)
def test_crafted_errors(parser, data, code, text):
    with pytest.raises(SamplerError) as ei:
        parser(data, {}, -1)
    assert ei.value.errno == code
    assert text in str(ei.value)


def test_seq_check_and_ack_noop(parser, recorded):
    seq = struct.unpack_from("=I", recorded, 8)[0]
    with pytest.raises(SamplerError, match=S.E_BAD_SEQ):
        parser(recorded, {}, seq + 1)
    ack = nlmsg(S.NLMSG_ERROR, struct.pack("=i", 0) + bytes(16))
    noop = nlmsg(S.NLMSG_NOOP, b"")
    assert parser(ack + noop + DONE, {}, -1) == (len(ack + noop + DONE), 0, S._NO_INFO, 0)


def with_info_len(msg: bytes, ilen: int | None) -> bytes:
    """A copy of one socket message whose INET_DIAG_INFO is cut to ilen bytes (None: removed)."""
    head = msg[: 16 + 72]
    attrs, off, body = b"", 16 + 72, msg
    mlen = struct.unpack_from("=I", msg)[0]
    while off + 4 <= mlen:
        rlen, rtype = struct.unpack_from("=HH", body, off)
        a = body[off : off + rlen]
        if rtype == S.INET_DIAG_INFO:
            if ilen is not None:
                a = struct.pack("=HH", 4 + ilen, rtype) + a[4 : 4 + ilen]
            else:
                a = b""
        attrs += a + bytes(-len(a) % 4)
        off += (rlen + 3) & ~3
    out = bytearray(head + attrs)
    struct.pack_into("=I", out, 0, len(out))
    return bytes(out)


@pytest.mark.parametrize("ilen", [0, 8, 60, 104, 120, 136, 152, 159, 160, 161])
def test_short_tcp_info(parser, recorded, ilen):
    full_msg = messages(recorded)[0]
    full = S.parse_dump(full_msg + DONE, parser)
    (key, ref), = full.items()  # fmt: skip
    out: dict = {}
    end, count, min_info, skipped = parser(with_info_len(full_msg, ilen) + DONE, out, -1)
    assert (count, min_info, skipped) == (1, ilen, 0)
    got = out[key]
    have = S.fields_available(ilen)
    for f in S.FIELD_MIN_INFO_LEN:
        if f == "state":
            continue
        assert getattr(got, f) == (getattr(ref, f) if f in have else 0), (ilen, f)
    assert (got.key, got.state, got.inode) == (key, ref.state, ref.inode)
    assert outcome(S._parse_chunk_py, with_info_len(full_msg, ilen)) == outcome(parser, with_info_len(full_msg, ilen))


def test_no_info_is_skipped(parser, recorded):
    msg = with_info_len(messages(recorded)[0], None)
    assert parser(msg + DONE, {}, -1) == (len(msg) + len(DONE), 0, S._NO_INFO, 1)


def test_fields_available():
    assert S.fields_available(104) == {"state", "last_data_sent_ms", "last_data_recv_ms", "last_ack_recv_ms", "rtt_us"}
    assert S.fields_available(160) == set(S.FIELD_MIN_INFO_LEN)


def socket_message(family: int, src: bytes, sport: int, dst: bytes, dport: int) -> bytes:
    """One SOCK_DIAG_BY_FAMILY message: inet_diag_msg (ports in network order) + a full tcp_info."""
    diag = struct.pack("=BBBB", family, TcpState.ESTABLISHED, 0, 0) + struct.pack(">HH", sport, dport)
    diag += src + dst + bytes(4 + 8 + 16) + struct.pack("=I", 4242)  # ifindex, cookie, 4 u32, inode
    info = struct.pack("=HH", 4 + S.FULL_INFO_LEN, S.INET_DIAG_INFO) + bytes(S.FULL_INFO_LEN)
    return nlmsg(S.SOCK_DIAG_BY_FAMILY, diag + info)


V4_MAPPED = bytes(10) + b"\xff\xff"
ADDR16 = st.binary(min_size=16, max_size=16) | st.binary(min_size=4, max_size=4).map(lambda a: V4_MAPPED + a)
PORT = st.integers(0, 65535)


@FUZZ
@given(family=st.sampled_from([socket.AF_INET, socket.AF_INET6]), src=ADDR16, sport=PORT, dst=ADDR16, dport=PORT)
def test_key_is_pack_key_of_the_socket(family, src, sport, dst, dport):
    """local = idiag_src:sport, remote = idiag_dst:dport; AF_INET reads 4 bytes; v4-mapped == IPv4."""
    if family == socket.AF_INET:
        want = pack_key(socket.inet_ntop(family, src[:4]), sport, socket.inet_ntop(family, dst[:4]), dport)
    else:
        want = pack_key(socket.inet_ntop(family, src), sport, socket.inet_ntop(family, dst), dport)
    data = socket_message(family, src, sport, dst, dport) + DONE
    for p in PARSERS.values():
        (key, sample), = S.parse_dump(data, p).items()  # fmt: skip
        assert key == want and sample.key is key and sample.inode == 4242


PACK_CASES = [
    ("192.0.2.1", 443, "198.51.100.7", 40000),
    ("2001:db8::1", 0, "fe80::2", 65535),
    ("::ffff:10.0.0.1", 80, "10.0.0.2", 80),  # v4-mapped text: the IPv4 key
    ("::10.0.0.1", 80, "::", 1),  # IPv4-compatible (deprecated) stays IPv6
    ("1.2.3.4", True, "5.6.7.8", False),  # bool is an int to struct
    ("1.2.3.4", 65536, "5.6.7.8", 1),
    ("1.2.3.4", -1, "5.6.7.8", 1),
    ("1.2.3.4", 2**70, "5.6.7.8", 1),
    ("1.2.3.4", 1.0, "5.6.7.8", 1),
    ("1.2.3.4", "80", "5.6.7.8", 1),
    ("1.2.3.4", None, "5.6.7.8", 1),
    ("256.1.1.1", 1, "5.6.7.8", 1),
    ("01.2.3.4", 1, "5.6.7.8", 1),
    ("1.2.3.4 ", 1, "5.6.7.8", 1),
    ("1.2.3.4\0", 1, "5.6.7.8", 1),  # C's inet_pton would stop at the NUL
    ("fe80::1%lo", 1, "::1", 1),
    ("", 1, "::1", 1),
    ("\u0661.2.3.4", 1, "::1", 1),  # non-ASCII digit
    ("\udcff", 1, "::1", 1),  # a lone surrogate
    (None, 1, "::1", 1),
    (b"1.2.3.4", 1, "::1", 1),
    (type("Text", (str,), {})("1.2.3.4"), 1, "::1", 1),  # a str subclass
]


def pack_outcome(fn, args):
    try:
        return ("ok", fn(*args))
    except Exception as e:  # noqa: BLE001 - the twins must raise the same thing, whatever it is
        return ("err", type(e), str(e))


@pytest.mark.parametrize("args", PACK_CASES, ids=[repr(a)[:40] for a in PACK_CASES])
def test_pack_key_twins(args):
    """The compiled pack_key gives records.pack_key's bytes or its exception, for any input."""
    if S._compiled is None:
        pytest.skip("spoa.servernode._sampler is not built")
    want = pack_outcome(records.pack_key, args)
    assert pack_outcome(S._compiled.pack_key, args) == want
    if want[0] == "ok":
        assert len(want[1]) == records.KEY_LEN and pack_key(*unpack_key(want[1])) == want[1]


ADDR_TEXT = (st.ip_addresses().map(str) | st.text(alphabet="0123456789abcdef.:%f", max_size=45)
             | st.binary(min_size=16, max_size=16).map(lambda a: socket.inet_ntop(socket.AF_INET6, a)))  # fmt: skip


@FUZZ
@given(local=ADDR_TEXT, lport=st.integers(-2, 65537), remote=ADDR_TEXT, rport=st.integers(-2, 65537))
def test_pack_key_twins_fuzz(local, lport, remote, rport):
    if S._compiled is None:
        pytest.skip("spoa.servernode._sampler is not built")
    args = (local, lport, remote, rport)
    assert pack_outcome(S._compiled.pack_key, args) == pack_outcome(records.pack_key, args)


@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes(data):
    results = [outcome(p, data) for p in PARSERS.values()]
    assert all(r == results[0] for r in results)


@FUZZ
@given(seed=st.integers(0, 2**32 - 1), flips=st.integers(1, 12), cut=st.integers(0, 4000))
def test_mutated_real_dump(recorded, seed, flips, cut):
    rng = random.Random(seed)
    data = bytearray(recorded)
    for _ in range(flips):
        i = rng.randrange(len(data))
        data[i] = rng.choice([0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    data = bytes(data[: len(data) - cut % len(data)])
    results = [outcome(p, data) for p in PARSERS.values()]
    assert all(r == results[0] for r in results)
    for p in PARSERS.values():  # the whole-buffer helper too
        try:
            S.parse_dump(data, p)
        except SamplerError:
            pass


def test_compiled_generic_setattr_fallback(recorded):
    """The compiled twin without direct slot stores gives the same samples."""
    if S._compiled is None:
        pytest.skip("spoa.servernode._sampler is not built")
    try:
        assert S._compiled.configure(TcpSample, SamplerError, direct=False) is False
        slow = S.parse_dump(recorded, S._compiled.parse_chunk)
    finally:
        assert S._compiled.configure(TcpSample, SamplerError) is True
    assert slow == S.parse_dump(recorded, S._parse_chunk_py)
    with pytest.raises(TypeError):
        S._compiled.configure(dict, SamplerError)
