"""`python -m spoa backtest`: run the matrix on traces, print a table, write JSON and plots.

JSON (``--json OUT``)::

    {"default_policy": NAME, "default_policy_reason": "...",
     "targets": {...}, "verdict": {...},          # the default policy vs the issue's targets
     "policies": {"fixed": {...}, NAME: {...}},   # summed over all traces
     "traces": {TRACE: {"summary": {...}, "policies": {...}, "verdict": {...},
                        "reference_forecast_zero": {...}}},
     "config": {...}, "elapsed_s": ...}

Each policy entry has at least publishing_entries, premature_expiries,
connection_intervals, state_seconds_after_end, connections (see
``simulate.Result.as_dict``). Plots (``--plots DIR``, PNG, matplotlib Agg):
``overhead_vs_premature.png`` (one point per run; per trace and overall) and
``samples-<trace>.png`` (predicted vs actual volume of a few connections of the
trace under the default policy and under the volume policy with the same
forecaster).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from .faults import Faults
from .frontier import ENTRIES_CUT_MIN, PREMATURE_MAX, STALE_VS_FIXED_MAX
from .simulate import DEFAULT_POLICY, FORECASTERS, POLICIES, Result, SimConfig, simulate_all, zero_forecast_reference
from .traces import Connections, load_trace

__all__ = ["TARGETS", "build_document", "command", "format_tables", "markdown_tables", "plot_all",
           "run_backtest"]

# the targets: the frontier's feasibility and best point are judged by the same numbers
TARGETS = {"entries_cut_min": ENTRIES_CUT_MIN, "premature_share_max": PREMATURE_MAX,
           "stale_vs_fixed_max": STALE_VS_FIXED_MAX}
DEFAULT_REASON = (
    "activity policy, next silence forecast by SES, lease.min_ms 12 s, safety 1, end bound on: on the real traces with 5 % "
    "record and hint loss and 20 % of closes never announced (and with 2 server-node crashes an hour) it is the frontier's best operating point (entries cut "
    ">= 70 % against the fixed 30 s lease, no premature expiry, stale state per silently ended connection under "
    "half the fixed lease's); the lease floor is the knob that trades entries for stale state; SES needs fewer "
    "entries than naive at equal stale state, TSB equals SES on silences and costs more; the volume policy's leases "
    "follow predicted bytes, so idle connections sit on the floor and its frontier lies above the activity policy's.")


# ------------------------------------------------------------------------------ progress


class _Progress:
    """rich progress bar on a terminal, a plain one without rich, nothing when not a TTY."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = max(int(total), 1)
        self.done = 0
        self.enabled = enabled and sys.stderr.isatty()
        self._rich = None
        self._last = 0.0
        self.label = ""
        if not self.enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        except ImportError:
            return
        self._rich = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                              TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                              auto_refresh=False, transient=True)
        self._task = self._rich.add_task("backtest", total=self.total)
        self._rich.start()

    def describe(self, label: str) -> None:
        self.label = label
        if self._rich is not None:
            self._rich.update(self._task, description=label)
            self._rich.refresh()

    def __call__(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and self.done < self.total:
            return
        self._last = now
        if self._rich is not None:
            self._rich.update(self._task, completed=min(self.done, self.total))
            self._rich.refresh()
        else:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{self.label[:30]:30s} [{bar:30s}] {100 * frac:5.1f}%")
            sys.stderr.flush()

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self.enabled:
            sys.stderr.write("\r" + " " * 75 + "\r")
            sys.stderr.flush()


# ------------------------------------------------------------------------------ running


def _sample_connections(conns: Connections, n: int) -> list[int]:
    """A few connections worth plotting: long-lived, with the most active intervals."""
    if n <= 0 or not len(conns):
        return []
    life = conns.end - conns.start + 1
    act = np.bincount(conns.ev_conn[conns.ev_total > 0], minlength=len(conns))
    score = np.where(life >= 10, act + 0.001 * life, -1.0)
    best = np.argsort(-score, kind="stable")[:n]
    return sorted(int(i) for i in best if score[i] >= 0)


def _stale_ratio(fixed: dict, d: dict) -> float | None:
    """Stale state per silently ended connection against the fixed lease's (None: no silent end)."""
    ref = fixed.get("stale_state_seconds_per_silent_end") or 0.0
    return d["stale_state_seconds_per_silent_end"] / ref if fixed.get("silent_ends") and ref > 0 else None


def _meets(fixed: dict, d: dict) -> tuple[bool, bool, bool]:
    cut, stale = d.get("entries_cut"), _stale_ratio(fixed, d)
    return (cut is not None and cut >= TARGETS["entries_cut_min"],
            d["premature_share"] <= TARGETS["premature_share_max"],
            stale is None or stale <= TARGETS["stale_vs_fixed_max"])


def _verdict(fixed: dict | None, default: dict | None) -> dict:
    if not fixed or not default:
        return {"evaluated": False}
    ok_cut, ok_prem, ok_stale = _meets(fixed, default)
    return {"evaluated": True, "entries_cut": default.get("entries_cut"), "premature_share": default["premature_share"],
            "stale_vs_fixed": _stale_ratio(fixed, default), "meets_entries_cut": ok_cut, "meets_premature": ok_prem,
            "meets_stale": ok_stale, "meets_targets": ok_cut and ok_prem and ok_stale}


def _best(policies: dict) -> str | None:
    """The run that best meets the targets: meets them all, then the largest cut,
    fewest premature expiries, least state after end, best active forecasts."""
    fixed = policies.get("fixed") or {}

    def key(item):
        name, d = item
        cut = d.get("entries_cut") or 0.0
        meets = all(_meets(fixed, d))
        fe = (d.get("forecast_error") or {}).get("active") or {}
        pin = fe.get("scaled_pinball")
        # forecasts for every active interval first (ARIMA has none until fitted)
        coverage = (fe.get("n") or 0) / d["active_intervals"] if d["active_intervals"] else 1.0
        return (not meets, -round(cut, 4), d["premature_share"], round(d["state_seconds_after_end"], 3),
                -round(coverage, 2), pin if pin is not None else math.inf, name)

    candidates = [(n, d) for n, d in policies.items() if n != "fixed"]
    return min(candidates, key=key)[0] if candidates else None


def build_document(traces: list[tuple[Connections, dict[str, Result]]], conf: SimConfig,
                   default: str = DEFAULT_POLICY, elapsed_s: float = 0.0) -> dict:
    doc_traces = {}
    totals: dict[str, Result] = {}
    for conns, results in traces:
        fixed = results.get("fixed")
        pol = {name: r.as_dict(fixed) for name, r in results.items()}
        summary = conns.summary()
        zero = zero_forecast_reference(conns, conf.pinball_q)
        doc_traces[conns.name] = {
            "summary": _jsonable(summary), "policies": pol,
            "verdict": _verdict(pol.get("fixed"), pol.get(default)),
            "reference_forecast_zero": Result("zero", "reference", "zero", conns.name, conns.interval_ms,
                                              forecast=zero).forecast_metrics(),
        }
        for name, r in results.items():
            totals[name] = r if name not in totals else totals[name].merge(r)
    fixed_total = totals.get("fixed")
    policies = {name: r.as_dict(fixed_total) for name, r in totals.items()}
    per_trace_ok = [t["verdict"].get("meets_targets") for t in doc_traces.values() if t["verdict"]["evaluated"]]
    verdict = _verdict(policies.get("fixed"), policies.get(default))
    verdict["traces_meeting_targets"] = int(sum(bool(v) for v in per_trace_ok))
    verdict["traces_evaluated"] = len(per_trace_ok)
    return {"default_policy": default, "default_policy_reason": DEFAULT_REASON, "targets": TARGETS,
            "verdict": verdict, "best_on_these_traces": _best(policies), "policies": policies,
            "traces": doc_traces, "config": _jsonable(conf.describe()), "elapsed_s": elapsed_s}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    return x


def run_backtest(paths: list[str], conf: SimConfig | None = None, *, interval_ms: int = 1000,
                 split_idle_s: float = 3600.0, policies=POLICIES, forecasters=FORECASTERS, jobs: int = 1,
                 samples: int = 4, default: str = DEFAULT_POLICY, progress: bool = True,
                 log=None) -> tuple[dict, list]:
    """Load and simulate every trace. Returns (JSON document, [(conns, results)])."""
    conf = conf or SimConfig()
    started = time.perf_counter()
    loaded: list[Connections] = []
    timings: dict[str, dict] = {}
    for path in paths:
        t0 = time.perf_counter()
        conns = load_trace(path, interval_ms, split_idle_s)
        timings[conns.name] = {"read_s": time.perf_counter() - t0}
        if log:
            log(f"{conns.name}: {len(conns)} connections, {conns.connection_intervals} connection-intervals "
                f"({conns.active_intervals} active), read in {time.perf_counter() - t0:.1f} s")
        loaded.append(conns)
    from .simulate import passes

    n_passes = len(passes(policies, forecasters))
    bar = _Progress(sum(c.n_intervals - (int(c.start.min()) if len(c) else 0) for c in loaded) * n_passes,
                    progress)
    out = []
    try:
        for conns in loaded:
            bar.describe(conns.name)
            if not len(conns):
                out.append((conns, {}))
                continue
            t0 = time.perf_counter()
            results = simulate_all(conns, conf, policies, forecasters, samples=_sample_connections(conns, samples),
                                   progress=bar, jobs=jobs)
            timings[conns.name]["simulate_s"] = time.perf_counter() - t0
            out.append((conns, results))
    finally:
        bar.close()
    doc = build_document(out, conf, default, time.perf_counter() - started)
    doc["timings"] = {"jobs": jobs, "traces": timings}
    return doc, out


# ------------------------------------------------------------------------------ tables


def _pct(x, digits=1):
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _num(x, digits=2):
    if x is None:
        return "-"
    if isinstance(x, int) or float(x).is_integer() and abs(x) >= 1000:
        return f"{int(x):,}"
    return f"{x:.{digits}f}"


ROW_HEADER = ("policy", "entries", "cut", "entries/s", "bytes/s", "premature", "prem %", "after-end s",
              "stale/silent s", "held s", "mean lease s", "MASE act", "pinball act", "MASE idle")


def _rows(policies: dict) -> list[tuple[str, ...]]:
    rows = []
    for name, d in policies.items():
        fe = d.get("forecast_error") or {}
        act, idle = fe.get("active") or {}, fe.get("idle") or {}
        lease = d.get("mean_lease_ms")
        rows.append((name, _num(d["publishing_entries"]), _pct(d.get("entries_cut")),
                     _num(d["publishing_entries_per_s"], 1), _num(d["publishing_bytes_per_s"], 0),
                     _num(d["premature_expiries"]), _pct(d["premature_share"], 3),
                     _num(d["state_seconds_after_end"], 1), _num(d["stale_state_seconds_per_silent_end"], 1),
                     _num(d["state_seconds_held"], 0), "-" if lease is None else f"{lease / 1000:.1f}",
                     _num(act.get("mase")), _num(act.get("scaled_pinball")), _num(idle.get("mase"))))
    return rows


def _title(name: str, s: dict) -> str:
    return (f"{name}: {s['connections']} connections, {s['connection_intervals']:,} connection-intervals "
            f"({s['idle_intervals']:,} idle, {s['active_intervals']:,} active), {s['duration_s']:.0f} s busy")


def format_tables(doc: dict, per_trace: bool = True) -> str:
    """Plain-text tables (what is printed without rich)."""
    blocks = []
    items = list(doc["traces"].items()) if per_trace else []
    all_conns = sum(t["summary"]["connections"] for t in doc["traces"].values())
    all_ci = sum(t["summary"]["connection_intervals"] for t in doc["traces"].values())
    all_act = sum(t["summary"]["active_intervals"] for t in doc["traces"].values())
    overall = {"connections": all_conns, "connection_intervals": all_ci, "active_intervals": all_act,
               "idle_intervals": all_ci - all_act,
               "duration_s": sum(t["summary"]["duration_s"] for t in doc["traces"].values())}
    for title, pols in [(_title(n, t["summary"]), t["policies"]) for n, t in items] + \
            [(_title(f"ALL ({len(doc['traces'])} traces)", overall), doc["policies"])]:
        rows = [ROW_HEADER] + _rows(pols)
        widths = [max(len(r[i]) for r in rows) for i in range(len(ROW_HEADER))]
        lines = [title]
        for j, r in enumerate(rows):
            lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        blocks.append("\n".join(lines))
    blocks.append(_verdict_text(doc))
    if doc.get("frontier"):
        blocks.append(format_frontier(doc["frontier"]))
    return "\n\n".join(blocks)


def _verdict_text(doc: dict) -> str:
    v = doc["verdict"]
    return (f"default policy {doc['default_policy']}: " + (
        "not evaluated" if not v.get("evaluated") else
        f"entries cut {_pct(v['entries_cut'])} (target >= {_pct(TARGETS['entries_cut_min'], 0)}), premature "
        f"{_pct(v['premature_share'], 3)} of connection-intervals (target <= "
        f"{_pct(TARGETS['premature_share_max'], 2)}), stale state per silent end "
        f"{'-' if v['stale_vs_fixed'] is None else _pct(v['stale_vs_fixed'], 0)} of the fixed lease's (target <= "
        f"{_pct(TARGETS['stale_vs_fixed_max'], 0)}): {'MET' if v['meets_targets'] else 'NOT MET'}; "
        f"{v['traces_meeting_targets']}/{v['traces_evaluated']} traces meet them all. "
        f"Best on these traces: {doc['best_on_these_traces']}"))


def frontier_document(points: list[dict], default: str) -> dict:
    """The sweep's points, each run's frontier and best operating point, and whether
    the default's forecaster beats naive on the frontier of its policy."""
    from .frontier import best_point, entries_saving, frontier

    fronts = frontier(points)
    policy = default.split("-", 1)[0]
    naive = f"{policy}-naive"
    return {"premature_max": PREMATURE_MAX, "entries_cut_min": ENTRIES_CUT_MIN, "stale_vs_fixed_max": STALE_VS_FIXED_MAX,
            "points": points,
            "frontier": fronts, "best": {run: best_point(front) for run, front in fronts.items()},
            # > 0: the default's forecaster needs fewer entries than naive at equal stale state
            "default_saving_vs_naive": (entries_saving(fronts.get(default, []), fronts.get(naive, []))
                                        if default != naive and naive in fronts else None)}


def format_frontier(fr: dict) -> str:
    """The best operating point of each policy x forecaster."""
    head = ("run", "knob", "value", "entries", "cut", "premature", "stale/silent s", "held s", "frontier points")
    rows = [head]
    for run, p in fr["best"].items():
        if p is None:
            rows.append((run, "-", "-", "-", "-", "-", "-", "-", "0 (none feasible)"))
            continue
        value = f"{p['value']:,}" if isinstance(p["value"], int) and not isinstance(p["value"], bool) else str(p["value"])
        rows.append((run, p["knob"], value, f"{p['publishing_entries']:,}", _pct(p["entries_cut"]),
                     f"{p['premature_expiries']} ({_pct(p['premature_share'], 3)})",
                     f"{p['stale_state_seconds_per_silent_end']:.1f}", f"{p['state_seconds_held']:,.0f}",
                     str(len(fr["frontier"][run]))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"Frontier: best operating point per run (premature <= {_pct(fr['premature_max'], 2)}; fewest entries "
             f"at stale state <= {_pct(fr['stale_vs_fixed_max'], 0)} of the fixed 30 s lease's, else the least "
             f"stale among cuts >= {_pct(fr['entries_cut_min'], 0)}); the default needs "
             f"{_pct(fr['default_saving_vs_naive'])} fewer entries than naive at equal stale state"]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_tables(doc: dict, per_trace: bool = True, file=None) -> None:
    file = file or sys.stdout
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_tables(doc, per_trace), file=file)
        return
    console = Console(file=file, width=max(160, Console(file=file).width))
    items = list(doc["traces"].items()) if per_trace else []
    for name, t in items + [("ALL", {"summary": None, "policies": doc["policies"]})]:
        s = t["summary"]
        title = _title(name, s) if s else f"ALL ({len(doc['traces'])} traces)"
        table = Table(title=title, title_justify="left")
        for i, h in enumerate(ROW_HEADER):
            table.add_column(h, justify="left" if i == 0 else "right")
        for r in _rows(t["policies"]):
            style = "bold" if r[0] == doc["default_policy"] else None
            table.add_row(*r, style=style)
        console.print(table)
    console.print(_verdict_text(doc))
    if doc.get("frontier"):
        console.print(format_frontier(doc["frontier"]), soft_wrap=True)


def markdown_tables(doc: dict, compare: tuple[str, ...] = ("volume-ses",)) -> str:
    """Per-trace table (idle and active intervals apart) for benchmarks/RESULTS.md."""
    default = doc["default_policy"]
    head = ("| trace | conns | idle int. | active int. | fixed entries | "
            f"{default} entries (idle / active) | cut | premature (share) | after-end s |"
            + "".join(f" {c} cut | {c} premature |" for c in compare))
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]

    def row(name, s, pols, bold=False):
        f, d = pols.get("fixed"), pols.get(default)
        if not f or not d:
            return f"| {name} | {s['connections']} | - | - | - | - | - | - | - |"
        b = "**" if bold else ""
        cells = [f"{b}{name}{b}", f"{s['connections']:,}", f"{s['idle_intervals']:,}", f"{s['active_intervals']:,}",
                 f"{f['publishing_entries']:,}",
                 f"{d['publishing_entries']:,} ({d['entries_idle_intervals']:,} / {d['entries_active_intervals']:,})",
                 _pct(d.get("entries_cut")), f"{d['premature_expiries']} ({_pct(d['premature_share'], 3)})",
                 f"{d['state_seconds_after_end']:.1f}"]
        for c in compare:
            dc = pols.get(c)
            cells += ["-", "-"] if not dc else [_pct(dc.get("entries_cut")),
                                                f"{dc['premature_expiries']} ({_pct(dc['premature_share'], 3)})"]
        return "| " + " | ".join(cells) + " |"

    for name, t in doc["traces"].items():
        lines.append(row(name, t["summary"], t["policies"]))
    s_all = {"connections": sum(t["summary"]["connections"] for t in doc["traces"].values()),
             "idle_intervals": sum(t["summary"]["idle_intervals"] for t in doc["traces"].values()),
             "active_intervals": sum(t["summary"]["active_intervals"] for t in doc["traces"].values())}
    lines.append(row("all traces", s_all, doc["policies"], bold=True))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ plots


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def plot_all(doc: dict, runs: list, out_dir: str | os.PathLike, compare_policy: str = "volume") -> list[Path]:
    """overhead_vs_premature.png and one samples-<trace>.png per trace (with samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    # 1. overhead vs premature expiries, one point per run (overall), faint per trace
    fig, ax = plt.subplots(figsize=(9, 6))
    colors = {"fixed": "black", "volume": "tab:orange", "activity": "tab:blue"}
    for t in doc["traces"].values():
        for name, d in t["policies"].items():
            if d.get("entries_vs_fixed") is not None:
                ax.scatter(100 * d["entries_vs_fixed"], 100 * d["premature_share"], s=10, alpha=0.25,
                           color=colors.get(d["policy"], "grey"))
    seen = set()
    groups: dict[tuple, list[str]] = {}  # runs at the same point share one label
    for name, d in doc["policies"].items():
        if d.get("entries_vs_fixed") is None:
            continue
        x, y = 100 * d["entries_vs_fixed"], 100 * d["premature_share"]
        groups.setdefault((round(x, 2), round(y, 4), d["policy"]), []).append(name)
        label = d["policy"] if d["policy"] not in seen else None
        seen.add(d["policy"])
        ax.scatter(x, y, s=160 if name == doc["default_policy"] else 60, color=colors.get(d["policy"], "grey"),
                   edgecolor="white", zorder=3, label=label, marker="*" if name == doc["default_policy"] else "o")
    for i, ((x, y, policy), names) in enumerate(sorted(groups.items())):
        short = [n.split("-", 1)[1] if "-" in n else n for n in names]
        text = names[0] if len(names) == 1 else f"{policy}: {', '.join(short)}"
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, 6 + 10 * (i % 3)), fontsize=7)
    ax.axvline(100 * (1 - TARGETS["entries_cut_min"]), color="green", ls="--", lw=1)
    ax.axhline(100 * TARGETS["premature_share_max"], color="red", ls="--", lw=1)
    ax.set_xlabel("publishing entries, % of fixed lease (lower = less overhead)")
    ax.set_ylabel("premature expiries, % of connection-intervals")
    loss = doc["config"].get("loss", 0)
    ax.set_title(f"Lease overhead vs premature expiries ({len(doc['traces'])} traces; big = all traces, "
                 f"small = per trace; record loss {100 * loss:g} %)", fontsize=9)
    ax.set_xlim(0, 105)
    ax.set_ylim(bottom=-0.02 * max(0.2, ax.get_ylim()[1]))
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    path = out / "overhead_vs_premature.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    if doc.get("frontier"):
        written.append(_plot_frontier(doc, out, plt, colors))

    # 2. predicted vs actual volume of sample connections
    default = doc["default_policy"]
    fc_name = default.split("-", 1)[1] if "-" in default else "ses"
    other = f"{compare_policy}-{fc_name}"
    for conns, results in runs:
        r_def, r_other = results.get(default), results.get(other)
        if r_def is None or not r_def.samples:
            continue
        ids = sorted(r_def.samples)
        fig, axes = plt.subplots(len(ids), 1, figsize=(11, 2.6 * len(ids)), squeeze=False)
        for ax, c in zip(axes[:, 0], ids):
            rec = r_def.samples[c]
            t = (rec["k"] - rec["k"][0]) * conns.interval_ms / 1000.0
            ax.fill_between(t, rec["actual"], step="post", color="lightgrey", label="actual bytes")
            ax.step(t, rec["forecast"], where="post", color="tab:blue", lw=1.2,
                    label=f"{fc_name} forecast in force ({default})")
            if r_other is not None and c in r_other.samples:
                ax.step(t, r_other.samples[c]["forecast"], where="post", color="tab:orange", lw=1, ls="--",
                        label=f"{fc_name} forecast in force ({other})")
            pub = rec["published"]
            top = max(float(np.nanmax(rec["actual"])) if rec["actual"].size else 1.0, 1.0)
            ax.plot(t[pub], np.full(int(pub.sum()), top * 1.05), "|", color="tab:blue", ms=6,
                    label=f"published ({default})")
            ax2 = ax.twinx()
            ax2.step(t, rec["lease_ms"] / 1000.0, where="post", color="tab:green", lw=0.8, alpha=0.7)
            ax2.set_ylabel("lease s", color="tab:green", fontsize=8)
            ax.set_ylabel("bytes / interval", fontsize=8)
            ax.set_title(f"{conns.ids[c]}  ({int(pub.sum())} of {pub.size} intervals published)", fontsize=8)
            ax.set_yscale("symlog", linthresh=100)
            ax.set_ylim(bottom=0)
        axes[0, 0].legend(fontsize=7, loc="upper right")
        axes[-1, 0].set_xlabel("seconds since the connection started")
        fig.suptitle(f"{conns.name}: predicted vs actual volume (lease on the right axis)", fontsize=10)
        fig.tight_layout()
        path = out / f"samples-{_safe(conns.name)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _plot_frontier(doc: dict, out: Path, plt, colors: dict) -> Path:
    """frontier.png: each run's frontier (entries as % of the fixed 30 s lease's, log scale, against
    stale state per silent end), best points starred, the fixed lease's sweep, the target box."""
    fr = doc["frontier"]
    fig, ax = plt.subplots(figsize=(9, 6))
    styles = ["-", "--", ":", "-."]

    def xy(points):
        return ([100 * (1 - p["entries_cut"]) for p in points], [p["stale_state_seconds_per_silent_end"] for p in points])

    fixed = sorted((p for p in fr["points"] if p["run"] == "fixed" and p["feasible"]), key=lambda p: p["value"])
    if fixed:
        xs, ys = xy(fixed)
        ax.plot(xs, ys, "k-", marker="s", ms=3, lw=0.8, label="fixed (5-300 s)")
    for i, (run, front) in enumerate(sorted(fr["frontier"].items())):
        if not front or run == "fixed":
            continue
        policy = front[0]["policy"]
        xs, ys = xy(front)
        ax.plot(xs, ys, styles[i % len(styles)], marker="o", ms=3, lw=2.5 if run == doc["default_policy"] else 1.0,
                color=colors.get(policy, "grey"), label=run, alpha=0.85)
        best = fr["best"].get(run)
        if best is not None:
            bx, by = xy([best])
            ax.scatter(bx, by, marker="*", s=160 if run == doc["default_policy"] else 50,
                       color=colors.get(policy, "grey"), edgecolor="black" if run == doc["default_policy"] else None,
                       zorder=3)
    ref = next((p for p in fixed if p["value"] == 30_000), None)
    if ref is not None:
        ax.axvline(100 * (1 - fr["entries_cut_min"]), color="green", ls="--", lw=1)
        ax.axhline(fr["stale_vs_fixed_max"] * ref["stale_state_seconds_per_silent_end"], color="red", ls="--", lw=1)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        axis(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.set_xlabel("publishing entries, % of the fixed 30 s lease's (log; green: the 70 % cut)")
    ax.set_ylabel("stale state-seconds per silently ended connection (red: half the fixed 30 s lease's)")
    c = doc["config"]
    f = c.get("faults", {})
    ax.set_title(f"Frontier at premature <= {100 * fr['premature_max']:g} % (record + hint loss {100 * c.get('loss', 0):g} %, "
                 f"burst {f.get('loss_burst', 0):g}, silent end {100 * f.get('silent_end', 0):g} %, crashes "
                 f"{f.get('crash_rate', 0):g}/h); star = best point", fontsize=9)
    ax.set_ylim(0, min(60, ax.get_ylim()[1]))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    path = out / "frontier.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ the command


def _lease_settings(agent_config: str | None):
    import dataclasses

    from ... import config as cfg
    from ...servernode.lease_module import LeaseSettings

    lease = (cfg.load(cfg.AGENT_SCHEMA, agent_config) if agent_config else cfg.defaults(cfg.AGENT_SCHEMA))["lease"]
    names = {f.name for f in dataclasses.fields(LeaseSettings)}
    return LeaseSettings(**{k: v for k, v in lease.items() if k in names})


def _names(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in known]
    if bad or not items:
        raise SystemExit(f"spoa-lease backtest: unknown {what} {', '.join(bad) or '(none)'}; known: {', '.join(known)}")
    return items


def command(args) -> int:
    from ... import config as cfg

    # the LB node's real config file (its key_file must exist: it is validated as the node does)
    lbnode = cfg.load(cfg.LBNODE_SCHEMA, args.lbnode_config) if args.lbnode_config else cfg.defaults(cfg.LBNODE_SCHEMA)
    try:
        faults = Faults(silent_end=args.silent_end, crash_rate=args.crash_rate, loss_burst=args.loss_burst)
        conf = SimConfig(lease=lbnode["lease"], forecast=lbnode["forecast"],
                         server=_lease_settings(args.agent_config), loss=args.loss,
                         hint_loss=args.loss if args.hint_loss is None else args.hint_loss, lb_phase=args.lb_phase,
                         seed=args.seed, pinball_q=args.quantile, faults=faults)
    except ValueError as exc:
        print(f"spoa-lease backtest: {exc}", file=sys.stderr)
        return 2
    policies = _names(args.policies, POLICIES, "policy")
    forecasters = _names(args.forecasters, FORECASTERS, "forecaster")
    if "arima" in forecasters:
        try:
            import statsmodels  # noqa: F401 - ARIMA's refits need it
        except ImportError:
            if args.forecasters != ",".join(FORECASTERS):
                print("spoa-lease backtest: forecaster arima needs statsmodels (pip install 'spoa-lease[arima]')",
                      file=sys.stderr)
                return 2
            forecasters = tuple(f for f in forecasters if f != "arima")
            print("spoa-lease backtest: statsmodels is not installed: running without the arima forecaster",
                  file=sys.stderr)
    paths = []
    for p in args.traces:
        if os.path.isdir(p):
            paths.extend(str(q) for q in sorted(Path(p).iterdir()) if q.is_file() and not q.name.endswith(".md"))
        elif Path(p).name.endswith(".md"):
            continue  # e.g. SOURCES.md next to the captures when called with a glob
        else:
            paths.append(p)
    if not paths:
        print("spoa-lease backtest: no trace files", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr)

    doc, runs = run_backtest(paths, conf, interval_ms=args.interval_ms, split_idle_s=args.split_idle,
                             policies=policies, forecasters=forecasters, jobs=args.jobs, samples=args.samples,
                             progress=not args.no_progress, log=log)
    if args.frontier:
        from .frontier import sweep

        bar = _Progress(0, False)
        doc["frontier"] = frontier_document(sweep([c for c, _ in runs], conf, policies, forecasters, args.jobs, bar),
                                            doc["default_policy"])
    if not args.quiet:
        print_tables(doc, per_trace=not args.summary_only)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(doc, fh, indent=1)
    if args.markdown:
        Path(args.markdown).write_text(markdown_tables(doc) + "\n")
    if args.plots:
        for path in plot_all(doc, runs, args.plots):
            log(f"wrote {path}")
    log(f"wrote {args.json} ({doc['elapsed_s']:.1f} s)")
    return 0
