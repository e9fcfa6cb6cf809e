"""Frontier sweeps: each policy's knob over a range, entries against stale state.

One operating point is one (policy, forecaster, knob value) simulated on every
trace under the same faults. A point is *feasible* when its premature expiries
are at most ``PREMATURE_MAX`` of the connection-intervals; among the feasible
points of one policy x forecaster, the frontier is the set no other point
beats on both publishing entries and stale state-seconds per silently ended
connection. The best operating point of a frontier is the one with the fewest
entries among those whose stale state is at most ``STALE_VS_FIXED_MAX`` of the
fixed 30 s lease's (the targets: cut entries, hold premature expiries and
stale state down); where none is, the least stale state among those that cut
entries by at least ``ENTRIES_CUT_MIN``, else the fewest entries.

Knobs (``KNOBS``), each swept alone from the configuration given: the fixed
lease's length; the activity and volume policies' lease floor
(``lease.min_ms``: what a lease must cover to survive lost refreshes, and what
a connection ending right after its traffic costs); the activity policy's
safety factor; the volume policy's calibration (``lease.calibrated_lease_ms``);
the end bound off (does it earn its place?).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .simulate import Result, SimConfig, run_name, simulate_all
from .traces import Connections

__all__ = ["ENTRIES_CUT_MIN", "KNOBS", "PREMATURE_MAX", "STALE_VS_FIXED_MAX", "beats", "best_point", "entries_saving", "frontier", "sweep"]

PREMATURE_MAX = 0.0005  # share of connection-intervals
ENTRIES_CUT_MIN = 0.7  # against the fixed 30 s lease
STALE_VS_FIXED_MAX = 0.5  # stale state per silent end, against the fixed 30 s lease's
REFERENCE = ("fixed", "standard_ms", 30_000)

KNOBS: dict[str, tuple[tuple[str, tuple], ...]] = {
    "fixed": (("standard_ms", (5_000, 10_000, 15_000, 20_000, 30_000, 45_000, 60_000, 120_000, 300_000)),),
    "activity": (("min_ms", (3_000, 4_000, 6_000, 8_000, 10_000, 12_000, 15_000, 20_000)),
                 ("safety", (1.5, 2.0, 3.0)), ("end_bound", (False,))),
    "volume": (("min_ms", (3_000, 6_000, 10_000, 15_000, 20_000)),
               ("calibrated_lease_ms", (3_000, 10_000, 100_000, 300_000)), ("end_bound", (False,))),
}


def _point(name: str, policy: str, forecaster: str | None, knob: str, value, r: Result,
           reference: Result | None) -> dict:
    d = r.as_dict(reference)
    ref_stale = reference.as_dict()["stale_state_seconds_per_silent_end"] if reference is not None else 0.0
    return {"run": name, "policy": policy, "forecaster": forecaster, "knob": knob, "value": value,
            "publishing_entries": d["publishing_entries"], "entries_cut": d.get("entries_cut"),
            "premature_expiries": d["premature_expiries"], "premature_share": d["premature_share"],
            "connection_intervals": d["connection_intervals"],
            "stale_state_seconds_per_silent_end": d["stale_state_seconds_per_silent_end"],
            "stale_vs_fixed": d["stale_state_seconds_per_silent_end"] / ref_stale if ref_stale > 0 else None,
            "state_seconds_held": d["state_seconds_held"],
            "feasible": d["premature_share"] <= PREMATURE_MAX}


def _bounds(lease: dict, knob: str, value) -> dict:
    """The lease section with ``knob = value``, its bounds kept consistent (the floor may pass the standard)."""
    out = dict(lease, **{knob: value})
    if knob == "standard_ms":
        out["min_ms"] = min(out["min_ms"], value)
    if knob == "min_ms":
        out["standard_ms"] = max(out["standard_ms"], value)
    return out


def sweep(traces: list[Connections], conf: SimConfig, policies, forecasters, jobs: int = 1,
          progress=None) -> list[dict]:
    """Every knob value of every policy x forecaster, summed over the traces."""
    tasks = [("fixed", (None,))] if "fixed" in policies else []
    tasks += [(p, tuple(forecasters)) for p in policies if p != "fixed"]
    reference = _total(traces, replace(conf, lease=_bounds(conf.lease, REFERENCE[1], REFERENCE[2])),
                       ("fixed",), (), jobs, progress)
    points = []
    for policy, fcs in tasks:
        for knob, values in KNOBS[policy]:
            for value in values:
                if (policy, knob, value) == REFERENCE:  # the reference is a point of the fixed sweep: run once
                    results = reference
                else:
                    c = replace(conf, lease=_bounds(conf.lease, knob, value))
                    results = _total(traces, c, (policy,), () if policy == "fixed" else fcs, jobs, progress)
                for f in fcs:
                    name = run_name(policy, f)
                    points.append(_point(name, policy, f, knob, value, results[name], reference["fixed"]))
    return points


def _total(traces, conf, policies, forecasters, jobs, progress) -> dict[str, Result]:
    total: dict[str, Result] = {}
    for conns in traces:
        if not len(conns):
            continue
        for name, r in simulate_all(conns, conf, policies, forecasters, jobs=jobs, progress=progress).items():
            total[name] = r if name not in total else total[name].merge(r)
    return total


def frontier(points: list[dict]) -> dict[str, list[dict]]:
    """Per run (policy x forecaster): its feasible points no other beats on entries and stale state."""
    by_run: dict[str, list[dict]] = {}
    for p in points:
        by_run.setdefault(p["run"], []).append(p)
    out = {}
    for run, pts in by_run.items():
        ok = [p for p in pts if p["feasible"]]
        front = [p for p in ok if not any(
            q is not p and q["publishing_entries"] <= p["publishing_entries"]
            and q["stale_state_seconds_per_silent_end"] <= p["stale_state_seconds_per_silent_end"]
            and (q["publishing_entries"], q["stale_state_seconds_per_silent_end"])
            != (p["publishing_entries"], p["stale_state_seconds_per_silent_end"]) for q in ok)]
        out[run] = sorted(front, key=lambda p: p["publishing_entries"])
    return out


def best_point(front: list[dict]) -> dict | None:
    """The fewest entries at stale state under the target; else the least stale state among the
    points that cut entries enough; else the fewest entries."""
    if not front:
        return None
    fresh = [p for p in front if p["stale_vs_fixed"] is None or p["stale_vs_fixed"] <= STALE_VS_FIXED_MAX]
    if fresh:
        return min(fresh, key=lambda p: (p["publishing_entries"], p["stale_state_seconds_per_silent_end"]))
    enough = [p for p in front if (p["entries_cut"] or 0.0) >= ENTRIES_CUT_MIN]
    if enough:
        return min(enough, key=lambda p: (p["stale_state_seconds_per_silent_end"], p["publishing_entries"]))
    return min(front, key=lambda p: (p["publishing_entries"], p["stale_state_seconds_per_silent_end"]))


def entries_saving(a: list[dict], b: list[dict]) -> float | None:
    """How many fewer entries frontier ``a`` needs than frontier ``b`` at equal stale state: the
    median over ``a``'s points inside ``b``'s stale range of ``1 - entries_a / entries_b``, with
    ``b``'s entries interpolated linearly in stale state along its frontier (None: no overlap)."""
    if not a or not b:
        return None
    pts = sorted((p["stale_state_seconds_per_silent_end"], p["publishing_entries"]) for p in b)
    stale_b = np.array([s for s, _ in pts])
    entries_b = np.array([e for _, e in pts], dtype=np.float64)
    savings = []
    for p in a:
        x = p["stale_state_seconds_per_silent_end"]
        if stale_b[0] <= x <= stale_b[-1]:
            savings.append(1.0 - p["publishing_entries"] / float(np.interp(x, stale_b, entries_b)))
    return float(np.median(savings)) if savings else None


def beats(a: list[dict], b: list[dict]) -> bool:
    """Frontier ``a`` beats ``b``: fewer entries at equal stale state (``entries_saving`` > 0)."""
    saving = entries_saving(a, b)
    return saving is not None and saving > 0.0
