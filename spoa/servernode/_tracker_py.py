"""Segment tracker, pure Python: the reference twin of cext/spoa/servernode/_tracker.pyx.

Per connection and direction (in: client -> HAProxy, out: HAProxy -> client)
the byte stream [0, total) is tiled by segments: each covers
[start_byte_offset, start_byte_offset + byte_count) and has a capacity (its
nominal size); new bytes fill the last segment (the tail) up to its capacity,
then open new segments sized by the direction's granularity level
(segment_size >> level, within [min_segment_size, max_segment_size]).

Rules (docs/tracker.md explains them; both twins implement exactly these):
- Counters are cumulative (the kernel's); an update attributes the delta since
  the previous one. A counter that goes backwards is counted
  (counter_resets) and re-based, never subtracted.
- Bytes land exactly: the update's byte range [T, T + delta) is cut along
  segment boundaries. Packets are shared in proportion to those bytes:
  floor(P * b_i / B) each, the rest one by one by largest remainder (ties go
  to the later segment); packets with no bytes (pure ACKs, keep-alives) go to
  the tail.
- Every segment that received bytes in an update gets the update's
  last-activity timestamp.
- end_interval: a tail that received >= split_bytes in the interval is hot:
  the direction's level rises by one (finer) and the tail is split in two
  halves of its capacity, its interval bytes re-cut exactly by the interval's
  byte range and its packets shared as above (a tail holding no more than
  half its capacity is only narrowed to that half). A tail idle for >= idle_ms
  lowers the level by one (coarser). Adjacent segments that are full and idle
  (nothing in the interval, last activity >= idle_ms ago) merge while the
  merged capacity stays <= max_segment_size.
- Bounds: a connection over max_segments_per_connection, or the tracker over
  max_total_segments, merges its adjacent pair with the smallest combined
  byte_count (ties: the lowest offset) until back under: coarser, never lost.
- level of a segment = bit_length(segment_size) - bit_length(capacity).

Keys are bytes of 1..KEY_MAX (the product's: records.pack_key, 36 bytes);
addresses come back as inet_ntop text of their packed form (IPv4-mapped as
dotted IPv4), as the compiled twin stores them. Bad keys, addresses, ports and
one-byte fields raise the same errors in both twins. Connections are kept in
registration order (the dict's), which the compiled twin reproduces.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from ..wire.packet import RecordBatch
from ..wire.records import (
    DIR_IN,
    DIR_OUT,
    ConnectionRecord,
    ConnFlags,
    CounterSource,
    LeaseSource,
    SegmentRecord,
    pack_address,
    unpack_address,
)

KEY_MAX = 40  # longest key, bytes (the compiled twin stores keys inline); records.pack_key gives 36


def _check_key(key: object) -> None:
    """Keys are bytes of 1..KEY_MAX (the product's: records.pack_key)."""
    if not isinstance(key, bytes):
        raise TypeError(f"key must be bytes, not {type(key).__name__}")
    if not 1 <= len(key) <= KEY_MAX:
        raise ValueError(f"key must be 1 to {KEY_MAX} bytes, got {len(key)}")


def _address(text: object) -> str:
    """IPv4/IPv6 text as the compiled twin gives it back: packed (IPv4 as
    IPv4-mapped), then inet_ntop, IPv4-mapped as dotted IPv4."""
    if not isinstance(text, str):
        raise TypeError(f"address must be str, not {type(text).__name__}")
    try:
        return unpack_address(pack_address(text))
    except (OSError, ValueError):  # UnicodeError is a ValueError
        raise ValueError(f"not an IPv4 or IPv6 address: {text!r}") from None


def _check_port(port: object) -> None:
    if not isinstance(port, int):
        raise TypeError(f"port must be int, not {type(port).__name__}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0..65535, got {port}")


def _check_lease(name: str, value: object) -> None:
    """lease durations: u32 ms, as the publishing packet carries them."""
    if not isinstance(value, int):
        raise TypeError(f"{name} must be int, not {type(value).__name__}")
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} must be 0..4294967295, got {value}")


