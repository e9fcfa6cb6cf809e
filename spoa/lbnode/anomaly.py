"""Rate anomaly detector for the LB node: streaming quantiles per traffic class.

Every interval the LB node receives, per connection, the bytes each active
segment moved (spoa/wire/records.py, SegmentRecord.bytes_transferred). The detector
keeps one t-digest (fastdigest, Rust) per traffic class of those per-segment
rates and flags a rate that is above ``quantile(q_high) * factor`` of its
class, once the class has seen ``min_samples`` rates.

Time decay: a t-digest forgets nothing. Each class therefore holds two
digests, ``current`` and ``previous``. Rates go into ``current``; when
``current`` holds ``window`` rates (at least ``min_samples``) it becomes
``previous`` (the old ``previous`` is dropped) and a new empty ``current``
starts. The threshold is taken from ``previous + current``, i.e. from the
last ``window`` to ``2 * window`` rates of the class (a batch is never split,
so a large batch can overshoot by its own size). ``window=None`` turns
rotation off: one digest per class over its whole life.

Bounded memory: at most ``max_classes`` classes; observing a new class when
full evicts the least recently used one (used = observed or queried), which
is counted in ``stats["evicted"]``.

Not thread-safe: meant for the LB node's event loop. Design, parameters and
the measurements behind the choice of library: docs/anomaly.md.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np
from fastdigest import TDigest

from ..wire.records import DIR_IN, ConnectionRecord

__all__ = ["AnomalyDetector", "class_key", "segment_rates", "traffic_class"]


class _Class:
    """One traffic class: the two digest generations and the cached threshold."""

    __slots__ = ("current", "previous", "threshold", "dirty")

    def __init__(self, compression: int) -> None:
        self.current = TDigest(compression)
        self.previous: TDigest | None = None
        self.threshold: float | None = None
        self.dirty = False

    def n_values(self) -> int:
        n = self.current.n_values
        return n + self.previous.n_values if self.previous is not None else n


class AnomalyDetector:
    """Per traffic class (e.g. frontend name), streaming quantiles of per-segment
    transfer rates (bytes per interval of active segments); a connection whose
    current rate is far outside its class (above the class's q_high quantile x
    factor, e.g. p99.9 x 4, once the class has >= min_samples) is flagged.

    ``window``: rates per digest generation (see the module docstring), raised
    to ``min_samples`` if smaller; the threshold reflects the last
    ``window``..``2*window`` rates of the class. ``None``: no decay.

    ``compression`` is fastdigest's ``max_centroids`` (~16 B per centroid).
    """

    def __init__(
        self,
        q_high: float = 0.999,
        factor: float = 4.0,
        min_samples: int = 1000,
        max_classes: int = 1024,
        compression: int = 100,
        *,
        window: int | None = 100_000,
    ) -> None:
        if not 0.0 < q_high < 1.0:
            raise ValueError(f"q_high must be in (0, 1), got {q_high!r}")
        if not (factor > 0.0 and np.isfinite(factor)):
            raise ValueError(f"factor must be a finite number > 0, got {factor!r}")
        if int(min_samples) < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples!r}")
        if int(max_classes) < 1:
            raise ValueError(f"max_classes must be >= 1, got {max_classes!r}")
        if int(compression) < 2:
            raise ValueError(f"compression must be >= 2, got {compression!r}")
        if window is not None and int(window) < 1:
            raise ValueError(f"window must be >= 1 or None, got {window!r}")
        self.q_high = float(q_high)
        self.factor = float(factor)
        self.min_samples = int(min_samples)
        self.max_classes = int(max_classes)
        self.compression = int(compression)
        # A generation holds at least min_samples rates, so that a class keeps
        # its threshold across a rotation.
        self.window = None if window is None else max(int(window), self.min_samples)
        self._classes: OrderedDict[str, _Class] = OrderedDict()
        self._observed = 0
        self._dropped = 0
        self._flagged = 0
        self._evicted = 0
        self._rotations = 0

    # -- feeding --------------------------------------------------------------

    def observe(self, traffic_class: str, rates: np.ndarray | Sequence[float]) -> None:
        """Add one interval's rates of ``traffic_class``.

        Rates that are not finite or not > 0 (idle segments) are dropped and
        counted in ``stats["dropped"]``.
        """
        a = np.asarray(rates, dtype=np.float64).ravel()
        keep = np.isfinite(a) & (a > 0.0)
        n = int(np.count_nonzero(keep))
        self._dropped += a.size - n
        if n == 0:
            return
        if n != a.size:
            a = a[keep]
        cls = self._classes.get(traffic_class)
        if cls is None:
            if len(self._classes) >= self.max_classes:
                self._classes.popitem(last=False)
                self._evicted += 1
            cls = self._classes[traffic_class] = _Class(self.compression)
        else:
            self._classes.move_to_end(traffic_class)
        # fastdigest reads a list at least as fast as an ndarray, tolist() included
        # (benchmarks/RESULTS.md, "Streaming quantiles").
        cls.current.batch_update(a.tolist())
        cls.dirty = True
        self._observed += n
        if self.window is not None and cls.current.n_values >= self.window:
            cls.previous = cls.current
            cls.current = TDigest(self.compression)
            self._rotations += 1

    # -- queries --------------------------------------------------------------

    def threshold(self, traffic_class: str) -> float | None:
        """``quantile(q_high) * factor`` of the class, or None while the class
        is unknown or has fewer than ``min_samples`` rates in its window."""
        cls = self._classes.get(traffic_class)
        if cls is None:
            return None
        self._classes.move_to_end(traffic_class)
        return self._threshold(cls)

    def _threshold(self, cls: _Class) -> float | None:
        if cls.dirty:
            cls.dirty = False
            if cls.n_values() < self.min_samples:
                cls.threshold = None
            else:
                d = cls.current
                if cls.previous is not None:
                    d = cls.previous if d.is_empty() else cls.previous + d
                cls.threshold = d.quantile(self.q_high) * self.factor
        return cls.threshold

    def is_anomalous(self, traffic_class: str, rate: float) -> bool:
        thr = self.threshold(traffic_class)
        if thr is None or not rate > thr:
            return False
        self._flagged += 1
        return True

    def flag(self, traffic_class: str, rates: np.ndarray | Sequence[float]) -> np.ndarray:
        """Vectorized ``is_anomalous``: a bool array shaped like ``rates``."""
        a = np.asarray(rates, dtype=np.float64)
        thr = self.threshold(traffic_class)
        if thr is None:
            return np.zeros(a.shape, dtype=bool)
        mask = a > thr  # NaN compares False
        self._flagged += int(np.count_nonzero(mask))
        return mask

    # -- records --------------------------------------------------------------

    def process(
        self,
        records: Iterable[ConnectionRecord],
        interval_ms: int | None = None,
        *,
        by_direction: bool = True,
    ) -> list[bytes]:
        """One interval of ConnectionRecords: flag, then observe.

        A connection is flagged when any of its active segments' rate is above
        its class's threshold as it stood before this interval (so a burst
        cannot raise its own bar). Then every active rate is observed.
        Classes are ``traffic_class(record, direction)``. Returns the flagged
        ``conn_id``s, in record order.
        """
        by_class: dict[str, tuple[list[float], list[int]]] = {}
        conn_ids: list[bytes] = []
        scale = 1.0 if not interval_ms else 1000.0 / interval_ms
        for i, rec in enumerate(records):
            conn_ids.append(rec.conn_id)
            for seg in rec.segments:
                if seg.bytes_transferred <= 0:
                    continue
                key = traffic_class(rec, seg.direction if by_direction else None)
                vals, owners = by_class.setdefault(key, ([], []))
                vals.append(seg.bytes_transferred * scale)
                owners.append(i)
        hit: set[int] = set()
        for key, (vals, owners) in by_class.items():
            mask = self.flag(key, vals)
            if mask.any():
                hit.update(np.asarray(owners)[mask].tolist())
        for key, (vals, _) in by_class.items():
            self.observe(key, vals)
        return [conn_ids[i] for i in sorted(hit)]

    # -- introspection ----------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        """classes: digests held; observed: rates fed in; dropped: rates not fed
        (idle or not finite); flagged: rates found anomalous; evicted: classes
        dropped by the LRU bound; rotations: digest generations retired."""
        return {
            "classes": len(self._classes),
            "observed": self._observed,
            "dropped": self._dropped,
            "flagged": self._flagged,
            "evicted": self._evicted,
            "rotations": self._rotations,
        }

    def samples(self, traffic_class: str) -> int:
        """Rates in the class's current window (0 if unknown); not a use."""
        cls = self._classes.get(traffic_class)
        return 0 if cls is None else cls.n_values()

    def __contains__(self, traffic_class: object) -> bool:
        return traffic_class in self._classes

    def __len__(self) -> int:
        return len(self._classes)


def traffic_class(record: ConnectionRecord, direction: int | None = None) -> str:
    """The class key: the frontend name, or ``frontend/in`` / ``frontend/out``."""
    return class_key(record.frontend, direction)


def class_key(frontend: str, direction: int | None = None) -> str:
    """``traffic_class`` from a frontend name (the LB node holds names, not records)."""
    if direction is None:
        return frontend
    return f"{frontend}/{'in' if direction == DIR_IN else 'out'}"


def segment_rates(
    record: ConnectionRecord, interval_ms: int | None = None, direction: int | None = None
) -> np.ndarray:
    """Rates of the record's active segments (bytes_transferred > 0): bytes per
    interval, or bytes per second when ``interval_ms`` is given; optionally of
    one direction only."""
    scale = 1.0 if not interval_ms else 1000.0 / interval_ms
    return np.array(
        [
            s.bytes_transferred * scale
            for s in record.segments
            if s.bytes_transferred > 0 and (direction is None or s.direction == direction)
        ],
        dtype=np.float64,
    )
