"""Forecasting + lease policy: cost per connection per interval, numpy vs pure Python.

  PYTHONPATH=. python benchmarks/bench_forecast.py [--sizes 100000 1000000]
        [--rounds 15] [--py-rounds 3] [--active 0.05] [--warmup 4] [--json OUT]
        [--results benchmarks/RESULTS.md [--notes NOTES.md]]

One interval's work for N tracked series (all N publish every interval):

  forecaster rows   f.update(slots, bytes); pred = f.forecast(slots);
                    VolumePolicy.leases(pred)           -> lease_ms, source
  activity row      ActivityPolicy.observe(slots, bytes > 0, now);
                    ActivityPolicy.leases(slots)
  tsb+both row      TSB update/forecast + VolumePolicy + ActivityPolicy

Traffic: each series is active in an interval with probability --active
(default 5 %, the real traces have 1-7 %), lognormal bytes when active.
``slots`` is an int array 0..N-1 (fancy indexing, as the caller passes the
slots published this interval); the ``ses (slots=None)`` row uses the
all-slots fast path, ``ses (shuffled slots)`` a random permutation (random
memory access). The pure-Python column runs the same recursion per series in
a Python loop over lists (state in lists, one float per series and field),
what a per-connection object model would cost at best. Both columns are
checked to produce identical leases on a small N before timing.

Reported: ns per connection per interval (best and median of the rounds);
target <= 300 ns vectorized. --results writes/replaces the
"## Forecasting and lease policies" section of that file, leaving the others.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from spoa.lbnode.forecast import ARIMA, SES, TSB, Croston, DampedHolt
from spoa.lbnode.lease_policy import ActivityPolicy, LeaseBounds, VolumePolicy
from _machine import cpu_model  # noqa: E402 - benchmarks/ is the script's folder

BOUNDS = LeaseBounds(min_ms=5_000, max_ms=600_000, standard_ms=30_000)
THRESHOLD = 0.05  # bytes per ms of lease
INTERVAL_MS = 1000
SECTION = "## Forecasting and lease policies"


# ----------------------------------------------------------------- vectorized


def vec_ses(n):
    return SES(n, alpha=0.3)


def vec_holt(n):
    return DampedHolt(n, alpha=0.3, beta=0.1, phi=0.9)


def vec_sba(n):
    return Croston(n, alpha=0.1, variant="sba")


def vec_tsb(n):
    return TSB(n, alpha=0.1, beta=0.1)


def vec_arima(n):
    f = ARIMA(n, order=(1, 0, 1))
    f.set_params(0, ar=[0.3], ma=[0.2], const=500.0)
    return f


FORECASTERS = {
    "ses": vec_ses,
    "damped_holt": vec_holt,
    "croston_sba": vec_sba,
    "tsb": vec_tsb,
    "arima(1,0,1)": vec_arima,
}


def vectorized_step(kind: str, n: int):
    """Returns (state, step(y, now) -> (lease, source))."""
    vol = VolumePolicy(BOUNDS, THRESHOLD)
    slots = np.arange(n, dtype=np.intp)
    if kind in FORECASTERS:
        f = FORECASTERS[kind](n)

        def step(y, now):
            f.update(slots, y)
            return vol.leases(None, f.forecast(slots))
        return f, step
    if kind == "ses (slots=None)":
        f = vec_ses(n)

        def step(y, now):
            f.update(None, y)
            return vol.leases(None, f.forecast(None))
        return f, step
    if kind == "ses (shuffled slots)":
        f = vec_ses(n)
        perm = np.random.default_rng(0).permutation(n)

        def step(y, now):
            f.update(perm, y)
            return vol.leases(None, f.forecast(perm))
        return f, step
    if kind == "activity":
        act = ActivityPolicy(BOUNDS, interval_ms=INTERVAL_MS, capacity=n)

        def step(y, now):
            act.observe(slots, y > 0, now)
            return act.leases(slots)
        return act, step
    if kind == "tsb+volume+activity":
        f = vec_tsb(n)
        act = ActivityPolicy(BOUNDS, interval_ms=INTERVAL_MS, capacity=n)

        def step(y, now):
            f.update(slots, y)
            lv, sv = vol.leases(None, f.forecast(slots))
            act.observe(slots, y > 0, now)
            la, sa = act.leases(slots)
            return np.maximum(lv, la), np.maximum(sv, sa)
        return (f, act), step
    raise KeyError(kind)


# ----------------------------------------------------------------- pure Python


def _lease(v, lo=BOUNDS.min_ms, hi=BOUNDS.max_ms, std=BOUNDS.standard_ms, thr=THRESHOLD):
    if not (v >= 0.0 and v != math.inf):  # NaN, inf, negative
        return std, 2
    raw = v / thr
    raw = lo if raw < lo else hi if raw > hi else raw
    return math.ceil(raw), 1


def python_step(kind: str, n: int):
    """Per-series scalar recursions over Python lists. Same answers as the numpy rows."""
    lease = [0] * n
    src = [0] * n
    nobs = [0] * n
    if kind in ("ses", "ses (slots=None)", "ses (shuffled slots)"):
        a = 0.3
        level = [0.0] * n

        def step(y, now):
            for i in range(n):
                v = y[i]
                lv = v if nobs[i] == 0 else level[i] + a * (v - level[i])
                level[i] = lv
                nobs[i] += 1
                lease[i], src[i] = _lease(lv if lv > 0.0 else 0.0)
            return lease, src
        return step
    if kind == "damped_holt":
        a, b, phi = 0.3, 0.1, 0.9
        level, trend = [0.0] * n, [0.0] * n

        def step(y, now):
            for i in range(n):
                v = y[i]
                if nobs[i] == 0:
                    lv, tv = v, 0.0
                else:
                    lp, damped = level[i], phi * trend[i]
                    lv = a * v + (1 - a) * (lp + damped)
                    tv = b * (lv - lp) + (1 - b) * damped
                level[i], trend[i] = lv, tv
                nobs[i] += 1
                fc = lv + phi * tv
                lease[i], src[i] = _lease(fc if fc > 0.0 else 0.0)
            return lease, src
        return step
    if kind == "croston_sba":
        a = 0.1
        factor = 1 - a / 2
        size, interval, since = [0.0] * n, [0.0] * n, [0.0] * n

        def step(y, now):
            for i in range(n):
                v = y[i]
                q = since[i] + 1.0
                if v > 0.0:
                    p = interval[i]
                    if p == 0.0:
                        size[i], interval[i] = v, q
                    else:
                        size[i] += a * (v - size[i])
                        interval[i] = p + a * (q - p)
                    q = 0.0
                since[i] = q
                p = interval[i]
                lease[i], src[i] = _lease(size[i] * factor / p if p > 0.0 else 0.0)
            return lease, src
        return step
    if kind == "tsb":
        return _python_tsb(n, lease, src, nobs)
    if kind == "arima(1,0,1)":
        ref = vec_arima(1)
        phi = ref.params.phi[0].tolist()
        gains = [g.tolist() for g in ref.params.gain[0]]
        mu = float(ref.params.mu[0])
        h = len(gains) - 1
        s0, s1 = [0.0] * n, [0.0] * n  # the m = 2 state

        def step(y, now):
            for i in range(n):
                t = nobs[i]
                k = gains[t if t < h else h]
                a0 = s0[i]
                v = (y[i] - mu) - a0
                s0[i] = phi[0] * a0 + s1[i] + k[0] * v
                s1[i] = phi[1] * a0 + k[1] * v
                nobs[i] = t + 1
                fc = mu + s0[i]
                lease[i], src[i] = _lease(fc if fc > 0.0 else 0.0)
            return lease, src
        return step
    if kind == "activity":
        return _python_activity(n, lease, src)
    if kind == "tsb+volume+activity":
        tsb = _python_tsb(n, [0] * n, [0] * n, nobs)
        act = _python_activity(n, [0] * n, [0] * n)

        def step(y, now):
            lv, sv = tsb(y, now)
            la, sa = act(y, now)
            for i in range(n):
                lease[i] = lv[i] if lv[i] > la[i] else la[i]
                src[i] = sv[i] if sv[i] > sa[i] else sa[i]
            return lease, src
        return step
    raise KeyError(kind)


def _python_tsb(n, lease, src, nobs):
    a, b = 0.1, 0.1
    size, prob, seen = [0.0] * n, [0.0] * n, [False] * n

    def step(y, now):
        for i in range(n):
            v = y[i]
            d = 1.0 if v > 0.0 else 0.0
            prob[i] = d if nobs[i] == 0 else prob[i] + b * (d - prob[i])
            nobs[i] += 1
            if d:
                size[i] = size[i] + a * (v - size[i]) if seen[i] else v
                seen[i] = True
            fc = prob[i] * size[i]
            lease[i], src[i] = _lease(fc if fc > 0.0 else 0.0)
        return lease, src
    return step


def _python_activity(n, lease, src, q=0.99, safety=1.5, window=8):
    last = [None] * n
    gapq = [None] * n
    rings = [[] for _ in range(n)]
    silence = 1.5 * INTERVAL_MS
    lo, hi, std = BOUNDS.min_ms, BOUNDS.max_ms, BOUNDS.standard_ms

    def quantile(xs):
        s = sorted(xs)
        pos = (len(s) - 1) * q
        k = int(pos)
        k2 = min(k + 1, len(s) - 1)
        return s[k] + (pos - k) * (s[k2] - s[k])

    def step(y, now):
        for i in range(n):
            if y[i] > 0.0:
                prev = last[i]
                last[i] = now
                if prev is not None:
                    gap = now - prev
                    if gap > silence:
                        ring = rings[i]
                        ring.append(float(np.float32(gap)))
                        if len(ring) > window:
                            del ring[0]
                        gapq[i] = quantile(ring)
                    elif gapq[i] is None:
                        gapq[i] = gap
            g = gapq[i]
            if g is None:
                lease[i], src[i] = std, 2
            else:
                raw = g * safety + INTERVAL_MS
                raw = lo if raw < lo else hi if raw > hi else raw
                lease[i], src[i] = math.ceil(raw), 1
        return lease, src
    return step


# ------------------------------------------------------------------- running

KINDS = list(FORECASTERS) + ["ses (slots=None)", "ses (shuffled slots)", "activity", "tsb+volume+activity"]


def traffic(n: int, rounds: int, active: float, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rounds):
        on = rng.random(n) < active
        out.append(np.where(on, np.floor(rng.lognormal(7.0, 2.0, n)) + 1.0, 0.0))
    return out


def check_twins(kind: str, n: int = 500, steps: int = 60) -> None:
    """The numpy and pure-Python rows must agree exactly on leases and sources."""
    _state, vstep = vectorized_step(kind, n)
    pstep = python_step(kind, n)
    for t, y in enumerate(traffic(n, steps, 0.2, seed=7)):
        now = (t + 1) * INTERVAL_MS * (1 + (t % 7 == 0) * 3)  # irregular gaps too
        lv, sv = vstep(y, now)
        lp, sp = pstep(y.tolist(), now)
        if not (np.array_equal(lv, lp) and np.array_equal(sv, sp)):
            bad = np.flatnonzero((lv != np.array(lp)) | (sv != np.array(sp)))[:5]
            raise AssertionError(f"{kind}: numpy and python leases differ at step {t}, slots {bad}: "
                                 f"{lv[bad]} vs {np.array(lp)[bad]}")


def state_bytes(state) -> float:
    objs = state if isinstance(state, tuple) else (state,)
    total = 0
    for o in objs:
        for v in vars(o).values():
            if isinstance(v, np.ndarray):
                total += v.nbytes
            elif hasattr(v, "buf"):  # History
                total += v.buf.nbytes + v.pos.nbytes + v.count.nbytes
    return total


def time_vectorized(kind: str, n: int, rounds: int, ys, warm) -> dict:
    state, step = vectorized_step(kind, n)
    for w, y in enumerate(warm):  # same warm-up as the Python column
        step(y, (w + 1) * INTERVAL_MS)
    base = len(warm) + 1
    times = []
    for r in range(rounds):
        y = ys[r % len(ys)]
        t0 = time.perf_counter()
        step(y, (base + r) * INTERVAL_MS)
        times.append(time.perf_counter() - t0)
    return {"best_ns": min(times) / n * 1e9, "median_ns": statistics.median(times) / n * 1e9,
            "state_bytes_per_slot": state_bytes(state) / n}


def time_python(kind: str, n: int, rounds: int, ys, warm) -> dict:
    step = python_step(kind, n)
    for w, y in enumerate(warm):
        step(y.tolist(), (w + 1) * INTERVAL_MS)
    base = len(warm) + 1
    lists = [y.tolist() for y in ys[:rounds]]
    times = []
    for r in range(rounds):
        t0 = time.perf_counter()
        step(lists[r], (base + r) * INTERVAL_MS)
        times.append(time.perf_counter() - t0)
    return {"best_ns": min(times) / n * 1e9, "median_ns": statistics.median(times) / n * 1e9}


def fmt_ns(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def render(report: dict) -> str:
    sizes = report["sizes"]
    lines = []
    head = "| per interval | " + " | ".join(
        f"numpy N={n:,} | Python N={n:,} | ×" for n in sizes) + " | state B/slot |"
    lines.append(head)
    lines.append("|---|" + "---:|---:|---:|" * len(sizes) + "---:|")
    for kind in report["kinds"]:
        cells = []
        for n in sizes:
            v = report["results"][str(n)][kind]["numpy"]
            p = report["results"][str(n)][kind].get("python")
            vc = f"{fmt_ns(v['best_ns'])} / {fmt_ns(v['median_ns'])}"
            pc = f"{fmt_ns(p['best_ns'])} / {fmt_ns(p['median_ns'])}" if p else "—"
            ratio = f"{p['median_ns'] / v['median_ns']:.0f}" if p else "—"
            cells += [vc, pc, ratio]
        sb = report["results"][str(sizes[-1])][kind]["numpy"]["state_bytes_per_slot"]
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {sb:.0f} |")
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    """Replace our section if present, else append it. Other sections are left alone."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{SECTION}\n\n{body.rstrip()}\n"
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        tail = text[nxt + 1:] if nxt >= 0 else ""
        path.write_text(text[:start] + block + ("\n" + tail if tail else ""), encoding="utf-8")
    else:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(("\n" if text and not text.endswith("\n\n") else "") + block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=15, help="timed intervals, numpy")
    parser.add_argument("--py-rounds", type=int, default=3, help="timed intervals, pure Python")
    parser.add_argument("--py-max", type=int, default=1_000_000, help="skip the Python column above this N")
    parser.add_argument("--active", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=4, help="untimed intervals at 50 %% activity first")
    parser.add_argument("--kinds", nargs="+", default=KINDS)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--results", type=Path, help="write the markdown section into this file")
    parser.add_argument("--notes", type=Path, help="markdown appended under the table in --results")
    args = parser.parse_args()

    for kind in args.kinds:
        check_twins(kind)
    print("numpy and pure-Python rows agree on leases and sources (500 series x 60 intervals)")

    report = {"sizes": args.sizes, "kinds": args.kinds, "results": {},
              "python": platform.python_version(), "numpy": np.__version__,
              "cpu": cpu_model(), "ncpu": os.cpu_count(), "loadavg_start": os.getloadavg(),
              "active": args.active, "warmup": args.warmup, "rounds": args.rounds, "py_rounds": args.py_rounds,
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    for n in args.sizes:
        ys = traffic(n, max(args.rounds, args.py_rounds), args.active)
        # Warm-up at 50 % activity: most series have seen traffic and a gap
        # (warm forecasters, warm activity quantiles) before the timed intervals.
        warm = traffic(n, args.warmup, 0.5, seed=2)
        res = report["results"][str(n)] = {}
        for kind in args.kinds:
            res[kind] = {"numpy": time_vectorized(kind, n, args.rounds, ys, warm)}
            if n <= args.py_max and kind not in ("ses (slots=None)", "ses (shuffled slots)"):
                res[kind]["python"] = time_python(kind, n, args.py_rounds, ys, warm)
            v = res[kind]["numpy"]
            p = res[kind].get("python")
            print(f"N={n:>9,}  {kind:<22} numpy {v['best_ns']:8.1f} / {v['median_ns']:8.1f} ns"
                  + (f"   python {p['best_ns']:8.0f} / {p['median_ns']:8.0f} ns" if p else ""),
                  flush=True)
    report["loadavg_end"] = os.getloadavg()
    table = render(report)
    print()
    print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.results:
        body = (f"`PYTHONPATH=. python benchmarks/bench_forecast.py --results benchmarks/RESULTS.md` "
                f"({report['date_utc']} UTC; Python {report['python']}, numpy {report['numpy']}, "
                f"{report['cpu']}, {report['ncpu']} CPUs, load average "
                f"{report['loadavg_start'][0]:.1f} at the start, {report['loadavg_end'][0]:.1f} at the "
                f"end; {args.active:.0%} of series active per interval, after {args.warmup} warm-up "
                f"intervals at 50 %). ns per connection per interval, best / median of "
                f"{args.rounds} (numpy) and {args.py_rounds} (Python) intervals; × = Python median / "
                f"numpy median.\n\n" + table + "\n")
        if args.notes:
            body += "\n" + args.notes.read_text(encoding="utf-8").strip() + "\n"
        write_section(args.results, body)
        print(f"wrote section {SECTION!r} of {args.results}")


if __name__ == "__main__":
    main()