def _quiet(conn: _Connection) -> bool:
    """Nothing moved in any of its segments this interval."""
    return not any(seg.bytes_interval or seg.packets_interval for d in conn.dirs for seg in d.segments)


def _check_conn_id(conn_id: object) -> None:
    if not isinstance(conn_id, bytes):
        raise TypeError("conn_id must be bytes")
    if len(conn_id) != 16:
        raise ValueError("conn_id must be 16 bytes")


def _check_level(level: int) -> None:
    """granularity levels: one signed byte, as the hint carries them."""
    if not -128 <= level <= 127:
        raise ValueError(f"level must be -128..127, got {level}")


def _check_small(name: str, value: int) -> None:
    """flags and sources: one byte each in the compiled twin."""
    if not 0 <= value <= 255:
        raise ValueError(f"{name} must be 0..255, got {value}")


# The fields apply_sample reads from each sample value (a TcpSample), in this
# order, and their upper bounds: the kernel's tcp_info widths, u32 for the "ms ago".
SAMPLE_FIELDS = ("state", "bytes_received", "data_segs_in", "last_data_recv_ms",
                 "bytes_acked", "data_segs_out", "last_data_sent_ms")
_SAMPLE_MAX = (0xFF, 2**64 - 1, 2**64 - 1, 0xFFFFFFFF, 2**64 - 1, 2**64 - 1, 0xFFFFFFFF)
_MISSING = object()


def _sample_fields(key: bytes, value: object) -> tuple[int, ...]:
    """The SAMPLE_FIELDS of one sample value, checked (the compiled twin's read_sample)."""
    out = []
    for name, top in zip(SAMPLE_FIELDS, _SAMPLE_MAX):
        x = getattr(value, name, _MISSING)
        if x is _MISSING:
            raise TypeError(f"sample value of key {key.hex()} has no {name}: "
                            f"{type(value).__name__} is not a TcpSample")
        if not isinstance(x, int):
            raise TypeError(f"{name} of the sample of key {key.hex()} must be int, not {type(x).__name__}")
        if not 0 <= x <= top:
            raise ValueError(f"{name} of the sample of key {key.hex()} must be 0..{top}, got {x}")
        out.append(int(x))
    return tuple(out)


def _state_mask(states: Any) -> int:
    """Bit s set for each TCP state s (an int 0..255) of `states`."""
    mask = 0
    for state in states:
        if not isinstance(state, int):
            raise TypeError(f"closing_states must hold ints, not {type(state).__name__}")
        if not 0 <= state <= 255:
            raise ValueError(f"closing_states must hold 0..255, got {state}")
        mask |= 1 << state
    return mask


