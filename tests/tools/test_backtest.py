"""Lease backtest: known answers on synthetic traffic, the same protocol as the
product's LeaseTable + LeaseModule, trace readers (pcap/pcapng written here with
dpkt, CSV), and the CLI contract."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spoa import config as cfg
from spoa.servernode import _tracker_py
from spoa.tools.backtest import synthetic
from spoa.tools.backtest.faults import Channel, Faults, inject
from spoa.tools.backtest.simulate import DEFAULT_POLICY, SimConfig, passes, simulate, simulate_all
from spoa.tools.backtest.traces import (
    END_CENSORED,
    END_CLOSE,
    END_VANISH,
    Connections,
    load_trace,
    read_csv,
    read_pcap,
    write_csv,
)
from spoa.wire.hints import decode_hints, encode_hints
from spoa.wire.records import ConnectionRecord, ConnFlags, SegmentRecord

REPO = Path(__file__).resolve().parents[2]
KEY = b"k" * 32
I = 1000
RUNS = [("fixed", "ses"), ("volume", "ses"), ("volume", "tsb"), ("activity", "ses")]


def keepalive(period: int, seconds: int, size: int = 100) -> np.ndarray:
    y = np.zeros(seconds)
    y[::period] = size
    return y


# ------------------------------------------------------------------ known answers


@pytest.mark.parametrize("policy,forecaster", RUNS)
def test_constant_rate_connection_never_expires_prematurely(policy, forecaster):
    conns = synthetic.from_series([np.full(300, 5000.0), np.full(200, 80.0)], starts=[0, 50],
                                  end_kinds=[END_CLOSE, END_CENSORED])
    r = simulate(conns, policy, forecaster)
    assert r.premature_expiries == 0 and r.lb_detected_premature == 0
    assert r.expired == 1  # the censored one, after the trace: nothing publishes it any more
    assert r.publishing_entries == 500  # active every interval: published every interval
    assert r.connection_intervals == 500 and r.active_intervals == 500
    if policy == "fixed":  # 30 s lease, refreshed every second: 20 % loss cannot lapse it
        r = simulate(conns, policy, forecaster, SimConfig(loss=0.2, hint_loss=0.2, seed=3))
        assert r.premature_expiries == 0


@pytest.mark.parametrize("policy,forecaster", RUNS)
def test_connection_that_stops_is_released_within_one_lease(policy, forecaster):
    y = np.r_[np.full(5, 20_000.0), keepalive(15, 120)]
    conns = synthetic.from_series([y], end_kinds=[END_VANISH])
    r = simulate(conns, policy, forecaster, samples=[0])
    lease_at_end = r.samples[0]["lease_ms"][-1]
    assert r.samples[0]["held"][-1] and lease_at_end > 0
    assert 0 < r.state_ms_after_end <= lease_at_end + I
    assert r.premature_expiries == 0 and r.expired == 1 and r.closed == 0
    if policy == "fixed":
        assert lease_at_end == 30_000


def test_closed_connections_leave_no_state_behind_and_fixed_publishes_every_interval():
    conns = synthetic.generate(300, seed=5, duration_s=60)
    results = simulate_all(conns, policies=("fixed", "volume", "activity"), forecasters=("ses", "tsb"))
    fixed = results["fixed"]
    assert fixed.publishing_entries == conns.connection_intervals
    assert fixed.hints == 0 and fixed.leases_predicted == 0
    for r in results.values():
        assert r.premature_expiries == 0 and r.state_ms_after_end == 0
        assert r.closed == len(conns) and r.expired == 0
        assert r.entries_active == conns.active_intervals  # active intervals are always published
        assert r.publishing_entries <= fixed.publishing_entries
        assert r.silent_ends == 0 and r.stale_ms_silent == 0  # every end announced: nothing stale


def _spec_volume() -> SimConfig:
    """The specification's volume policy as it stood: one threshold, a 3 s floor."""
    return SimConfig(lease=dict(SimConfig().lease, min_ms=3000, calibrated_lease_ms=None))


