"""Fault injection for the backtest (spoa.tools.backtest.faults): ends nobody announces,
server-node crashes, independent and bursty loss."""

from __future__ import annotations

import numpy as np
import pytest

from spoa.tools.backtest import synthetic
from spoa.tools.backtest.faults import Channel, Faults, inject
from spoa.tools.backtest.traces import END_CLOSE, END_VANISH


def _trace():
    return synthetic.generate(200, seed=4, duration_s=600)


def test_no_fault_is_the_trace_itself():
    conns = _trace()
    assert inject(conns, Faults()) is conns


def test_silent_end_turns_that_share_of_closes_into_silent_ends():
    conns = _trace()
    closes = int(np.count_nonzero(conns.end_kind == END_CLOSE))
    silent = inject(conns, Faults(silent_end=0.3), seed=1)
    turned = int(np.count_nonzero((conns.end_kind == END_CLOSE) & (silent.end_kind == END_VANISH)))
    assert 0.2 * closes <= turned <= 0.4 * closes
    assert (silent.start == conns.start).all() and (silent.ev_total == conns.ev_total).all()
    assert (inject(conns, Faults(silent_end=1.0)).end_kind != END_CLOSE).all()
    again = inject(conns, Faults(silent_end=0.3), seed=1)
    assert (again.end_kind == silent.end_kind).all()  # seeded


def test_a_crash_ends_every_live_connection_silently_and_restarts_the_rest():
    conns = _trace()
    crashed = inject(conns, Faults(crash_rate=30.0, restart_intervals=2), seed=3)
    n_crashes = crashed.info["crashes"]
    assert n_crashes >= 1
    restarted = [i for i in crashed.ids if "#crash" in i]
    assert len(crashed) == len(conns) + len(restarted) and restarted
    # ordered as every Connections is: by first interval; events by (interval, connection)
    assert (np.diff(crashed.start) >= 0).all()
    order = np.lexsort((crashed.ev_conn, crashed.ev_k))
    assert (order == np.arange(order.size)).all()
    assert ((crashed.ev_k >= crashed.start[crashed.ev_conn]) & (crashed.ev_k <= crashed.end[crashed.ev_conn])).all()
    # what happened during the restart is lost with the node; nothing else is
    assert crashed.ev_bytes.sum() <= conns.ev_bytes.sum()
    assert crashed.ev_bytes.sum() >= 0.5 * conns.ev_bytes.sum()
    for name in restarted[:20]:
        i = crashed.ids.index(name)
        orig = conns.ids.index(name.split("#crash")[0])
        assert crashed.klass[i] == conns.klass[orig] and crashed.end[i] <= conns.end[orig]
        if crashed.end[i] < conns.end[orig]:  # a later crash ended it again
            assert crashed.end_kind[i] == END_VANISH
        else:
            assert crashed.end_kind[i] == conns.end_kind[orig]


def test_independent_loss_draws_one_per_entry():
    rng = np.random.default_rng(0)
    ch = Channel(0.2, 0.0, rng)
    kept = np.concatenate([ch.keep(100, k) for k in range(200)])
    assert abs(1 - kept.mean() - 0.2) < 0.01
    assert Channel(0.0, 0.0, rng).keep(10, 0) is None
    assert ch.keep(0, 5) is None


@pytest.mark.parametrize("loss,burst", [(0.05, 3.0), (0.2, 5.0)])
def test_bursts_keep_the_loss_rate_and_their_mean_length(loss, burst):
    ch = Channel(loss, burst, np.random.default_rng(7))
    bad = np.array([ch.keep(3, k) is not None for k in range(200_000)])
    assert abs(bad.mean() - loss) < 0.15 * loss
    runs = np.diff(np.flatnonzero(np.diff(np.r_[False, bad, False].astype(int))))[::2]
    assert abs(runs.mean() - burst) < 0.1 * burst
    # the state is per interval: every entry of a bad interval is lost, none of a good one
    k = int(np.flatnonzero(bad)[0])
    ch2 = Channel(loss, burst, np.random.default_rng(7))
    for j in range(k):
        ch2.keep(1, j)
    mask = ch2.keep(5, k)
    assert mask is not None and not mask.any() and ch2.keep(2, k) is not None


def test_skipped_intervals_step_the_chain_in_closed_form():
    # stepped every interval or only every 50th, the long-run share of bad intervals is the loss
    ch = Channel(0.1, 4.0, np.random.default_rng(2))
    sparse = np.array([ch.keep(1, k) is not None for k in range(0, 2_000_000, 50)])
    assert abs(sparse.mean() - 0.1) < 0.01


@pytest.mark.parametrize("kwargs,message", [
    ({"silent_end": 1.5}, "silent_end"), ({"crash_rate": -1.0}, "crash_rate"),
    ({"crash_rate": float("nan")}, "crash_rate"), ({"loss_burst": 0.5}, "loss_burst"),
    ({"restart_intervals": 0}, "restart_intervals")])
def test_bad_faults_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Faults(**kwargs)
