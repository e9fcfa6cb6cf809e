"""Kernel sampler: per-connection TCP counters straight from the kernel.

HAProxy has no per-connection packet or segment counters (notes/spop.md §6.2,
§6.3); the kernel keeps them in each socket's ``struct tcp_info``. This module
reads them for every TCP socket whose LOCAL port is one of a given set (HAProxy's
frontend ports), with one NETLINK_SOCK_DIAG dump per address family per call:

* request ``inet_diag_req_v2`` (IPPROTO_TCP, AF_INET then AF_INET6) asking for
  the INET_DIAG_INFO extension (tcp_info), with a state mask (every TCP state
  except LISTEN, TIME_WAIT and CLOSE) and an INET_DIAG_REQ_BYTECODE filter on
  the local port, run by the kernel: sockets on other ports never reach us;
* parse each reply: ``inet_diag_msg`` (family, state, ports, addresses,
  inode) plus the INET_DIAG_INFO attribute, read by offset, so an older
  kernel's shorter tcp_info gives 0 for the missing fields (see
  ``KernelSampler.available_fields``). Each socket is keyed by the agent's
  connection key (spoa.wire.records.pack_key), copied from the raw address and
  port bytes.

The parser has two twins with the same behaviour: the compiled one in
cext/spoa/servernode/_sampler.pyx (spoa.servernode._sampler) and ``_parse_chunk_py`` below.
SPOA_NO_EXTENSIONS=1, or a missing build, selects the Python one.
docs/sampler.md says how it works, which counter is which direction, and
what the benchmark measured.

    from spoa.wire.records import unpack_key

    with KernelSampler([80, 443]) as sampler:
        for key, s in sampler.sample().items():
            local, lport, remote, rport = unpack_key(key)
            print(remote, rport, s.bytes_received, s.bytes_acked)
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from .._accel import load
from ..wire import records

__all__ = [
    "DEFAULT_STATES",
    "FIELD_MIN_INFO_LEN",
    "IMPLEMENTATION",
    "KernelSampler",
    "SamplerError",
    "TcpSample",
    "TcpState",
    "build_bytecode",
    "build_request",
    "fields_available",
    "pack_key",
    "parse_chunk",
    "parse_dump",
    "ss_sample",
]

log = logging.getLogger(__name__)

# --- netlink / sock_diag constants (linux/netlink.h, sock_diag.h, inet_diag.h)
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_DUMP_INTR = 0x10
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_INFO = 2
INET_DIAG_BC_JMP = 1
INET_DIAG_BC_S_GE = 2
INET_DIAG_BC_S_LE = 3
INET_DIAG_BC_S_EQ = 11  # Linux 4.16+
NLMSG_HDRLEN = 16
INET_DIAG_MSG_LEN = 72  # sizeof(struct inet_diag_msg)
MSG_TRUNC = socket.MSG_TRUNC

_HDR = struct.Struct("=IHHII")  # nlmsg_len, nlmsg_type, nlmsg_flags, nlmsg_seq, nlmsg_pid
_I32 = struct.Struct("=i")
_U32 = struct.Struct("=I")
_RTA = struct.Struct("=HH")  # rta_len, rta_type
# inet_diag_msg from idiag_sport: sport, dport (network order, as in the key), src, dst;
# an AF_INET address is in the first 4 bytes of its 16.
_ENDS4 = struct.Struct("=2s2s4s12x4s")
_ENDS6 = struct.Struct("=2s2s16s16s")
# struct tcp_info up to tcpi_data_segs_out (160 bytes, Linux 4.6+), the fields
# we read: state, last_data_sent, last_data_recv, last_ack_recv, rtt,
# bytes_acked, bytes_received, segs_out, segs_in, data_segs_in, data_segs_out.
_INFO160 = struct.Struct("=B43xI4xII8xI48xQQII8xII")
assert _INFO160.size == 160


class TcpState(IntEnum):
    """include/net/tcp_states.h"""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12


# Every state except LISTEN, TIME_WAIT and CLOSE (bits 1..11). SYN_RECV makes
# the kernel add NEW_SYN_RECV request sockets, which carry no tcp_info and are
# dropped by the parser (counted in `skipped`), like orphaned FIN_WAIT2 ones.
DEFAULT_STATES = sum(
    1 << s for s in TcpState if s not in (TcpState.LISTEN, TcpState.TIME_WAIT, TcpState.CLOSE, TcpState.NEW_SYN_RECV)
)

# The smallest tcp_info length (INET_DIAG_INFO payload) that carries a field.
# tcp_info grew over time: bytes_acked/bytes_received came in Linux 4.1,
# segs_in/segs_out in 4.2, data_segs_in/out in 4.6.
FIELD_MIN_INFO_LEN = {
    "state": 1,
    "last_data_sent_ms": 48,
    "last_data_recv_ms": 56,
    "last_ack_recv_ms": 60,
    "rtt_us": 72,
    "bytes_acked": 128,
    "bytes_received": 136,
    "segs_out": 140,
    "segs_in": 144,
    "data_segs_in": 156,
    "data_segs_out": 160,
}
FULL_INFO_LEN = 160
_NO_INFO = 0x7FFFFFFF  # min_info_len when a chunk held no tcp_info


def fields_available(info_len: int) -> frozenset[str]:
    """The tcp_info-derived TcpSample fields that a tcp_info of `info_len` bytes holds."""
    return frozenset(f for f, need in FIELD_MIN_INFO_LEN.items() if info_len >= need)


@dataclass(frozen=True, slots=True)
class TcpSample:
    """One socket's counters at dump time (HAProxy's client-side socket: see docs/sampler.md).

    ``key`` is the socket's spoa.wire.records.pack_key (local = the socket's own
    address and port, remote = its peer; IPv4 and IPv4-mapped IPv6 give the
    same key), also its key in a sample dict; records.unpack_key gives the text
    back. The byte counters are the kernel's 64-bit totals since the connection
    opened; ``*_ms`` are "ms ago" as the kernel reports them; fields the running
    kernel's tcp_info lacks are 0 (``KernelSampler.available_fields``).
    ``inode`` tells apart two connections that reused a 4-tuple, and maps a
    socket to its process (/proc/PID/fd).
    """

    key: bytes
    state: int  # TcpState (from inet_diag_msg.idiag_state)
    bytes_received: int  # tcpi_bytes_received: payload received from the peer (+1 once its FIN came in)
    bytes_acked: int  # tcpi_bytes_acked: payload we sent that the peer acknowledged
    segs_in: int
    segs_out: int
    data_segs_in: int
    data_segs_out: int
    last_data_recv_ms: int
    last_data_sent_ms: int
    rtt_us: int  # smoothed RTT
    last_ack_recv_ms: int = 0
    inode: int = 0


class SamplerError(OSError):
    """sock_diag failed (errno from the kernel) or sent something unparsable (EBADMSG)."""


# Parser error texts: the compiled twin raises the same ones.
E_TRUNC_HDR = "truncated netlink message header"
E_BAD_LEN = "netlink message length out of bounds"
E_TRUNC_ERROR = "truncated NLMSG_ERROR message"
E_OVERRUN = "netlink reported an overrun (NLMSG_OVERRUN)"
E_BAD_TYPE = "unexpected netlink message type"
E_BAD_SEQ = "unexpected netlink sequence number"
E_TRUNC_DIAG = "truncated inet_diag_msg"
E_BAD_FAMILY = "unexpected address family in inet_diag_msg"
E_BAD_ATTR = "netlink attribute length out of bounds"


def _strerror(code: int) -> str:
    """os.strerror, also for values outside a C int (2**31 from a forged errno)."""
    try:
        return os.strerror(code)
    except (ValueError, OverflowError):
        return f"Unknown error {code}"


def _parse_chunk_py(data: Any, out: dict, seq: int = -1) -> tuple[int, int, int, int]:
    """Parse one recv()'d chunk of a sock_diag dump, adding TcpSample to `out`.

    Returns ``(end, count, min_info_len, skipped)``: `end` is -1 when the chunk
    ended without NLMSG_DONE (read more), else the offset just past the
    NLMSG_DONE message (the caller checks nothing follows); `count` samples
    were stored; `min_info_len` is the shortest tcp_info seen (0x7FFFFFFF if
    none); `skipped` sockets had no INET_DIAG_INFO (request sockets, orphaned
    FIN_WAIT2 timewait entries). `seq` >= 0 checks each message's sequence number.
    Raises SamplerError for NLMSG_ERROR / a failed NLMSG_DONE (errno from the
    kernel) and for malformed input (EBADMSG).
    """
    buf = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
    n = len(buf)
    off = 0
    count = 0
    skipped = 0
    min_info = _NO_INFO
    hdr_unpack = _HDR.unpack_from
    rta_unpack = _RTA.unpack_from
    u32_unpack = _U32.unpack_from
    info_unpack = _INFO160.unpack_from
    ends4_unpack = _ENDS4.unpack_from
    ends6_unpack = _ENDS6.unpack_from
    v4_mapped = records.V4_MAPPED  # the key's IPv4 prefix (::ffff:a.b.c.d)
    AF_INET = socket.AF_INET
    AF_INET6 = socket.AF_INET6
    sample_cls = TcpSample
    while off < n:
        if n - off < NLMSG_HDRLEN:
            raise SamplerError(_errno.EBADMSG, E_TRUNC_HDR)
        mlen, mtype, _flags, mseq, _pid = hdr_unpack(buf, off)
        if mlen < NLMSG_HDRLEN or mlen > n - off:
            raise SamplerError(_errno.EBADMSG, E_BAD_LEN)
        if seq >= 0 and mseq != seq:
            raise SamplerError(_errno.EBADMSG, E_BAD_SEQ)
        nxt = off + ((mlen + 3) & ~3)
        if mtype != SOCK_DIAG_BY_FAMILY:
            if mtype == NLMSG_DONE:
                if mlen >= NLMSG_HDRLEN + 4:
                    err = _I32.unpack_from(buf, off + NLMSG_HDRLEN)[0]
                    if err < 0:
                        raise SamplerError(-err, f"sock_diag dump failed: {_strerror(-err)}")
                return (min(nxt, n), count, min_info, skipped)
            if mtype == NLMSG_ERROR:
                if mlen < NLMSG_HDRLEN + 4:
                    raise SamplerError(_errno.EBADMSG, E_TRUNC_ERROR)
                err = _I32.unpack_from(buf, off + NLMSG_HDRLEN)[0]
                if err != 0:
                    e = -err if err < 0 else err
                    raise SamplerError(e, f"sock_diag request failed: {_strerror(e)}")
                off = nxt  # an ACK: not expected for a dump, harmless
                continue
            if mtype == NLMSG_NOOP:
                off = nxt
                continue
            if mtype == NLMSG_OVERRUN:
                raise SamplerError(_errno.ENOBUFS, E_OVERRUN)
            raise SamplerError(_errno.EBADMSG, E_BAD_TYPE)
        if mlen < NLMSG_HDRLEN + INET_DIAG_MSG_LEN:
            raise SamplerError(_errno.EBADMSG, E_TRUNC_DIAG)
        m = off + NLMSG_HDRLEN
        family = buf[m]
        state = buf[m + 1]
        # The key of HAProxy's socket: local = idiag_src + idiag_sport, remote = idiag_dst + idiag_dport.
        if family == AF_INET:
            sport, dport, src, dst = ends4_unpack(buf, m + 4)
            key = b"".join((v4_mapped, src, sport, v4_mapped, dst, dport))
        elif family == AF_INET6:
            sport, dport, src, dst = ends6_unpack(buf, m + 4)
            key = b"".join((src, sport, dst, dport))
        else:
            raise SamplerError(_errno.EBADMSG, E_BAD_FAMILY)
        inode = u32_unpack(buf, m + 68)[0]
        # Attributes: walk to INET_DIAG_INFO.
        a = m + INET_DIAG_MSG_LEN
        end = off + mlen
        info = -1
        ilen = 0
        while end - a >= 4:
            rlen, rtype = rta_unpack(buf, a)
            if rlen < 4 or rlen > end - a:
                raise SamplerError(_errno.EBADMSG, E_BAD_ATTR)
            if rtype & NLA_TYPE_MASK == INET_DIAG_INFO:
                info = a + 4
                ilen = rlen - 4
            a += (rlen + 3) & ~3
        if a < end:
            raise SamplerError(_errno.EBADMSG, E_BAD_ATTR)
        if info < 0:
            skipped += 1
            off = nxt
            continue
        if ilen < min_info:
            min_info = ilen
        if ilen >= FULL_INFO_LEN:
            (
                _tstate,
                last_sent,
                last_recv,
                last_ack,
                rtt,
                acked,
                received,
                segs_out,
                segs_in,
                dsegs_in,
                dsegs_out,
            ) = info_unpack(buf, info)
        else:
            last_sent, last_recv, last_ack, rtt, acked, received, segs_out, segs_in, dsegs_in, dsegs_out = _short_info(
                buf, info, ilen
            )
        out[key] = sample_cls(
            key,
            state,
            received,
            acked,
            segs_in,
            segs_out,
            dsegs_in,
            dsegs_out,
            last_recv,
            last_sent,
            rtt,
            last_ack,
            inode,
        )
        count += 1
        off = nxt
    return (-1, count, min_info, skipped)


def _short_info(buf: Any, info: int, ilen: int) -> tuple[int, ...]:
    """The fields of a tcp_info shorter than 160 bytes; missing ones are 0."""

    def u32(o: int) -> int:
        return _U32.unpack_from(buf, info + o)[0] if ilen >= o + 4 else 0

    def u64(o: int) -> int:
        return struct.unpack_from("=Q", buf, info + o)[0] if ilen >= o + 8 else 0

    return (u32(44), u32(52), u32(56), u32(68), u64(120), u64(128), u32(136), u32(140), u32(152), u32(156))


# The compiled parser and key packer, or None: their twins, _parse_chunk_py
# above and records.pack_key, are then used.
_compiled, _ = load("servernode._sampler", None)

if _compiled is not None:
    # True: the compiled parser fills TcpSample's slots directly (see _sampler.pyx).
    DIRECT_SLOTS = _compiled.configure(TcpSample, SamplerError)
    parse_chunk = _compiled.parse_chunk
    pack_key = _compiled.pack_key
    IMPLEMENTATION = "cython"
else:
    DIRECT_SLOTS = False
    parse_chunk = _parse_chunk_py
    pack_key = records.pack_key
    IMPLEMENTATION = "python"


def parse_dump(data: Any, parser: Any = None, seq: int = -1) -> dict[bytes, TcpSample]:
    """Parse a whole recorded buffer: one or more complete dumps, each ending in NLMSG_DONE.

    A buffer that ends without NLMSG_DONE (truncated) raises SamplerError.
    """
    parse = parser or parse_chunk
    mv = memoryview(data).cast("B")
    out: dict = {}
    pos = 0
    n = len(mv)
    if n == 0:
        raise SamplerError(_errno.EBADMSG, "empty sock_diag dump")
    while pos < n:
        end = parse(mv[pos:], out, seq)[0]
        if end < 0:
            raise SamplerError(_errno.EBADMSG, "sock_diag dump ended without NLMSG_DONE")
        pos += end
    return out


# --- the request ------------------------------------------------------------


def _kernel_has_eq() -> bool:
    """INET_DIAG_BC_S_EQ exists from Linux 4.16 on."""
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (4, 16)


def _port_ranges(ports: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted ranges covering exactly `ports`, then at most MAX_RANGES of them
    covering a superset: the narrowest gaps between ranges are filled first.

    The kernel runs the filter once per socket, a test per range, so a long
    program costs every dump; and one must stay under 64 KiB. A superset is
    safe: the agent joins the dump on its registered sockets, so an extra
    socket costs its parsing, never a wrong count.
    """
    ranges: list[tuple[int, int]] = []
    for p in sorted(set(ports)):
        if ranges and p == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], p)
        else:
            ranges.append((p, p))
    if len(ranges) <= MAX_RANGES:
        return ranges
    gaps = sorted(range(1, len(ranges)), key=lambda i: ranges[i][0] - ranges[i - 1][1])
    closed = set(gaps[:len(ranges) - MAX_RANGES])  # range i joins range i - 1
    merged = [ranges[0]]
    for i in range(1, len(ranges)):
        if i in closed:
            merged[-1] = (merged[-1][0], ranges[i][1])
        else:
            merged.append(ranges[i])
    return merged