def test_keepalive_cadence_volume_halves_activity_caps_at_hint_ttl():
    """Known cadence: the specification's volume policy grants idle connections MIN (3 s) ->
    republished every 2nd interval; the activity policy covers 20 s gaps, but a hint older than
    hint_ttl_ms (5 s) is stale, so a quiet connection still goes out every 6th interval."""
    conns = synthetic.from_series([keepalive(20, 601)])
    fixed = simulate(conns, "fixed")
    vol = simulate(conns, "volume", "ses", _spec_volume())
    act = simulate(conns, "activity", "ses")
    assert fixed.publishing_entries == 601
    assert 0.45 <= 1 - vol.publishing_entries / 601 <= 0.52
    assert 1 - act.publishing_entries / 601 >= 0.75
    conf = SimConfig()
    conf.server = dataclasses.replace(conf.server, hint_ttl_ms=120_000)
    long_ttl = simulate(conns, "activity", "ses", conf)
    assert long_ttl.publishing_entries < act.publishing_entries * 0.8  # now lease x 0.34 (~7 s) rules


def test_lost_records_make_short_leases_lapse_not_the_fixed_lease():
    conns = synthetic.from_series([keepalive(20, 400)] * 40)
    conf = dataclasses.replace(_spec_volume(), loss=0.05, hint_loss=0.05, seed=11)
    assert simulate(conns, "fixed", config=conf).premature_expiries == 0
    vol = simulate(conns, "volume", "ses", conf)
    assert vol.premature_expiries > 20  # one lost record lapses a 3 s lease refreshed every 2 s
    assert vol.lb_detected_premature == vol.premature_expiries  # each lapsed connection talked again


def test_forecast_error_scores_idle_and_active_apart():
    conns = synthetic.from_series([keepalive(10, 200, 1000)])
    r = simulate(conns, "fixed")
    assert r.forecast == {}
    r = simulate(conns, "volume", "ses")
    f = r.forecast_metrics()
    assert f["idle"]["n"] + f["active"]["n"] == 199  # every interval after the first refresh
    assert f["active"]["n"] == 19
    # SES decays towards 0 between pings: its idle error is small, active error large
    assert f["idle"]["mae"] < f["active"]["mae"]
    assert conns.naive_scale() == pytest.approx(1000 * 39 / 199)


# ------------------------------------------------------ same protocol as the product