def share(total: int, weights: list[int]) -> list[int]:
    """Split `total` in proportion to `weights` (largest remainder, ties to the later one)."""
    whole = sum(weights)
    if whole == 0:
        return [0] * len(weights)
    parts = [total * w // whole for w in weights]
    rest = total - sum(parts)
    if rest:
        # remainder numerator total*w % whole; later index wins ties
        order = sorted(range(len(weights)), key=lambda i: (total * weights[i] % whole, i), reverse=True)
        for i in order[:rest]:
            parts[i] += 1
    return parts


class _Segment:
    __slots__ = ("start", "count", "capacity", "bytes_interval", "packets_interval", "last_activity", "level")

    def __init__(self, start: int, capacity: int, level: int) -> None:
        self.start = start
        self.count = 0
        self.capacity = capacity
        self.bytes_interval = 0
        self.packets_interval = 0
        self.last_activity = 0
        self.level = level


class _Direction:
    __slots__ = ("segments", "total", "bytes_counter", "packets_counter", "interval_start", "level")

    def __init__(self, capacity: int, segment_level: int) -> None:
        self.segments = [_Segment(0, capacity, segment_level)]
        self.total = 0  # bytes attributed so far == sum of byte_count
        self.bytes_counter = 0  # last cumulative counter seen
        self.packets_counter = 0
        self.interval_start = 0  # total at the start of the interval
        self.level = 0


class _Connection:
    __slots__ = (
        "key", "conn_id", "src", "src_port", "dst", "dst_port", "frontend", "flags", "source",
        "last_seen", "requested_lease", "predicted_lease", "publish_after", "lease_source", "dirs",
        # the last hint: (source, level, anomaly 0/1, received unix ms), its lease is predicted_lease; or None
        "hint",
        "last_published",  # unix ms publish(now) last built its record, or None
    )


class SegmentTracker:
    def __init__(
        self,
        segment_size: int = 1 << 20,
        min_segment_size: int = 64 << 10,
        max_segment_size: int = 64 << 20,
        split_bytes: int = 256 << 10,
        idle_ms: int = 5000,
        max_segments_per_connection: int = 16,
        max_total_segments: int = 4_000_000,
        max_connections: int = 1_000_000,
        expire_ms: int = 300_000,
    ) -> None:
        if not 1 <= min_segment_size <= segment_size <= max_segment_size:
            raise ValueError("need 1 <= min_segment_size <= segment_size <= max_segment_size")
        if max_segments_per_connection < 2 or max_total_segments < 2 * max_segments_per_connection:
            raise ValueError("need max_segments_per_connection >= 2 and max_total_segments >= 2x that")
        self.segment_size = segment_size
        self.min_segment_size = min_segment_size
        self.max_segment_size = max_segment_size
        self.split_bytes = split_bytes
        self.idle_ms = idle_ms
        self.max_segments_per_connection = max_segments_per_connection
        self.max_total_segments = max_total_segments
        self.max_connections = max_connections
        self.expire_ms = expire_ms
        self._conns: dict[bytes, _Connection] = {}  # insertion order is the registration order
        # conn_id -> connection, for hints; of two live connections with one id, the later registered
        self._ids: dict[bytes, _Connection] = {}
        self._closed: list[ConnectionRecord] = []
        self.total_segments = 0
        self.set_refresh(1000, 0.34, 5000)
        self.stats = dict.fromkeys(
            ("registered", "refused", "closed", "expired", "counter_resets", "splits", "merges", "coarsened",
             "unknown_updates", "deferred"), 0
        )

    # -- sizes and levels ---------------------------------------------------------
    def _capacity(self, level: int) -> int:
        size = self.segment_size >> level if level >= 0 else self.segment_size << -level
        return min(max(size, self.min_segment_size), self.max_segment_size)

    def _level_of(self, capacity: int) -> int:
        return self.segment_size.bit_length() - capacity.bit_length()

    # -- registration and lifecycle ----------------------------------------------------
    def register(self, key: bytes, conn_id: bytes, src: str, src_port: int, dst: str, dst_port: int,
                 frontend: str, now_ms: int) -> bool:
        _check_key(key)
        _check_conn_id(conn_id)
        src = _address(src)
        _check_port(src_port)
        dst = _address(dst)
        _check_port(dst_port)
        if not isinstance(frontend, str):
            raise TypeError(f"frontend must be str, not {type(frontend).__name__}")
        conn = self._conns.get(key)
        if conn is not None:
            if conn.conn_id == conn_id:
                conn.last_seen = now_ms
                return True
            self.close(key, now_ms)  # the 4-tuple was reused: the old connection is over
        if len(self._conns) >= self.max_connections:
            self.stats["refused"] += 1
            return False
        conn = _Connection()
        conn.key = key
        conn.conn_id = conn_id
        conn.src, conn.src_port, conn.dst, conn.dst_port = src, src_port, dst, dst_port
        conn.frontend = frontend
        conn.flags = 0
        conn.source = int(CounterSource.NONE)
        conn.last_seen = now_ms
        conn.requested_lease = conn.predicted_lease = 0
        conn.publish_after = 0
        conn.lease_source = int(LeaseSource.STANDARD)
        conn.hint = conn.last_published = None
        base = self._capacity(0)
        conn.dirs = (_Direction(base, self._level_of(base)), _Direction(base, self._level_of(base)))
        self._conns[key] = conn
        self._ids[conn_id] = conn
        self.total_segments += 2
        self.stats["registered"] += 1
        return True

    def set_closing(self, key: bytes) -> None:
        _check_key(key)
        conn = self._conns.get(key)
        if conn is not None:
            conn.flags |= ConnFlags.CLOSING

    def set_lease(self, key: bytes, requested_ms: int, predicted_ms: int, lease_source: int) -> None:
        _check_key(key)
        _check_lease("requested_ms", requested_ms)
        _check_lease("predicted_ms", predicted_ms)
        _check_small("lease_source", lease_source)
        conn = self._conns.get(key)
        if conn is not None:
            conn.requested_lease, conn.predicted_lease, conn.lease_source = requested_ms, predicted_ms, lease_source

    def set_refresh(self, interval_ms: int, refresh_fraction: float, hint_ttl_ms: int) -> None:
        """The cadence of connections under a predicted lease (see set_hint)."""
        self.refresh_interval_ms = interval_ms
        self.refresh_fraction = float(refresh_fraction)
        self.hint_ttl_ms = hint_ttl_ms

    def set_hint(self, conn_id: bytes, lease_ms: int, source: int, level: int, anomaly: bool, now_ms: int,
                 requested_ms: int, lease_source: int) -> bool:
        """The LB node's hint for the connection of conn_id, received at now_ms,
        and the lease it puts in force (set_lease's requested_ms and lease_source;
        its predicted_ms is the hint's lease_ms). False if no live connection has
        that id. Under a predicted lease a quiet connection is then published
        every max(interval, lease * refresh_fraction) from its last record, and
        not later than the hint stays fresh (received + hint_ttl_ms): the time
        set here and at each publish(now)."""
        _check_conn_id(conn_id)
        _check_lease("lease_ms", lease_ms)
        _check_lease("requested_ms", requested_ms)
        _check_small("source", source)
        _check_small("lease_source", lease_source)
        _check_level(level)
        conn = self._ids.get(conn_id)
        if conn is None:
            return False
        conn.requested_lease, conn.predicted_lease, conn.lease_source = requested_ms, lease_ms, lease_source
        conn.hint = (source, level, 1 if anomaly else 0, now_ms)
        conn.publish_after = self._refresh_after(conn)
        return True

    def hint(self, key: bytes) -> tuple[int, int, int, int, int] | None:
        """The last hint of the key's connection, (lease_ms, source, level,
        anomaly 0/1, received unix ms), or None (no hint, or not tracked)."""
        _check_key(key)
        conn = self._conns.get(key)
        if conn is None or conn.hint is None:
            return None
        return (conn.predicted_lease, *conn.hint)

    def _refresh_after(self, conn: _Connection) -> int:
        """publish_after of a hinted connection (set_hint): 0 unless published under a predicted lease."""
        if conn.last_published is None or conn.lease_source != LeaseSource.PREDICTED:
            return 0
        wait = max(self.refresh_interval_ms, math.ceil(conn.predicted_lease * self.refresh_fraction))
        return min(conn.last_published + wait, conn.hint[3] + self.hint_ttl_ms + 1)

    def _published(self, conn: _Connection, now_ms: int) -> None:
        """Its record went out at now_ms: the next refresh follows (set_hint)."""
        conn.last_published = now_ms
        if conn.hint is not None:
            conn.publish_after = self._refresh_after(conn)

    def set_publish_after(self, key: bytes, after_ms: int) -> None:
        """publish(now_ms) leaves the connection out while it is quiet (nothing
        moved in the interval) and now_ms < after_ms; 0: never left out."""
        _check_key(key)
        conn = self._conns.get(key)
        if conn is not None:
            conn.publish_after = after_ms

    def close(self, key: bytes, now_ms: int, flags: int = ConnFlags.CLOSED) -> bool:
        """Final report for this connection goes out with the next publish()."""
        _check_key(key)
        _check_small("flags", flags)
        conn = self._conns.pop(key, None)
        if conn is None:
            return False
        if self._ids.get(conn.conn_id) is conn:
            del self._ids[conn.conn_id]
        conn.flags |= flags
        self.total_segments -= len(conn.dirs[0].segments) + len(conn.dirs[1].segments)
        self._closed.append(self._record(conn))
        self.stats["expired" if flags & ConnFlags.EXPIRED else "closed"] += 1
        return True

    # -- counters ----------------------------------------------------------------------------
    def update(self, key: bytes, direction: int, bytes_total: int, packets_total: int,
               last_activity_ms: int, source: int) -> bool:
        _check_key(key)
        conn = self._conns.get(key)
        if conn is None:
            self.stats["unknown_updates"] += 1
            return False
        if direction != DIR_IN and direction != DIR_OUT:
            raise ValueError("direction must be DIR_IN or DIR_OUT")
        _check_small("source", source)
        if bytes_total < 0 or packets_total < 0:
            raise OverflowError("counters are unsigned")
        if self._count_update(conn, direction, bytes_total, packets_total, last_activity_ms, source):
            self.stats["counter_resets"] += 1
        return True

    def _count_update(self, conn: _Connection, direction: int, bytes_total: int, packets_total: int,
                      last_activity_ms: int, source: int) -> bool:
        """Apply one cumulative counter pair; True when it went backwards (a reset)."""
        conn.source = source
        if last_activity_ms > conn.last_seen:
            conn.last_seen = last_activity_ms
        d = conn.dirs[direction]
        if bytes_total < d.bytes_counter or packets_total < d.packets_counter:
            d.bytes_counter, d.packets_counter = bytes_total, packets_total
            return True
        delta_bytes = bytes_total - d.bytes_counter
        delta_packets = packets_total - d.packets_counter
        d.bytes_counter, d.packets_counter = bytes_total, packets_total
        if delta_bytes or delta_packets:
            self._attribute(conn, d, delta_bytes, delta_packets, last_activity_ms)
        return False

    def update_batch(self, keys: list, direction: int, bytes_totals: Any, packets_totals: Any,
                     last_activity_ms: Any, source: int) -> int:
        """update() for many connections of one direction at once (e.g. a kernel sample).

        The counter arguments are sequences (array.array, numpy arrays, lists)
        aligned with `keys`. Every key is checked before any update. Returns
        how many keys were known.
        """
        keys = list(keys)
        if not len(keys) == len(bytes_totals) == len(packets_totals) == len(last_activity_ms):
            raise ValueError("keys and counters must have the same length")
        if direction != DIR_IN and direction != DIR_OUT:
            raise ValueError("direction must be DIR_IN or DIR_OUT")
        _check_small("source", source)
        for key in keys:
            _check_key(key)
        known = 0
        for i, key in enumerate(keys):
            known += self.update(key, direction, int(bytes_totals[i]), int(packets_totals[i]),
                                 int(last_activity_ms[i]), source)
        return known

    def touch(self, key: bytes, now_ms: int) -> None:
        """The connection is known alive (e.g. seen in the kernel dump)."""
        _check_key(key)
        conn = self._conns.get(key)
        if conn is not None and now_ms > conn.last_seen:
            conn.last_seen = now_ms

    def touch_batch(self, keys: list, now_ms: int) -> None:
        """touch() for many connections at once (e.g. every socket of a kernel
        sample): one call instead of one per connection. Every key is checked
        before any is touched, as in update_batch()."""
        keys = list(keys)
        for key in keys:
            _check_key(key)
        for key in keys:
            self.touch(key, now_ms)

    def apply_sample(self, sample: dict, now_ms: int, source: int, closing_states: Any,
                     close_missing: bool) -> tuple[int, int]:
        """Join a kernel sample (KernelSampler.sample(): pack_key -> TcpSample) to the
        tracked connections, in one call; returns (known, closed).

        - Every tracked connection whose key is in `sample` gets, as update_batch
          would, a DIR_IN update (bytes_received, data_segs_in, now_ms -
          last_data_recv_ms) and a DIR_OUT one (bytes_acked, data_segs_out, now_ms
          - last_data_sent_ms) with counter source `source` (counter resets
          counted), is touched (last seen = now_ms if later) and, when the
          sample's `state` is in `closing_states` (TCP states, ints 0..255), marked
          closing. `known` counts them.
        - If `close_missing` is true, or `known` > 0 (the sample shows this
          tracker's sockets, so one missing has closed), every tracked connection
          missing from the sample is closed as by close(key, now_ms), in
          registration order (their final records come out of publish() in that
          order). `closed` counts them.
        - Sample keys that are not tracked are ignored (not unknown_updates).

        Checked before anything changes: `sample` is a dict (TypeError), its keys
        bytes (TypeError; any length: one that no key can have is just untracked),
        every value has the SAMPLE_FIELDS attributes (TypeError), each an int
        (TypeError) within its range (ValueError): state 0..255, byte and packet
        counters 0..2^64-1, last_data_*_ms 0..2^32-1 (tcp_info's u32); source
        0..255 and closing_states as said (ValueError/TypeError). The messages
        name the field and the key, the same in both twins. Once those hold,
        only a MemoryError can stop it half-way.
        """
        if not isinstance(sample, dict):
            raise TypeError(f"sample must be a dict, not {type(sample).__name__}")
        _check_small("source", source)
        closing = _state_mask(closing_states)
        rows = []
        for key, value in sample.items():
            if not isinstance(key, bytes):
                raise TypeError(f"sample keys must be bytes, not {type(key).__name__}")
            rows.append((key, _sample_fields(key, value)))
        conns = self._conns
        known = resets = 0
        try:
            for key, (state, bytes_in, packets_in, recv_ago, bytes_out, packets_out, sent_ago) in rows:
                conn = conns.get(key)
                if conn is None:
                    continue
                known += 1
                if closing >> state & 1:
                    conn.flags |= ConnFlags.CLOSING
                resets += self._count_update(conn, DIR_IN, bytes_in, packets_in, now_ms - recv_ago, source)
                resets += self._count_update(conn, DIR_OUT, bytes_out, packets_out, now_ms - sent_ago, source)
                if now_ms > conn.last_seen:
                    conn.last_seen = now_ms
        finally:
            if resets:
                self.stats["counter_resets"] += resets
        closed = 0
        if known < len(conns) and (close_missing or known):
            for key in [key for key in conns if key not in sample]:
                self.close(key, now_ms)
                closed += 1
        return known, closed

    def _attribute(self, conn: _Connection, d: _Direction, delta_bytes: int, delta_packets: int,
                   stamp: int) -> None:
        segs = d.segments
        if delta_bytes == 0:
            tail = segs[-1]
            tail.packets_interval += delta_packets
            return
        remaining = delta_bytes
        touched: list[_Segment] = []
        pieces: list[int] = []
        while remaining:
            tail = segs[-1]
            room = tail.capacity - tail.count
            if room == 0:
                cap = self._capacity(d.level)
                tail = _Segment(tail.start + tail.count, cap, self._level_of(cap))
                segs.append(tail)
                self.total_segments += 1
                room = cap
            take = min(room, remaining)
            tail.count += take
            tail.bytes_interval += take
            tail.last_activity = stamp
            remaining -= take
            touched.append(tail)
            pieces.append(take)
        d.total += delta_bytes
        for seg, packets in zip(touched, share(delta_packets, pieces)):
            seg.packets_interval += packets
        self._enforce_connection_bound(conn)

    # -- intervals --------------------------------------------------------------------------------
    def begin_interval(self, now_ms: int) -> None:
        for conn in self._conns.values():
            for d in conn.dirs:
                d.interval_start = d.total
                for seg in d.segments:
                    seg.bytes_interval = 0
                    seg.packets_interval = 0

    def end_interval(self, now_ms: int) -> None:
        expired = []
        for key, conn in self._conns.items():
            for d in conn.dirs:
                self._adapt(d, now_ms)
            self._enforce_connection_bound(conn)
            if now_ms - conn.last_seen >= self.expire_ms:
                expired.append(key)
        for key in expired:
            self.close(key, now_ms, ConnFlags.EXPIRED)
        self._enforce_total_bound()

    def _adapt(self, d: _Direction, now_ms: int) -> None:
        segs = d.segments
        tail = segs[-1]
        if tail.bytes_interval >= self.split_bytes and tail.bytes_interval > 0:
            if self._capacity(d.level + 1) < self._capacity(d.level):
                d.level += 1
            if tail.capacity >= 2 * self.min_segment_size:
                self._split_tail(d)
        elif tail.bytes_interval == 0 and now_ms - tail.last_activity >= self.idle_ms:
            if self._capacity(d.level - 1) > self._capacity(d.level):
                d.level -= 1
        self._merge_idle(d, now_ms)

    def _split_tail(self, d: _Direction) -> None:
        segs = d.segments
        tail = segs[-1]
        half = tail.capacity // 2
        self.stats["splits"] += 1
        if tail.count <= half:
            # Nothing lies past the half yet: narrowing the tail is the split.
            tail.capacity = half
            tail.level = self._level_of(half)
            return
        second = _Segment(tail.start + half, tail.capacity - half, self._level_of(tail.capacity - half))
        second.count = tail.count - half
        tail.count = half
        tail.capacity = half
        tail.level = self._level_of(half)
        lo, hi = d.interval_start, d.total
        first_bytes = max(0, min(hi, tail.start + tail.count) - max(lo, tail.start))
        second_bytes = tail.bytes_interval - first_bytes
        first_packets, second_packets = share(tail.packets_interval, [first_bytes, second_bytes])
        tail.bytes_interval, second.bytes_interval = first_bytes, second_bytes
        tail.packets_interval, second.packets_interval = first_packets, second_packets
        second.last_activity = tail.last_activity
        segs.append(second)
        self.total_segments += 1

    def _idle(self, seg: _Segment, now_ms: int) -> bool:
        return (seg.count == seg.capacity and seg.bytes_interval == 0 and seg.packets_interval == 0
                and now_ms - seg.last_activity >= self.idle_ms)

    def _merge_idle(self, d: _Direction, now_ms: int) -> None:
        segs = d.segments
        i = 0
        while i + 1 < len(segs):
            a, b = segs[i], segs[i + 1]
            if self._idle(a, now_ms) and self._idle(b, now_ms) and a.capacity + b.capacity <= self.max_segment_size:
                self._merge_pair(segs, i)
            else:
                i += 1

    def _merge_pair(self, segs: list[_Segment], i: int) -> None:
        a, b = segs[i], segs[i + 1]
        a.count += b.count
        a.capacity += b.capacity
        a.bytes_interval += b.bytes_interval
        a.packets_interval += b.packets_interval
        a.last_activity = max(a.last_activity, b.last_activity)
        a.level = self._level_of(a.capacity)
        del segs[i + 1]
        self.total_segments -= 1
        self.stats["merges"] += 1

    def _coarsen_once(self, conn: _Connection) -> bool:
        """Merge the connection's adjacent pair with the smallest combined byte_count."""
        best = None
        for direction, d in enumerate(conn.dirs):
            segs = d.segments
            for i in range(len(segs) - 1):
                size = segs[i].count + segs[i + 1].count
                if best is None or size < best[0]:  # scan order: ties keep the lowest offset
                    best = (size, direction, i)
        if best is None:
            return False
        self._merge_pair(conn.dirs[best[1]].segments, best[2])
        self.stats["coarsened"] += 1
        return True

    def _enforce_connection_bound(self, conn: _Connection) -> None:
        while len(conn.dirs[0].segments) + len(conn.dirs[1].segments) > self.max_segments_per_connection:
            if not self._coarsen_once(conn):
                break

    def _enforce_total_bound(self) -> None:
        if self.total_segments <= self.max_total_segments:
            return
        by_size = sorted(self._conns.values(),
                         key=lambda c: len(c.dirs[0].segments) + len(c.dirs[1].segments), reverse=True)
        for conn in by_size:
            while self.total_segments > self.max_total_segments and self._coarsen_once(conn):
                pass
            if self.total_segments <= self.max_total_segments:
                return

    # -- output ----------------------------------------------------------------------------------
    @staticmethod
    def _segment_records(conn: _Connection) -> tuple[SegmentRecord, ...]:
        return tuple(
            SegmentRecord(direction, s.start, s.count, s.bytes_interval, s.packets_interval, s.last_activity, s.level)
            for direction, d in enumerate(conn.dirs)
            for s in d.segments
        )

    def _record(self, conn: _Connection) -> ConnectionRecord:
        return ConnectionRecord(
            conn_id=conn.conn_id, src=conn.src, src_port=conn.src_port, dst=conn.dst, dst_port=conn.dst_port,
            frontend=conn.frontend, flags=int(conn.flags), counter_source=conn.source,
            granularity_level=max(conn.dirs[0].level, conn.dirs[1].level),
            requested_lease_ms=conn.requested_lease, predicted_lease_ms=conn.predicted_lease,
            lease_source=conn.lease_source, bytes_in_total=conn.dirs[0].total,
            bytes_out_total=conn.dirs[1].total, segments=self._segment_records(conn),
        )

    def snapshot(self, key: bytes) -> ConnectionRecord | None:
        _check_key(key)
        conn = self._conns.get(key)
        return None if conn is None else self._record(conn)

    def publish(self, now_ms: int | None = None) -> list[ConnectionRecord]:
        """Records of every live connection, then the final ones closed since last time.

        With now_ms, a live connection that was quiet this interval and whose
        set_publish_after() time is still ahead is left out (counted `deferred`):
        its record is not even built; one whose record is built counts as
        published at now_ms (its next refresh time follows, see set_hint)."""
        out = []
        deferred = 0
        for conn in self._conns.values():
            if now_ms is not None and conn.publish_after > now_ms and _quiet(conn):
                deferred += 1
            else:
                out.append(self._record(conn))
                if now_ms is not None:
                    self._published(conn, now_ms)
        if deferred:
            self.stats["deferred"] += deferred
        out.extend(self._closed)
        self._closed = []
        return out

    def publish_batch(self, now_ms: int) -> RecordBatch:
        """publish(now_ms) in wire form: a spoa.wire.packet.RecordBatch of the same records (the
        compiled twin writes it from its slab, no record object per live connection). Errors
        are publish() + RecordBatch.from_records()'s: every due connection counts as published
        even when one record cannot be encoded."""
        return RecordBatch.from_records(self.publish(now_ms))

    def keys(self) -> list[bytes]:
        """Live keys in registration order."""
        return list(self._conns)

    def __len__(self) -> int:
        return len(self._conns)

    def __contains__(self, key: object) -> bool:
        _check_key(key)
        return key in self._conns

    def memory_bytes(self) -> int:
        """An estimate of the bytes this tracker holds for its connections:
        sys.getsizeof of the dict and of every object a connection reaches
        (key, connection, directions, segment lists, segments, their ints and
        strings), each object counted once. Allocator overhead and the final
        records waiting for publish() are not counted (as in the compiled twin)."""
        seen: set[int] = set()

        def size(obj: object) -> int:
            if id(obj) in seen:
                return 0
            seen.add(id(obj))
            return sys.getsizeof(obj)

        total = size(self._conns) + size(self._ids)
        for key, conn in self._conns.items():
            total += size(key) + size(conn) + size(conn.dirs)
            total += sum(size(getattr(conn, name)) for name in _Connection.__slots__ if name != "dirs")
            for d in conn.dirs:
                total += size(d) + size(d.segments) + sum(size(getattr(d, name)) for name in _Direction.__slots__)
                for seg in d.segments:
                    total += size(seg) + sum(size(getattr(seg, name)) for name in _Segment.__slots__)
        return total
