"""Ring deltas: a chunk's records carry only the newest cells of each history ring.

A connection's record holds rings (forecast.History: the rolling history, 32 cells, the
activity policy's silences, 8; a segment's bytes per interval, 8): most of a record's bytes,
of which an interval changes one cell. A base (rows.py, segments.py) holds them whole; a
chunk's records (a "delta" record) hold instead each ring's last DELTA_CELLS cells, newest
first (`X.last`), next to its position and count (`X.pos`, `X.count`), every other field
whole. A loader (`replay`) rebuilds each ring from the last record that gives it whole (an
anchor) and the cells of the records written after it, in order.

Why that is exact: a ring advances at most one cell per interval, and only in an interval in
which its connection is refreshed (LeaseTable.end_interval, SegmentHistory.end_interval,
ActivityPolicy.observe push into the rows refreshed in it), and every refreshed connection of
an owned slot has a record in that interval's chunk. So between a connection's record and its
record before the previous one a ring advances at most 2 cells: one lost chunk (a primary's
failover losing its last acknowledged write) is repaired by the next, whose 2 cells cover it.
A reset (a new connection, a segment restarted) leaves a ring with at most DELTA_CELLS cells
filled, all of them in the record: such a record is an anchor too (NaN elsewhere), and so is a
connection's first record. A record that follows its predecessor by more than DELTA_CELLS cells,
or whose count does not follow from it, cannot be exact (two chunks in a row lost): it is
applied all the same (its cells over what came before) and counted (`inexact`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

DELTA_CELLS = 2  # a delta record's cells of each ring: one lost chunk repaired by the next


class Ring(NamedTuple):
    """A ring's fields in a record: whole (`buf`) in a base, its last cells (`last`) in a delta."""
    buf: str
    last: str
    pos: str
    count: str
    length: int


def delta_dtype(dtype: np.dtype, rings: list[Ring]) -> np.dtype:
    """A base record's dtype with each ring's whole buffer replaced by its last DELTA_CELLS cells."""
    whole = {ring.buf: ring for ring in rings}
    fields = []
    for name in dtype.names:
        kind = dtype.fields[name][0]
        if name in whole:
            fields.append((whole[name].last, kind.base, (DELTA_CELLS,)))
        else:
            fields.append((name, kind))
    return np.dtype(fields)


def last_cells(buf: np.ndarray, pos: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """Into `out` (n x DELTA_CELLS): rows' last cells of ring `buf` (capacity x length, next cell
    to write `pos`), newest first; gathered from the flat buffer, no ring copied whole."""
    length = buf.shape[1]
    flat = buf.reshape(-1)
    at = rows.astype(np.intp) * length
    nxt = pos[rows].astype(np.intp) + length
    for j in range(DELTA_CELLS):
        out[:, j] = flat[at + (nxt - 1 - j) % length]


def _before(values: np.ndarray) -> np.ndarray:
    """values shifted one place on (the first gets 0)."""
    out = np.empty_like(values)
    out[0], out[1:] = 0, values[:-1]
    return out


def replay(full: np.ndarray, deltas: np.ndarray, full_keys: np.ndarray, delta_keys: np.ndarray,
           rings: list[Ring]) -> tuple[np.ndarray, np.ndarray, int]:
    """Records of one slot in the order written (`full`: a base's, whole; then `deltas`: its
    chunks'), each keyed (`full_keys`, `delta_keys`: one void per record): (each key's state as
    a whole record, every field from its last record and each ring rebuilt; the index of that
    last record in full + deltas; how many records could not continue their ring exactly)."""
    n_full = len(full)
    keys = np.concatenate([full_keys, delta_keys])
    unique, inverse = np.unique(keys, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")  # by key, each key's records in the order written
    group = inverse[order]
    first = np.ones(len(group), bool)
    first[1:] = group[1:] != group[:-1]
    ends = np.append(np.flatnonzero(first)[1:], len(group)) - 1
    last = order[ends]
    out = np.empty(len(unique), full.dtype)
    whole = last < n_full
    out[whole] = full[last[whole]]
    from_delta = np.flatnonzero(~whole)
    at = last[from_delta] - n_full
    buffers = {ring.buf for ring in rings}
    for name in full.dtype.names:
        if name not in buffers:
            out[name][from_delta] = deltas[name][at]
    is_full = order < n_full
    seq = np.arange(len(order))
    inexact = 0
    for ring in rings:
        length = ring.length
        pos = np.concatenate([full[ring.pos], deltas[ring.pos]])[order].astype(np.int64)
        count = np.concatenate([full[ring.count], deltas[ring.count]])[order].astype(np.int64)
        # against the key's record before (a key's first record is an anchor: its "before" is moot)
        step = (pos - _before(pos)) % length
        follows = (step <= DELTA_CELLS) & (count == np.minimum(_before(count) + step, length))
        anchor = first | is_full | (count <= DELTA_CELLS)
        inexact += int(np.count_nonzero(~anchor & ~follows))
        # each key's last anchor (its first record is one, so nothing carries over from another key)
        anchor_at = np.maximum.accumulate(np.where(anchor, seq, 0))[ends]
        buf = np.full((len(unique), length), np.nan, full.dtype.fields[ring.buf][0].base)
        from_base = np.flatnonzero(is_full[anchor_at])
        buf[from_base] = full[ring.buf][order[anchor_at[from_base]]]
        # then the cells of every delta record from the anchor on, the later winning
        writes = np.flatnonzero(~is_full & (seq >= anchor_at[group]))
        if len(writes):
            cells = deltas[ring.last][order[writes] - n_full]  # (n, DELTA_CELLS), newest first
            where = group[writes, None] * length + (pos[writes, None] - 1 - np.arange(DELTA_CELLS)) % length
            where, cells = where[::-1].reshape(-1), cells[::-1].reshape(-1)  # the latest first
            _, latest_write = np.unique(where, return_index=True)
            buf.reshape(-1)[where[latest_write]] = cells[latest_write]
        out[ring.buf] = buf
    return out, last, inexact