def reference_run(conns: Connections, policy: str, forecaster: str, conf: SimConfig, monkeypatch):
    """The product's own LeaseModule.on_hints, tracker cadence and LeaseTable, one record at a time,
    on the trace as ``conf.faults`` make it happen and through the same channels."""
    from spoa.lbnode.node import LeaseTable
    from spoa.lbnode.service import forecaster_from_config, policy_from_config
    from spoa.servernode import lease_module
    from spoa.servernode.lease_module import LeaseModule, LeaseSettings

    lb = cfg.defaults(cfg.LBNODE_SCHEMA)
    forecast = {**lb["forecast"], "method": forecaster}
    conns = inject(conns, conf.faults, conf.seed)
    cap, phase = len(conns), I // 2
    table = LeaseTable(cap, forecaster_from_config(forecast, cap),
                       policy_from_config({**lb["lease"], "policy": policy}, I, cap, forecast),
                       lb["lease"]["standard_ms"], I)
    clock = {"now": 0}
    monkeypatch.setattr(lease_module, "now_ms", lambda: clock["now"])

    class Tracker(_tracker_py.SegmentTracker):
        """The tracker's own cadence (set_hint, publish(now_ms): the twin's, held to the
        compiled one in test_tracker.py) over ready-made records: a live record that
        moved nothing is left out while its refresh time is ahead."""

        def publish_records(self, records, now):
            due = []
            for rec in records:
                conn = self._conns.get(rec.conn_id)
                active = any(seg.bytes_transferred or seg.packets_transferred for seg in rec.segments)
                if rec.flags & ConnFlags.CLOSED:
                    self.close(rec.conn_id, now)
                elif active or conn.publish_after <= now:
                    self._published(conn, now)
                else:
                    continue
                due.append(rec)
            self._closed.clear()
            return due

    tracker = Tracker()
    module = LeaseModule(tracker, None, None, I, 1, LeaseSettings())
    ids = [i.to_bytes(15, "big") + b"\x01" for i in range(cap)]
    for cid in ids:  # keyed by id: the records carry no 4-tuple
        tracker.register(cid, cid, "192.0.2.1", 1, "192.0.2.2", 2, "fe", 0)
    series = [conns.series(i) for i in range(cap)]
    rng = np.random.default_rng(conf.seed)
    records_channel = Channel(conf.loss, conf.faults.loss_burst, rng)
    hints_channel = Channel(conf.hint_loss, conf.faults.loss_burst, rng)
    entries = 0
    for k in range(conns.n_intervals):
        T = (k + 1) * I
        records = []
        for i in range(cap):
            s, e = int(conns.start[i]), int(conns.end[i])
            if not s <= k <= e:
                continue
            ser, j = series[i], k - s
            b_in, b_out = int(ser["bytes_in"][: j + 1].sum()), int(ser["bytes_out"][: j + 1].sum())
            y = int(ser["bytes_in"][j] + ser["bytes_out"][j])
            flags = ConnFlags.CLOSED if k == e and conns.end_kind[i] == END_CLOSE else 0
            seg = SegmentRecord(0, 0, b_in + b_out, y, 1 if y else 0, 0, 0)
            records.append(ConnectionRecord(ids[i], "192.0.2.1", 1, "192.0.2.2", 2,
                                            conns.classes[conns.klass[i]], flags, 0, 0, 0, 0, 0, b_in, b_out,
                                            (seg,)))
        due = tracker.publish_records(records, T)
        entries += len(due)
        arrive = records_channel.keep(len(due), k)
        if arrive is not None:
            due = [rec for rec, keep in zip(due, arrive) if keep]
        table.ingest(1, due, T)
        clock["now"] = T + phase
        hints = table.end_interval(T + phase)
        # bursts lose a whole interval's hints, whatever their order (independent hint loss would
        # need the simulator's order, which is by connection, not by LB-node slot)
        if 1 in hints and hints_channel.keep(len(hints[1]), k) is not None:
            del hints[1]
        if 1 in hints:  # through the wire format, as the LB node sends them
            for datagram in encode_hints(7, k + 1, T + phase, hints[1], KEY, 1400):
                module.on_hints(*decode_hints(datagram, KEY))
    table.end_interval(10**12)  # let every remaining lease run out
    return entries, table.stats


FAULTS = {
    "none": (0.0, 0.0, Faults()),
    "loss": (0.05, 0.0, Faults()),
    "silent+crash": (0.05, 0.0, Faults(silent_end=0.3, crash_rate=40.0)),
    "bursts": (0.1, 0.1, Faults(silent_end=0.2, crash_rate=20.0, loss_burst=3.0)),
}


@pytest.mark.parametrize("policy,forecaster,faults", [
    ("volume", "ses", "none"), ("volume", "tsb", "loss"), ("activity", "ses", "none"),
    ("activity", "croston", "loss"), ("activity", "naive", "silent+crash"), ("activity", "ses", "bursts"),
    ("volume", "naive", "bursts")])
def test_vectorized_simulation_matches_lease_table_and_lease_module(policy, forecaster, faults, monkeypatch):
    """Record for record under the same injected faults: the simulator's entries, refreshes,
    allocations, closes, expiries and leases are what the product's own code gives."""
    conns = synthetic.generate(60, seed=2, duration_s=60, vanish_share=0.3,
                               mix={"onoff": 1, "bulk": 1, "chatty": 1, "http_keepalive": 2})
    keep = conns.end < 400  # keep the reference loop short
    conns = conns.subset(np.flatnonzero(keep))
    loss, hint_loss, fault = FAULTS[faults]
    conf = SimConfig(loss=loss, hint_loss=hint_loss, faults=fault)
    entries, stats = reference_run(conns, policy, forecaster, conf, monkeypatch)
    r = simulate(conns, policy, forecaster, conf)
    assert r.publishing_entries == entries
    assert (r.refreshes, r.allocations, r.closed) == (stats.refreshes, stats.new_connections, stats.closed)
    assert (r.expired, r.lb_detected_premature) == (stats.expired, stats.premature_expiries)
    assert r.leases_predicted == stats.leases["predicted"] and r.leases_fallback == stats.leases["fallback"]
    if loss:
        assert r.lb_detected_premature > 0 or r.expired > 0
    if fault.active:
        assert r.silent_ends > 0 and r.stale_ms_silent > 0  # the faults happened, and cost stale state


