"""Traces -> per-connection interval series (the backtest's input, and a replay's).

A trace becomes a :class:`Connections`: one row per TCP connection (first and
last interval, how it ended, its traffic class) and a sparse list of
(interval, connection, bytes, packets per direction) for the intervals in which
the connection carried something. Interval ``k`` covers
``[origin + k * interval, origin + (k + 1) * interval)``; the server node
reports it at the end of the interval, ``(k + 1) * interval`` after the origin.

Readers:

* :func:`read_pcap` - pcap or pcapng through dpkt. TCP connections are
  reconstructed by 4-tuple (both directions are one connection). The client is
  the side that sent the SYN (without ACK); a connection whose handshake was
  not captured takes the endpoint with the lower port as the server. A
  connection starts at its first packet (the SYN when captured) and ends at its
  last; it *closed* if a FIN or RST was seen, else its end is unknown
  (censored: the capture stopped watching it). A new SYN with another initial
  sequence number on a 4-tuple whose connection closed, or a silence longer
  than ``split_idle_s`` (default one hour; some public captures are several
  captures concatenated, years apart), starts a new connection. Bytes are TCP
  payload bytes (from the IP length fields, so a short snap length does not
  undercount), packets are all TCP packets of the direction. Non-TCP packets
  are counted and ignored (HAProxy's connections are TCP).
* :func:`read_csv` - ``conn_id,t,dir,bytes,packets`` (header optional; ``t``
  in seconds, absolute or relative). ``dir`` is ``in`` (client -> server,
  also ``c2s``/``0``) or ``out`` (``s2c``/``1``); two markers end a
  connection: ``close`` (the server node saw it close and publishes a final
  record) and ``vanish`` (it stops existing without a final record: a lost
  final report, a server node gone). A connection with neither is censored at
  its last row. A row with 0 bytes and 0 packets marks presence only (a
  connection that opens and idles).
* :func:`write_csv` writes that format back (interval-exact round trip).

The server node's notion of an *active* interval is payload bytes > 0: its
packet counters are the kernel's data segments (tcp_info data_segs_in/out), so a
pure ACK leaves a record quiet.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "END_CENSORED",
    "END_CLOSE",
    "END_KINDS",
    "END_VANISH",
    "Connections",
    "build_connections",
    "load_trace",
    "read_csv",
    "read_pcap",
    "write_csv",
]

END_CENSORED = 0  # observation stopped; the connection's true end is unknown
END_CLOSE = 1  # closed: the server node publishes a final (CLOSED) record
END_VANISH = 2  # gone without a final record: only the lease releases its state
END_KINDS = {"censored": END_CENSORED, "close": END_CLOSE, "vanish": END_VANISH}

_DIRS = {"in": 0, "c2s": 0, "0": 0, "out": 1, "s2c": 1, "1": 1}
_MARKERS = {"close": END_CLOSE, "vanish": END_VANISH}

PCAP_MAGICS = (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"


@dataclass
class Connections:
    """Per-connection interval series of one trace, columnar.

    Connections are ordered by first interval. Events are sorted by
    (interval, connection) and unique per pair; an interval of a connection
    with no event carried nothing.
    """

    name: str
    interval_ms: int
    origin: float  # seconds (trace clock) at which interval 0 starts
    start: np.ndarray  # int64, first interval of each connection
    end: np.ndarray  # int64, last interval (inclusive)
    end_kind: np.ndarray  # uint8, END_*
    klass: np.ndarray  # int32 index into classes (the frontend: server port for pcaps)
    classes: list[str]
    ids: list[str]
    ev_k: np.ndarray  # int64 interval of each event
    ev_conn: np.ndarray  # int64 connection of each event
    ev_bytes: np.ndarray  # int64 (E, 2): payload bytes in, out
    ev_packets: np.ndarray  # int64 (E, 2): packets in, out
    info: dict = field(default_factory=dict)  # reader statistics
    _by_conn: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.start.size)

    @property
    def n_intervals(self) -> int:
        return int(self.end.max()) + 1 if len(self) else 0

    @property
    def connection_intervals(self) -> int:
        return int((self.end - self.start + 1).sum())

    @property
    def ev_total(self) -> np.ndarray:
        """Bytes in + out per event."""
        return self.ev_bytes.sum(axis=1)

    @property
    def active_intervals(self) -> int:
        return int(np.count_nonzero(self.ev_total > 0))

    def _conn_order(self) -> np.ndarray:
        if self._by_conn is None:
            self._by_conn = np.argsort(self.ev_conn, kind="stable")
        return self._by_conn

    def series(self, i: int) -> dict[str, np.ndarray]:
        """Dense per-interval series of connection ``i`` over its lifetime.

        Keys: ``k`` (interval numbers), ``t_ms`` (interval start, ms after the
        origin), ``bytes_in``, ``bytes_out``, ``packets_in``, ``packets_out``,
        plus ``end_kind``. This is what a live replay needs to reproduce the
        connection's byte/time pattern.
        """
        s, e = int(self.start[i]), int(self.end[i])
        order = self._conn_order()
        lo, hi = np.searchsorted(self.ev_conn[order], [i, i + 1])
        ev = order[lo:hi]
        n = e - s + 1
        out = {name: np.zeros(n, np.int64) for name in ("bytes_in", "bytes_out", "packets_in", "packets_out")}
        pos = self.ev_k[ev] - s
        out["bytes_in"][pos] = self.ev_bytes[ev, 0]
        out["bytes_out"][pos] = self.ev_bytes[ev, 1]
        out["packets_in"][pos] = self.ev_packets[ev, 0]
        out["packets_out"][pos] = self.ev_packets[ev, 1]
        out["k"] = np.arange(s, e + 1, dtype=np.int64)
        out["t_ms"] = out["k"] * self.interval_ms
        out["end_kind"] = np.array(int(self.end_kind[i]))
        return out

    def naive_scale(self) -> float:
        """Mean |y_t - y_{t-1}| over all connections' consecutive intervals
        (bytes in + out): the in-sample naive error that scales MASE, pooled
        over the trace because most single connections are too short or too
        empty for a scale of their own. 0.0 when no interval differs."""
        n_diffs = int((self.end - self.start).sum())
        if n_diffs <= 0 or self.ev_k.size == 0:
            return 0.0
        order = self._conn_order()
        k = self.ev_k[order]
        c = self.ev_conn[order]
        y = self.ev_total[order].astype(np.float64)
        same_prev = np.zeros(k.size, bool)
        same_prev[1:] = (c[1:] == c[:-1]) & (k[1:] == k[:-1] + 1)
        prev_y = np.zeros(k.size)
        prev_y[1:] = y[:-1]
        total = np.where(same_prev, np.abs(y - prev_y), np.where(k > self.start[c], y, 0.0)).sum()
        has_next = np.zeros(k.size, bool)
        has_next[:-1] = same_prev[1:]
        total += np.where(~has_next & (k < self.end[c]), y, 0.0).sum()
        return float(total / n_diffs)

    def duration_s(self) -> float:
        """Seconds covered by at least one live connection (gaps skipped)."""
        if not len(self):
            return 0.0
        order = np.argsort(self.start, kind="stable")
        s, e = self.start[order], self.end[order] + 1
        run_end = np.maximum.accumulate(e)
        new_run = np.ones(s.size, bool)
        new_run[1:] = s[1:] >= run_end[:-1]
        starts = s[new_run]
        ends = np.r_[run_end[np.flatnonzero(new_run)[1:] - 1], run_end[-1]]
        return float((ends - starts).sum()) * self.interval_ms / 1000.0

    def summary(self) -> dict:
        ci = self.connection_intervals
        act = self.active_intervals
        kinds = np.bincount(self.end_kind, minlength=3)
        return {"name": self.name, "connections": len(self), "interval_ms": self.interval_ms,
                "connection_intervals": ci, "active_intervals": act, "idle_intervals": ci - act,
                "idle_share": (ci - act) / ci if ci else 0.0, "duration_s": self.duration_s(),
                "bytes": int(self.ev_bytes.sum()), "closed": int(kinds[END_CLOSE]),
                "vanished": int(kinds[END_VANISH]), "censored": int(kinds[END_CENSORED]), **self.info}

    def subset(self, idx) -> Connections:
        """The listed connections (renumbered in the given order's sorted form)."""
        idx = np.sort(np.asarray(idx, dtype=np.int64))
        remap = np.full(len(self), -1, np.int64)
        remap[idx] = np.arange(idx.size)
        keep = remap[self.ev_conn] >= 0
        return Connections(self.name, self.interval_ms, self.origin, self.start[idx], self.end[idx],
                           self.end_kind[idx], self.klass[idx], self.classes, [self.ids[i] for i in idx],
                           self.ev_k[keep], remap[self.ev_conn[keep]], self.ev_bytes[keep],
                           self.ev_packets[keep], dict(self.info))


def build_connections(name: str, interval_ms: int, origin: float, start_t, end_t, end_kind, klass,
                      classes: list[str], ids: list[str], row_conn, row_t, row_dir, row_bytes, row_packets,
                      info: dict | None = None) -> Connections:
    """Bin packet- or row-level observations into intervals.

    ``start_t``/``end_t`` are per connection (seconds, trace clock), the
    ``row_*`` arrays one entry per observation (``row_dir`` 0 = in, 1 = out).
    """
    if interval_ms <= 0:
        raise ValueError("interval_ms must be > 0")
    step = interval_ms / 1000.0
    start_t = np.asarray(start_t, np.float64)
    end_t = np.asarray(end_t, np.float64)
    start = np.floor((start_t - origin) / step).astype(np.int64)
    end = np.maximum(np.floor((end_t - origin) / step).astype(np.int64), start)
    order = np.lexsort((np.arange(start.size), start))  # by first interval, stable
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    row_conn = rank[np.asarray(row_conn, np.int64)] if start.size else np.asarray(row_conn, np.int64)
    row_k = np.floor((np.asarray(row_t, np.float64) - origin) / step).astype(np.int64)
    row_dir = np.asarray(row_dir, np.int64)
    n = max(int(start.size), 1)
    key = row_k * n + row_conn
    uniq, inv = np.unique(key, return_inverse=True)
    ev_bytes = np.zeros((uniq.size, 2), np.int64)
    ev_packets = np.zeros((uniq.size, 2), np.int64)
    np.add.at(ev_bytes, (inv, row_dir), np.asarray(row_bytes, np.int64))
    np.add.at(ev_packets, (inv, row_dir), np.asarray(row_packets, np.int64))
    keep = (ev_bytes.sum(axis=1) > 0) | (ev_packets.sum(axis=1) > 0)
    uniq, ev_bytes, ev_packets = uniq[keep], ev_bytes[keep], ev_packets[keep]
    ev_k, ev_conn = uniq // n, uniq % n
    return Connections(name=name, interval_ms=int(interval_ms), origin=float(origin), start=start[order],
                       end=end[order], end_kind=np.asarray(end_kind, np.uint8)[order],
                       klass=np.asarray(klass, np.int32)[order], classes=list(classes),
                       ids=[ids[i] for i in order.tolist()], ev_k=ev_k.astype(np.int64),
                       ev_conn=ev_conn.astype(np.int64), ev_bytes=ev_bytes, ev_packets=ev_packets,
                       info=dict(info or {}))


# ------------------------------------------------------------------------------ pcap


def _ip_layer(linktype: int):
    """A function bytes -> dpkt IP/IP6 object (or None) for the capture's link type."""
    import dpkt

    ip_types = (dpkt.ip.IP, dpkt.ip6.IP6)

    def raw(buf):
        if not buf:
            return None
        version = buf[0] >> 4
        if version == 4:
            return dpkt.ip.IP(buf)
        if version == 6:
            return dpkt.ip6.IP6(buf)
        return None

    def wrap(cls):
        def decode(buf):
            data = cls(buf).data
            return data if isinstance(data, ip_types) else None
        return decode

    if linktype == 1:  # EN10MB (VLAN tags are handled by dpkt)
        return wrap(dpkt.ethernet.Ethernet)
    if linktype in (0, 108):  # NULL / LOOP
        return wrap(dpkt.loopback.Loopback)
    if linktype in (12, 14, 101, 228, 229):  # RAW, IPV4, IPV6
        return raw
    if linktype == 113:  # LINUX_SLL
        return wrap(dpkt.sll.SLL)
    if linktype == 276:  # LINUX_SLL2
        return wrap(dpkt.sll2.SLL2)
    raise ValueError(f"unsupported pcap link type {linktype}")


class _Flow:
    __slots__ = ("index", "client", "isn", "last_t", "closed")

    def __init__(self, index: int, client, isn, t: float) -> None:
        self.index = index
        self.client = client
        self.isn = isn
        self.last_t = t
        self.closed = False


def _addr(raw: bytes) -> str:
    import socket

    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def read_pcap(path: str | os.PathLike, interval_ms: int = 1000, split_idle_s: float = 3600.0,
              name: str | None = None) -> Connections:
    """TCP connections of a pcap/pcapng capture as interval series (module docstring)."""
    import dpkt

    path = Path(path)
    with open(path, "rb") as fh:
        magic = fh.read(4)
        fh.seek(0)
        if magic == PCAPNG_MAGIC:
            reader = dpkt.pcapng.Reader(fh)
        elif magic in PCAP_MAGICS:
            reader = dpkt.pcap.Reader(fh)
        else:
            raise ValueError(f"{path}: not a pcap or pcapng file")
        decode = _ip_layer(reader.datalink())
        SYN, ACK, FIN, RST = dpkt.tcp.TH_SYN, dpkt.tcp.TH_ACK, dpkt.tcp.TH_FIN, dpkt.tcp.TH_RST
        open_flows: dict[tuple, _Flow] = {}
        conn_client: list[tuple] = []
        conn_server: list[tuple] = []
        conn_start: list[float] = []
        conn_end: list[float] = []
        conn_closed: list[bool] = []
        rows_c: list[int] = []
        rows_t: list[float] = []
        rows_d: list[int] = []
        rows_b: list[int] = []
        counts = {"packets": 0, "tcp_packets": 0, "non_tcp_packets": 0, "undecodable_packets": 0}
        for ts, buf in reader:
            counts["packets"] += 1
            try:
                ip = decode(buf)
            except (dpkt.UnpackError, IndexError, ValueError):
                counts["undecodable_packets"] += 1
                continue
            tcp = getattr(ip, "data", None)
            if ip is None or not isinstance(tcp, dpkt.tcp.TCP):
                counts["non_tcp_packets"] += 1
                continue
            counts["tcp_packets"] += 1
            if isinstance(ip, dpkt.ip.IP):
                payload = ip.len - ip.hl * 4 - tcp.off * 4 if ip.len else len(tcp.data)
            elif ip.nxt == 6 and ip.plen:
                payload = ip.plen - tcp.off * 4
            else:
                payload = len(tcp.data)
            payload = max(0, int(payload))
            src, dst = (ip.src, tcp.sport), (ip.dst, tcp.dport)
            key = (src, dst) if src <= dst else (dst, src)
            flags = tcp.flags
            syn_only = bool(flags & SYN) and not flags & ACK
            t = float(ts)
            flow = open_flows.get(key)
            if flow is not None:
                new_isn = syn_only and flow.isn is not None and tcp.seq != flow.isn
                if t - flow.last_t > split_idle_s or (syn_only and (flow.closed or new_isn)):
                    flow = None
            if flow is None:
                if syn_only:
                    client, isn = src, tcp.seq
                elif flags & SYN:  # SYN-ACK: the other side is the client
                    client, isn = dst, None
                else:  # handshake not captured: the lower port is the server
                    client = src if (src[1] > dst[1] or (src[1] == dst[1] and src > dst)) else dst
                    isn = None
                flow = _Flow(len(conn_start), client, isn, t)
                open_flows[key] = flow
                conn_client.append(client)
                conn_server.append(dst if client == src else src)
                conn_start.append(t)
                conn_end.append(t)
                conn_closed.append(False)
            elif syn_only and flow.isn is None:
                flow.isn = tcp.seq
            flow.last_t = t
            i = flow.index
            conn_end[i] = t
            if flags & (FIN | RST):
                flow.closed = True
                conn_closed[i] = True
            rows_c.append(i)
            rows_t.append(t)
            rows_d.append(0 if src == flow.client else 1)
            rows_b.append(payload)
    if rows_t:
        origin = min(rows_t)
    else:
        origin = 0.0
    classes: list[str] = []
    class_of: dict[str, int] = {}
    klass, ids = [], []
    for i, (c, s) in enumerate(zip(conn_client, conn_server)):
        cname = str(s[1])
        klass.append(class_of.setdefault(cname, len(class_of)))
        if len(classes) < len(class_of):
            classes.append(cname)
        ids.append(f"{_addr(c[0])}:{c[1]}>{_addr(s[0])}:{s[1]}#{i}")
    kind = [END_CLOSE if closed else END_CENSORED for closed in conn_closed]
    counts["tcp_connections"] = len(conn_start)
    return build_connections(name or path.name, interval_ms, origin, conn_start, conn_end, kind, klass,
                             classes, ids, rows_c, rows_t, rows_d, rows_b, np.ones(len(rows_t), np.int64),
                             info=counts)


# ------------------------------------------------------------------------------- CSV

CSV_HEADER = ("conn_id", "t", "dir", "bytes", "packets")


def _csv_chunks(fh, chunk_chars: int):
    """Column tuples (ids, t, dir, bytes, packets) per chunk of whole lines.

    Fast path: a chunk without quotes, comments or blank lines, exactly five
    fields per line, is split with str methods (no per-row Python); anything
    else goes through the csv module.
    """
    first = True
    while True:
        text = fh.read(chunk_chars)
        if not text:
            return
        text += fh.readline()
        if first:
            first = False
            head, _, rest = text.partition("\n")
            if head.split(",", 1)[0].strip().lower() == "conn_id":
                text = rest
        if "\r" in text:
            text = text.replace("\r", "")
        text = text.strip("\n")
        if not text:
            continue
        nlines = text.count("\n") + 1
        flat = None
        if '"' not in text and "#" not in text and "\n\n" not in text:
            flat = text.replace("\n", ",").split(",")
            if len(flat) != 5 * nlines:
                flat = None
        if flat is not None:
            yield flat[0::5], flat[1::5], flat[2::5], flat[3::5], flat[4::5]
            continue
        rows = [r for r in csv.reader(io.StringIO(text)) if r and r[0] and not r[0].startswith("#")]
        if not rows:
            continue
        if min(map(len, rows)) < 5:
            bad = next(r for r in rows if len(r) < 5)
            raise ValueError(f"need conn_id,t,dir,bytes,packets, got {','.join(bad)!r}")
        yield tuple(list(zip(*rows))[:5])


def read_csv(path: str | os.PathLike, interval_ms: int = 1000, name: str | None = None,
             chunk_chars: int = 1 << 25) -> Connections:
    """``conn_id,t,dir,bytes,packets`` rows as interval series (module docstring).

    Parsed in chunks of whole lines with numpy conversions, not a Python
    loop per row (a few seconds for ten million rows).
    """
    path = Path(path)
    index: dict[str, int] = {}
    cols_c, cols_t, cols_d, cols_b, cols_p = [], [], [], [], []
    codes = {**_DIRS, "close": 2 + END_CLOSE, "vanish": 2 + END_VANISH}
    with open(path, newline="") as fh:
        try:
            for ids, ts, dirs, nbytes, npackets in _csv_chunks(fh, chunk_chars):
                try:
                    t = np.array(ts, dtype=np.float64)
                    b = np.array(nbytes, dtype=np.int64) if all(nbytes) else \
                        np.array([x or "0" for x in nbytes], dtype=np.int64)
                    pk = np.array(npackets, dtype=np.int64) if all(npackets) else \
                        np.array([x or "0" for x in npackets], dtype=np.int64)
                except ValueError as exc:
                    raise ValueError(f"bad number: {exc}") from None
                if not np.isfinite(t).all() or (b < 0).any() or (pk < 0).any():
                    raise ValueError("t must be finite, bytes and packets >= 0")
                for cid in dict.fromkeys(ids):  # new ids, in order of appearance (C speed)
                    if cid not in index:
                        index[cid] = len(index)
                cols_c.append(np.fromiter(map(index.__getitem__, ids), np.int64, len(ids)))
                try:
                    d = np.fromiter(map(codes.__getitem__, dirs), np.int64, len(dirs))
                except KeyError:  # spaces, capitals or an unknown word: the slow way
                    d = np.array([codes.get(x.strip().lower(), -1) for x in dirs], np.int64)
                if (d < 0).any():
                    bad = dirs[int(np.flatnonzero(d < 0)[0])]
                    raise ValueError(f"dir must be in, out, close or vanish, got {bad!r}")
                cols_t.append(t)
                cols_d.append(d)
                cols_b.append(b)
                cols_p.append(pk)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    n = len(index)
    if cols_c:
        conn, t, d = np.concatenate(cols_c), np.concatenate(cols_t), np.concatenate(cols_d)
        b, pk = np.concatenate(cols_b), np.concatenate(cols_p)
    else:
        conn = d = b = pk = np.zeros(0, np.int64)
        t = np.zeros(0)
    first_t = np.full(n, np.inf)
    last_t = np.full(n, -np.inf)
    np.minimum.at(first_t, conn, t)
    np.maximum.at(last_t, conn, t)
    kind = np.full(n, END_CENSORED, np.uint8)
    marker = d >= 2
    if marker.any():
        m_conn = conn[marker]
        if np.bincount(m_conn, minlength=n).max() > 1:
            raise ValueError(f"{path}: a connection has two end markers")
        kind[m_conn] = (d[marker] - 2).astype(np.uint8)
        # nothing may follow a marker (in file order)
        m_row = np.full(n, np.iinfo(np.int64).max)
        m_row[m_conn] = np.flatnonzero(marker)
        rows = np.arange(conn.size)
        late = ~marker & (rows > m_row[conn])
        if late.any():
            cid = list(index)[int(conn[np.flatnonzero(late)[0]])]
            raise ValueError(f"{path}: connection {cid!r} has a row after its end marker")
    data = ~marker
    step = interval_ms / 1000.0
    origin = math.floor(float(first_t.min()) / step) * step if n else 0.0
    return build_connections(name or path.name, interval_ms, origin, first_t, last_t, kind,
                             np.zeros(n, np.int32), [""], list(index), conn[data], t[data], d[data], b[data],
                             pk[data], info={"rows": int(conn.size)})


def write_csv(conns: Connections, path: str | os.PathLike) -> None:
    """Write ``conns`` as ``conn_id,t,dir,bytes,packets`` (times relative to the
    origin, mid-interval, so :func:`read_csv` gives back the same intervals)."""
    step = conns.interval_ms / 1000.0
    ids = np.array(conns.ids, dtype=object)
    has_start = np.zeros(len(conns), bool)
    has_start[conns.ev_conn[conns.ev_k == conns.start[conns.ev_conn]]] = True
    parts = []  # (t, order, conn, dir code, bytes, packets); dir code 0 in, 1 out, 2 close, 3 vanish
    def part(k, frac, order, conn, d, b, p):
        parts.append(((k + frac) * step, np.full(k.size, order), conn, np.broadcast_to(d, k.shape), b, p))

    c = np.flatnonzero(~has_start)
    part(conns.start[c], 0.5, 0, c, 0, np.zeros(c.size, np.int64), np.zeros(c.size, np.int64))
    eb, ep = conns.ev_bytes, conns.ev_packets
    has_in = (eb[:, 0] > 0) | (ep[:, 0] > 0)
    has_out = (eb[:, 1] > 0) | (ep[:, 1] > 0)
    m = has_in | ~has_out
    part(conns.ev_k[m], 0.5, 1, conns.ev_conn[m], 0, eb[m, 0], ep[m, 0])
    part(conns.ev_k[has_out], 0.5, 1, conns.ev_conn[has_out], 1, eb[has_out, 1], ep[has_out, 1])
    c = np.flatnonzero(conns.end_kind == END_CENSORED)  # the last interval must show, even if empty
    part(conns.end[c], 0.5, 1, c, 0, np.zeros(c.size, np.int64), np.zeros(c.size, np.int64))
    c = np.flatnonzero(conns.end_kind != END_CENSORED)
    part(conns.end[c], 0.75, 2, c, np.where(conns.end_kind[c] == END_CLOSE, 2, 3), np.zeros(c.size, np.int64),
         np.zeros(c.size, np.int64))
    t, order, conn, d, b, p = (np.concatenate([x[i] for x in parts]) for i in range(6))
    srt = np.lexsort((conn, order, t))
    names = np.array(["in", "out", "close", "vanish"], dtype=object)
    t_txt = np.char.mod("%.6f", t[srt])
    with open(path, "w", newline="") as fh:
        fh.write(",".join(CSV_HEADER) + "\n")
        lines = (f"{i},{tt},{dd},{bb},{pp}\n" for i, tt, dd, bb, pp in
                 zip(ids[conn[srt]].tolist(), t_txt.tolist(), names[d[srt]].tolist(), b[srt].tolist(),
                     p[srt].tolist()))
        fh.writelines(lines)


def is_pcap(path: str | os.PathLike) -> bool:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    return magic == PCAPNG_MAGIC or magic in PCAP_MAGICS


def load_trace(path: str | os.PathLike, interval_ms: int = 1000, split_idle_s: float = 3600.0) -> Connections:
    """A pcap/pcapng (by magic number) or a CSV trace."""
    if is_pcap(path):
        return read_pcap(path, interval_ms, split_idle_s)
    return read_csv(path, interval_ms)
