"""Frontier bookkeeping (spoa.tools.backtest.frontier): feasibility, dominance, the best point,
entries saved at equal stale state, and a real sweep on a small trace."""

from __future__ import annotations

import pytest

from spoa.tools.backtest import synthetic
from spoa.tools.backtest.faults import Faults
from spoa.tools.backtest.frontier import KNOBS, best_point, beats, entries_saving, frontier, sweep
from spoa.tools.backtest.simulate import SimConfig


def _p(run, entries, stale, feasible=True, cut=None, stale_vs_fixed=None, value=0):
    return {"run": run, "policy": run.split("-")[0], "forecaster": None, "knob": "min_ms", "value": value,
            "publishing_entries": entries, "stale_state_seconds_per_silent_end": stale, "feasible": feasible,
            "entries_cut": cut if cut is not None else 1 - entries / 1000, "stale_vs_fixed": stale_vs_fixed,
            "premature_expiries": 0, "premature_share": 0.0, "state_seconds_held": 0.0}


def test_frontier_keeps_the_feasible_points_nobody_beats():
    pts = [_p("a", 300, 10), _p("a", 250, 12), _p("a", 320, 11), _p("a", 200, 5, feasible=False), _p("a", 250, 12)]
    front = frontier(pts)["a"]
    assert [(p["publishing_entries"], p["stale_state_seconds_per_silent_end"]) for p in front] == \
        [(250, 12), (250, 12), (300, 10)]  # (320, 11) is beaten by (300, 10); the infeasible one is out


def test_best_point_is_the_fewest_entries_under_the_stale_target():
    front = [_p("a", 250, 12, stale_vs_fixed=0.6), _p("a", 280, 9, stale_vs_fixed=0.45),
             _p("a", 320, 7, stale_vs_fixed=0.35)]
    assert best_point(front)["publishing_entries"] == 280
    # none under the target: the least stale state among those that cut enough
    high = [_p("a", 250, 20, cut=0.75, stale_vs_fixed=0.7), _p("a", 260, 18, cut=0.72, stale_vs_fixed=0.6),
            _p("a", 400, 16, cut=0.6, stale_vs_fixed=0.55)]
    assert best_point(high)["publishing_entries"] == 260
    assert best_point([]) is None


def test_entries_saving_interpolates_the_other_frontier_at_equal_stale_state():
    naive = [_p("n", 400, 10), _p("n", 300, 20)]
    better = [_p("b", 330, 15)]  # naive at 15 s of stale state: 350 entries
    assert entries_saving(better, naive) == pytest.approx(1 - 330 / 350)
    assert beats(better, naive) and not beats([_p("w", 360, 15)], naive)
    assert entries_saving([_p("b", 100, 50)], naive) is None  # outside naive's range: no comparison


def test_sweep_on_a_small_trace_covers_every_knob():
    conns = synthetic.generate(40, seed=1, duration_s=60, vanish_share=0.2)
    conf = SimConfig(loss=0.05, hint_loss=0.05, faults=Faults(silent_end=0.3))
    points = sweep([conns], conf, ("fixed", "activity"), ("naive", "ses"))
    want = len(KNOBS["fixed"][0][1]) + 2 * sum(len(v) for _k, v in KNOBS["activity"])
    assert len(points) == want
    fixed = {p["value"]: p for p in points if p["run"] == "fixed"}
    # the fixed lease publishes every interval whatever its length; a longer one holds dead state longer
    assert len({p["publishing_entries"] for p in fixed.values()}) == 1
    assert fixed[300_000]["stale_state_seconds_per_silent_end"] > fixed[5_000]["stale_state_seconds_per_silent_end"]
    assert fixed[30_000]["stale_vs_fixed"] == pytest.approx(1.0)
    act = [p for p in points if p["run"] == "activity-ses" and p["knob"] == "min_ms"]
    assert act[0]["publishing_entries"] > act[-1]["publishing_entries"]  # a higher floor, fewer refreshes