def test_parallel_passes_give_the_same_results():
    conns = synthetic.generate(200, seed=9, duration_s=60)
    kw = dict(policies=("fixed", "volume", "activity"), forecasters=("ses", "croston"))
    one = simulate_all(conns, **kw, jobs=1)
    two = simulate_all(conns, **kw, jobs=2)
    assert list(one) == list(two) == ["fixed", "volume-ses", "volume-croston", "activity-ses", "activity-croston"]
    for name in one:
        a, b = one[name].as_dict(), two[name].as_dict()
        a.pop("sim_seconds"), b.pop("sim_seconds")
        assert a == b
    assert len(passes(("fixed", "volume", "activity"), ("ses", "croston"))) == 5


# ----------------------------------------------------------------- trace readers


def _tcp_packet(src, dst, sport, dport, flags, seq=1, payload=b"", v6=False):
    import dpkt

    tcp = dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags, seq=seq, data=payload)
    if v6:
        ip = dpkt.ip6.IP6(src=src, dst=dst, nxt=6, hlim=64, data=tcp, plen=len(tcp))
        etype = dpkt.ethernet.ETH_TYPE_IP6
    else:
        ip = dpkt.ip.IP(src=src, dst=dst, p=6, data=tcp, len=20 + len(tcp))
        etype = dpkt.ethernet.ETH_TYPE_IP
    return bytes(dpkt.ethernet.Ethernet(src=b"\x00" * 6, dst=b"\x01" * 6, type=etype, data=ip))


def _capture():
    """(t, frame) list: 3 TCP connections + a UDP datagram."""
    import dpkt

    S, A, F, R, P = dpkt.tcp.TH_SYN, dpkt.tcp.TH_ACK, dpkt.tcp.TH_FIN, dpkt.tcp.TH_RST, dpkt.tcp.TH_PUSH
    c, s = b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02"
    t0 = 1_700_000_000.0
    pk = []
    # 1: handshake, 100 B up at 0.5 s, 1000 B down at 1.2 s, silence, 50 B up at 5.1 s, FIN at 7.3 s
    pk += [(t0 + 0.0, _tcp_packet(c, s, 40000, 443, S, seq=7)), (t0 + 0.01, _tcp_packet(s, c, 443, 40000, S | A)),
           (t0 + 0.02, _tcp_packet(c, s, 40000, 443, A)),
           (t0 + 0.5, _tcp_packet(c, s, 40000, 443, A | P, payload=b"x" * 100)),
           (t0 + 1.2, _tcp_packet(s, c, 443, 40000, A | P, payload=b"y" * 1000)),
           (t0 + 5.1, _tcp_packet(c, s, 40000, 443, A | P, payload=b"z" * 50)),
           (t0 + 7.3, _tcp_packet(c, s, 40000, 443, F | A)), (t0 + 7.31, _tcp_packet(s, c, 443, 40000, F | A))]
    # 2: the same 4-tuple again after the close (a new SYN): a new connection, reset at 9.4 s
    pk += [(t0 + 9.0, _tcp_packet(c, s, 40000, 443, S, seq=99)),
           (t0 + 9.2, _tcp_packet(s, c, 443, 40000, A | P, payload=b"w" * 300)),
           (t0 + 9.4, _tcp_packet(c, s, 40000, 443, R))]
    # 3: mid-stream, no handshake, IPv6, never closed (censored): server is the lower port
    c6, s6 = b"\x20\x01" + b"\x00" * 13 + b"\x01", b"\x20\x01" + b"\x00" * 13 + b"\x02"
    pk += [(t0 + 2.5, _tcp_packet(s6, c6, 8080, 51000, A | P, payload=b"q" * 70, v6=True)),
           (t0 + 3.5, _tcp_packet(c6, s6, 51000, 8080, A, v6=True))]
    udp = dpkt.udp.UDP(sport=53, dport=5353, data=b"d" * 10)
    udp_ip = dpkt.ip.IP(src=c, dst=s, p=17, data=udp, len=20 + len(udp))
    pk.append((t0 + 4.0, bytes(dpkt.ethernet.Ethernet(src=b"\x00" * 6, dst=b"\x01" * 6, data=udp_ip))))
    return sorted(pk, key=lambda p: p[0])


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_pcap_reconstruction(tmp_path, fmt):
    dpkt = pytest.importorskip("dpkt", reason="the pcap reader needs dpkt (pip install dpkt)")
    path = tmp_path / f"t.{fmt}"
    with open(path, "wb") as fh:
        w = dpkt.pcap.Writer(fh) if fmt == "pcap" else dpkt.pcapng.Writer(fh)
        for t, frame in _capture():
            w.writepkt(frame, ts=t)
    conns = read_pcap(path)
    assert conns.info["tcp_connections"] == 3 and conns.info["non_tcp_packets"] == 1
    assert len(conns) == 3
    assert [cid.split("#")[0] for cid in conns.ids] == [  # ordered by first interval
        "10.0.0.1:40000>10.0.0.2:443", "2001::1:51000>2001::2:8080", "10.0.0.1:40000>10.0.0.2:443"]
    first, v6, second = 0, 1, 2
    s1 = conns.series(first)
    assert (int(conns.start[first]), int(conns.end[first]), conns.end_kind[first]) == (0, 7, END_CLOSE)
    assert s1["bytes_in"].tolist() == [100, 0, 0, 0, 0, 50, 0, 0]
    assert s1["bytes_out"].tolist() == [0, 1000, 0, 0, 0, 0, 0, 0]
    assert s1["packets_in"].sum() == 5 and s1["packets_out"].sum() == 3
    assert (int(conns.start[second]), int(conns.end[second]), conns.end_kind[second]) == (9, 9, END_CLOSE)
    assert conns.series(second)["bytes_out"].tolist() == [300]
    assert conns.end_kind[v6] == END_CENSORED
    assert conns.series(v6)["bytes_out"].tolist() == [70, 0]
    assert sorted(conns.classes) == ["443", "8080"]
    assert load_trace(path).ids == conns.ids  # dispatch by magic number
    r = simulate(conns, "activity", "ses")
    assert r.connections == 3 and r.active_intervals == 5