# Port ranges in one filter at most (see _port_ranges).
MAX_RANGES = 64


def build_bytecode(ports: Iterable[int], use_eq: bool = True) -> bytes:
    """inet_diag bytecode accepting sockets whose local port is in `ports`
    (or, past MAX_RANGES ranges of them, a superset: see _port_ranges).

    Ports are merged into ranges; each range is a test (S_EQ for a single port
    when `use_eq`, else S_GE + S_LE) followed, except for the last one, by a
    JMP to the end (accept). A failed test jumps to the next range's test; the
    last range's failed test jumps 4 bytes past the end (reject). Every "yes"
    is the next op, as inet_diag_bc_audit() walks them.
    """
    ranges = _port_ranges(ports)
    if not ranges:
        raise ValueError("no ports")
    sizes = [(8 if (lo == hi and use_eq) else 16) for lo, hi in ranges]
    total = sum(sizes) + 4 * (len(ranges) - 1)
    ops: list[bytes] = []
    off = 0
    for i, ((lo, hi), size) in enumerate(zip(ranges, sizes)):
        last = i == len(ranges) - 1
        nxt = total + 4 if last else off + size + 4  # where a failed test goes
        if lo == hi and use_eq:
            tests = [(INET_DIAG_BC_S_EQ, lo)]
        else:
            tests = [(INET_DIAG_BC_S_GE, lo), (INET_DIAG_BC_S_LE, hi)]
        for code, port in tests:
            ops.append(struct.pack("=BBH", code, 8, nxt - off))
            ops.append(struct.pack("=BBH", 0, 0, port))
            off += 8
        if not last:
            ops.append(struct.pack("=BBH", INET_DIAG_BC_JMP, 4, total - off))
            off += 4
    bc = b"".join(ops)
    assert len(bc) == total
    return bc