def test_csv_reader_and_round_trip(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("conn_id,t,dir,bytes,packets\n"
                    "a,100.2,in,500,1\n" "a,100.7,out,1500,2\n" "b,101.0,in,0,0\n" "a,103.4,in,10,1\n"
                    "a,104.0,close,0,0\n" "b,109.9,out,70,1\n" "b,110.5,vanish,0,0\n" "c,102.0,s2c,5,1\n")
    conns = read_csv(path)
    assert conns.ids == ["a", "b", "c"]
    assert conns.start.tolist() == [0, 1, 2] and conns.end.tolist() == [4, 10, 2]
    assert conns.end_kind.tolist() == [END_CLOSE, END_VANISH, END_CENSORED]
    assert conns.series(0)["bytes_in"].tolist() == [500, 0, 0, 10, 0]
    assert conns.series(0)["bytes_out"].tolist() == [1500, 0, 0, 0, 0]
    assert conns.active_intervals == 4 and conns.connection_intervals == 5 + 10 + 1
    bad = tmp_path / "bad.csv"
    bad.write_text("a,1,sideways,1,1\n")
    with pytest.raises(ValueError, match="dir must be"):
        read_csv(bad)
    bad.write_text("a,1,in,1,1\na,2,close,0,0\na,3,in,1,1\n")
    with pytest.raises(ValueError, match="after its"):
        read_csv(bad)

    gen = synthetic.generate(150, seed=4, duration_s=30, vanish_share=0.2)
    write_csv(gen, tmp_path / "gen.csv")
    back = read_csv(tmp_path / "gen.csv")
    assert sorted(back.ids) == sorted(gen.ids)
    pos = {cid: i for i, cid in enumerate(back.ids)}
    for i, cid in enumerate(gen.ids):
        j = pos[cid]
        assert (back.start[j], back.end[j], back.end_kind[j]) == (gen.start[i], gen.end[i], gen.end_kind[i])
        a, b = gen.series(i), back.series(j)
        for key in ("k", "bytes_in", "bytes_out", "packets_in", "packets_out"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{cid} {key}")


def test_synthetic_generator_is_seeded_and_shaped():
    a = synthetic.generate(500, seed=1, duration_s=120)
    b = synthetic.generate(500, seed=1, duration_s=120)
    c = synthetic.generate(500, seed=2, duration_s=120)
    np.testing.assert_array_equal(a.ev_bytes, b.ev_bytes)
    assert a.ev_bytes.shape != c.ev_bytes.shape or (a.ev_bytes != c.ev_bytes).any()
    assert set(a.classes) == set(synthetic.KINDS)
    life = a.end - a.start + 1
    act = np.bincount(a.ev_conn, minlength=len(a))
    kind = np.array([a.classes[k] for k in a.klass])
    assert (act[kind == "bulk"] == life[kind == "bulk"]).all()  # bulk: active every interval
    ka = kind == "keepalive"
    assert (act[ka] <= life[ka] // 10 + 1).all()  # keep-alive only: a ping every 10-60 s
    assert 0.5 < 1 - a.active_intervals / a.connection_intervals < 0.99  # mostly idle, as real traffic


# ---------------------------------------------------------------------- CLI


def test_cli_contract_json_and_plots(tmp_path):
    pytest.importorskip("dpkt", reason="the pcap reader needs dpkt (pip install dpkt)")
    pytest.importorskip("matplotlib", reason="--plots needs matplotlib (pip install matplotlib)")
    import dpkt

    write_csv(synthetic.generate(60, seed=3, duration_s=60, vanish_share=0.2), tmp_path / "syn.csv")
    with open(tmp_path / "cap.pcap", "wb") as fh:
        w = dpkt.pcap.Writer(fh)
        for t, frame in _capture():
            w.writepkt(frame, ts=t)
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "spoa", "backtest", str(tmp_path / "syn.csv"),
                           str(tmp_path / "cap.pcap"), "--json", str(out), "--plots", str(tmp_path / "plots"),
                           "--forecasters", "naive,ses", "--no-progress", "--loss", "0.05", "--silent-end", "0.3",
                           "--crash-rate", "30", "--loss-burst", "2", "--frontier"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "activity-naive" in proc.stdout and "fixed" in proc.stdout and "Frontier" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["default_policy"] == DEFAULT_POLICY and DEFAULT_POLICY in doc["policies"]
    assert set(doc["policies"]) == {"fixed", "volume-naive", "volume-ses", "activity-naive", "activity-ses"}
    for d in doc["policies"].values():
        for key in ("publishing_entries", "premature_expiries", "connection_intervals", "state_seconds_after_end",
                    "connections", "stale_state_seconds_per_silent_end", "state_seconds_held", "silent_ends"):
            assert isinstance(d[key], (int, float)), key
        assert d["silent_ends"] > 0  # 30 % of the closes, and every connection a crash ended
    assert doc["config"]["faults"] == {"silent_end": 0.3, "crash_rate": 30.0, "restart_intervals": 1,
                                       "loss_burst": 2.0}
    # crashes restart connections under new names: more connections than the traces hold
    assert doc["policies"]["fixed"]["connections"] >= 63
    fr = doc["frontier"]
    assert set(fr["best"]) == set(doc["policies"])
    values = {p["value"] for p in fr["points"] if p["run"] == "fixed"}
    assert {5000, 30000, 300000} <= values
    for run, front in fr["frontier"].items():
        assert all(p["feasible"] and p["run"] == run for p in front)
    assert set(doc["traces"]) == {"syn.csv", "cap.pcap"}
    assert doc["traces"]["syn.csv"]["policies"]["fixed"]["publishing_entries"] == \
        doc["traces"]["syn.csv"]["summary"]["connection_intervals"]
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert {"overhead_vs_premature.png", "samples-syn.csv.png", "frontier.png"} <= set(pngs)
    assert all((tmp_path / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)

    bad = subprocess.run([sys.executable, "-m", "spoa", "backtest", str(tmp_path / "syn.csv")],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert bad.returncode == 2 and "--json" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "spoa", "backtest", str(tmp_path / "syn.csv"), "--json",
                          str(out), "--silent-end", "1.5"], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=60)
    assert bad.returncode == 2 and "silent_end must be in [0, 1]" in bad.stderr