def build_request(family: int, states: int, bytecode: bytes | None, seq: int) -> bytes:
    """One SOCK_DIAG_BY_FAMILY dump request: inet_diag_req_v2 + optional bytecode attribute."""
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 0, states) + bytes(48)
    if bytecode:
        req += _RTA.pack(4 + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
    return _HDR.pack(NLMSG_HDRLEN + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + req


def _check_ports(ports: Iterable[int] | None) -> frozenset[int] | None:
    if ports is None:
        return None
    out = frozenset(int(p) for p in ports)
    bad = [p for p in out if not 0 < p < 65536]
    if bad:
        raise ValueError(f"invalid port(s): {sorted(bad)}")
    return out


class KernelSampler:
    """Samples tcp_info of the sockets whose local port is in `ports`.

    ``ports=None`` disables the kernel filter (every local port). `states` is
    the TCP state bit mask, `families` the dumps made per call, `parser` a
    parse_chunk twin, `use_eq` forces (True) or avoids (False) the S_EQ
    bytecode op (default: S_EQ on Linux >= 4.16, with a fallback on EINVAL).
    One netlink socket is opened in the constructor and reused; a dump that
    fails half way closes it, and the next call opens a new one. Not
    thread-safe: one sampler per thread.
    """

    RECV_BUFSIZE = 1 << 18  # > the kernel's 32 KiB dump skbs
    _available: bool | None = None

    def __init__(
        self,
        ports: Iterable[int] | None,
        *,
        states: int = DEFAULT_STATES,
        families: tuple[int, ...] = (socket.AF_INET, socket.AF_INET6),
        timeout: float = 5.0,
        parser: Any = None,
        use_eq: bool | None = None,
    ) -> None:
        self._states = states
        self._families = tuple(families)
        self._timeout = timeout
        self._parse = parser or parse_chunk
        # S_EQ for single ports when the kernel has it (auto: Linux >= 4.16,
        # and sample() falls back to S_GE/S_LE if the kernel rejects it).
        self._use_eq = _kernel_has_eq() if use_eq is None else use_eq
        self._buf = bytearray(self.RECV_BUFSIZE)
        self._view = memoryview(self._buf)
        self._seq = 0
        self._sock: socket.socket | None = None
        self._closed = False
        self._ports: frozenset[int] | None = None
        self._bytecode: bytes | None = None
        self.info_len: int | None = None  # tcp_info length seen in the last sample with sockets
        self.available_fields: frozenset[str] = frozenset(FIELD_MIN_INFO_LEN)
        self.sampled_at = 0.0  # time.monotonic() when the last sample() started
        self.last_stats: dict[str, int] = {}
        self.set_ports(ports)
        self._sock = self._open()

    # -- lifecycle
    def _open(self) -> socket.socket:
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        except OSError as e:
            raise SamplerError(e.errno, f"cannot open NETLINK_SOCK_DIAG socket: {e.strerror}") from e
        try:
            s.bind((0, 0))
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            except OSError:  # pragma: no cover - capped by net.core.rmem_max, harmless
                pass
            s.settimeout(self._timeout)
        except OSError as e:
            s.close()
            raise SamplerError(e.errno, f"cannot set up NETLINK_SOCK_DIAG socket: {e.strerror}") from e
        return s

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._closed = True

    def __enter__(self) -> KernelSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()

    @property
    def ports(self) -> frozenset[int] | None:
        return self._ports

    @property
    def bytecode(self) -> bytes | None:
        """The INET_DIAG_REQ_BYTECODE filter sent with each request (None: no filter)."""
        return self._bytecode

    def set_ports(self, ports: Iterable[int] | None) -> None:
        """Replace the port set (None: no filter, every local port)."""
        self._ports = _check_ports(ports)
        self._bytecode = build_bytecode(self._ports, self._use_eq) if self._ports else None

    @staticmethod
    def available() -> bool:
        """True when a filtered sock_diag dump with tcp_info works here (cached)."""
        if KernelSampler._available is None:
            try:
                with KernelSampler([1], families=(socket.AF_INET,)) as s:
                    s.sample()
                KernelSampler._available = True
            except OSError as e:
                log.info("sock_diag unavailable: %s", e)
                KernelSampler._available = False
        return KernelSampler._available

    # -- sampling
    def sample(self) -> dict[bytes, TcpSample]:
        """One dump per family, keyed by each socket's spoa.wire.records.pack_key."""
        if self._closed:
            raise SamplerError(_errno.EBADF, "sampler is closed")
        out: dict[bytes, TcpSample] = {}
        self.sampled_at = time.monotonic()
        stats = {"sockets": 0, "skipped": 0, "recv_calls": 0, "bytes": 0}
        self.last_stats = stats
        if self._ports is not None and not self._ports:
            return out
        min_info = _NO_INFO
        for family in self._families:
            try:
                mi = self._dump(family, out, stats)
            except SamplerError as e:
                if e.errno == _errno.EINVAL and self._use_eq and self._ports:
                    # A kernel without INET_DIAG_BC_S_EQ (< 4.16) rejects the bytecode: use ranges.
                    log.info("sock_diag rejected the S_EQ bytecode; falling back to S_GE/S_LE")
                    self._use_eq = False
                    self.set_ports(self._ports)
                    mi = self._dump(family, out, stats)
                elif family == socket.AF_INET6 and e.errno in (_errno.ENOENT, _errno.EAFNOSUPPORT):
                    # A kernel without IPv6 has no AF_INET6 sock_diag handler: no IPv6 sockets either.
                    log.warning("no AF_INET6 sock_diag handler (%s); sampling IPv4 only", e)
                    self._families = tuple(f for f in self._families if f != socket.AF_INET6)
                    continue
                else:
                    raise
            min_info = min(min_info, mi)
        if min_info != _NO_INFO:
            self.info_len = min_info
            self.available_fields = fields_available(min_info)
        return out

    def _request(self, family: int) -> int:
        if self._sock is None:
            self._sock = self._open()
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        req = build_request(family, self._states, self._bytecode, self._seq)
        try:
            self._sock.sendto(req, (0, 0))
        except OSError as e:
            self._reset()
            raise SamplerError(e.errno, f"sock_diag request not sent: {e.strerror}") from e
        return self._seq

    def _recv(self) -> int:
        assert self._sock is not None
        try:
            # MSG_TRUNC: the return value is the datagram's real size, to detect a too-small buffer.
            n = self._sock.recv_into(self._buf, 0, MSG_TRUNC)
        except TimeoutError as e:
            raise SamplerError(_errno.ETIMEDOUT, "sock_diag dump timed out") from e
        except OSError as e:
            raise SamplerError(e.errno, f"sock_diag recv failed: {e.strerror}") from e
        if n > len(self._buf):
            raise SamplerError(_errno.EMSGSIZE, f"netlink datagram of {n} bytes exceeds the receive buffer")
        if n == 0:
            raise SamplerError(_errno.EBADMSG, "empty netlink datagram")
        return n

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _dump(self, family: int, out: dict, stats: dict[str, int]) -> int:
        seq = self._request(family)
        parse = self._parse
        view = self._view
        min_info = _NO_INFO
        try:
            while True:
                n = self._recv()
                stats["recv_calls"] += 1
                stats["bytes"] += n
                end, count, mi, skipped = parse(view[:n], out, seq)
                stats["sockets"] += count
                stats["skipped"] += skipped
                if mi < min_info:
                    min_info = mi
                if end >= 0:
                    if end != n:
                        raise SamplerError(_errno.EBADMSG, "data after NLMSG_DONE")
                    return min_info
        except BaseException:
            # The dump may still be running in the kernel: drop the socket so
            # the next call does not read its leftovers (or get EBUSY).
            self._reset()
            raise

    def dump_raw(self, keep: bool = True) -> list[bytes]:
        """Receive one dump per family without parsing (benchmarks, tests).

        The end of a dump is found by looking at the last 20 bytes of each
        datagram only (an NLMSG_DONE or NLMSG_ERROR of this dump's sequence
        number is always the last message of its datagram). With keep=False
        nothing is copied and [] is returned.
        """
        chunks: list[bytes] = []
        hdr = _HDR.unpack_from
        for family in self._families:
            seq = self._request(family)
            try:
                while True:
                    n = self._recv()
                    if keep:
                        chunks.append(bytes(self._view[:n]))
                    if n >= 20:
                        mlen, mtype, _f, mseq, _p = hdr(self._buf, n - 20)
                        if mlen == 20 and mseq == seq and mtype in (NLMSG_DONE, NLMSG_ERROR):
                            break
            except BaseException:
                self._reset()
                raise
        return chunks


# --- ss(8) as an oracle ----------------------------------------------------

_SS_STATES = {
    "ESTAB": 1,
    "SYN-SENT": 2,
    "SYN-RECV": 3,
    "FIN-WAIT-1": 4,
    "FIN-WAIT-2": 5,
    "TIME-WAIT": 6,
    "UNCONN": 7,
    "CLOSE-WAIT": 8,
    "LAST-ACK": 9,
    "LISTEN": 10,
    "CLOSING": 11,
}
_SS_STATE_ARGS = ["established", "syn-sent", "syn-recv", "fin-wait-1", "fin-wait-2", "close-wait", "last-ack", "closing"]
_SS_INT_FIELDS = {
    "bytes_acked": "bytes_acked",
    "bytes_received": "bytes_received",
    "segs_out": "segs_out",
    "segs_in": "segs_in",
    "data_segs_out": "data_segs_out",
    "data_segs_in": "data_segs_in",
    "lastsnd": "last_data_sent_ms",
    "lastrcv": "last_data_recv_ms",
    "lastack": "last_ack_recv_ms",
}


def _ss_addr(text: str) -> tuple[str, int]:
    """ss's "addr:port" / "[v6addr%scope]:port" -> (address text, port); pack_key maps IPv4."""
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.split("%", 1)[0], int(port)


def ss_command(ports: Iterable[int]) -> list[str]:
    ps = sorted(set(int(p) for p in ports))
    expr = "( " + " or ".join(f"sport = :{p}" for p in ps) + " )"
    cmd = ["ss", "-tinHe"]
    for st in _SS_STATE_ARGS:
        cmd += ["state", st]
    return cmd + [expr]


def parse_ss(text: str) -> dict[bytes, TcpSample]:
    """Parse `ss -tinHe state ... ( sport = :P ... )` output (several states: the State column is present)."""
    out: dict[bytes, TcpSample] = {}
    head: list[str] | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            head = line.split()
            continue
        if head is None:
            continue
        tokens = line.split()
        cur, head = head, None
        if not tokens:  # a socket without tcp_info (e.g. orphaned FIN-WAIT-2)
            continue
        state = _SS_STATES.get(cur[0])
        if state is None or len(cur) < 5:
            raise SamplerError(_errno.EBADMSG, f"unparsable ss line: {' '.join(cur)!r}")
        key = pack_key(*_ss_addr(cur[3]), *_ss_addr(cur[4]))
        vals = dict.fromkeys(_SS_INT_FIELDS.values(), 0)
        rtt_us = 0
        inode = 0
        for tok in cur[5:]:
            if tok.startswith("ino:"):
                inode = int(tok[4:])
        for tok in tokens:
            k, sep, v = tok.partition(":")
            if not sep:
                continue
            f = _SS_INT_FIELDS.get(k)
            if f is not None:
                vals[f] = int(v)
            elif k == "rtt":
                rtt_us = round(float(v.split("/")[0]) * 1000)
        out[key] = TcpSample(
            key, state,
            vals["bytes_received"], vals["bytes_acked"], vals["segs_in"], vals["segs_out"],
            vals["data_segs_in"], vals["data_segs_out"], vals["last_data_recv_ms"],
            vals["last_data_sent_ms"], rtt_us, vals["last_ack_recv_ms"], inode,
        )  # fmt: skip
    return out


def ss_sample(ports: Iterable[int], *, timeout: float = 60.0) -> dict[bytes, TcpSample]:
    """The same dict as KernelSampler(ports).sample(), from iproute2's `ss -tinHe` (oracle, benchmarks).

    ss prints rtt in ms with 3 decimals (rtt_us is rounded to what it shows) and
    omits zero counters (0 here too).
    """
    ports = list(ports)
    if not ports:
        return {}
    if shutil.which("ss") is None:
        raise SamplerError(_errno.ENOENT, "ss (iproute2) is not installed")
    try:
        res = subprocess.run(ss_command(ports), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise SamplerError(_errno.ETIMEDOUT, "ss timed out") from e
    if res.returncode != 0:
        raise SamplerError(_errno.EIO, f"ss failed ({res.returncode}): {res.stderr.strip()}")
    return parse_ss(res.stdout)
