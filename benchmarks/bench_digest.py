#!/usr/bin/env python3
"""Streaming quantile sketches for the anomaly detector: tdigest vs fastdigest (vs ddsketch).

One run measures, on the same lognormal data (default: 1M values, median
e^10 ~ 22 kB per interval, sigma 1.5), for each candidate:

batch 1M        one digest fed all values in one call (tdigest and fastdigest:
                batch_update(list); ddsketch has no batch call: a loop of add())
batch 1M (nd)   fastdigest only: batch_update(ndarray) instead of a list
single 100k     a Python loop of update(x) / add(x) over 100k floats
query           quantile(q) on the 1M digest, q cycling through --quantiles
merge 100       merge 100 digests of 10k values each (the 1M values cut in 100);
                tdigest: reduce(+); fastdigest: merge_all() and a += loop;
                ddsketch: merge() into an empty sketch
memory          RSS growth per digest while building --mem-digests digests of
                --mem-values values each, in a fresh subprocess per candidate
                (tracemalloc too, which sees Python objects only: the Rust
                digest's centroids are outside it); serialized size
accuracy        relative error of p50 / p99 / p99.9 (value, est/exact - 1) and
                rank error (ecdf(est) - q) against numpy's exact quantile, for
                the 1M batch digest and for the merged digest
sweep           fastdigest alone, fed in batches of 1000 (as the detector is
                fed), max_centroids 100 / 300 / 1000: p99 and p99.9 value error
                at n = 10k, 100k, 200k, 1M, over 5 data sets
detector        spoa.lbnode.anomaly.AnomalyDetector: one interval of --det-classes
                classes x --det-rates rates (flag + observe each class), and
                its RSS at --det-classes classes with both digest generations full

Candidates: tdigest (pure Python, delta=0.01 i.e. compression 100, K=25),
fastdigest with max_centroids=100 (the detector's setting, comparable to
tdigest's compression 100) and 1000 (its default), ddsketch DDSketch(0.01).

Timings are the best of up to --repeat runs within --budget seconds per
measurement (tdigest's slow ones therefore run once), garbage collector on.

    python benchmarks/bench_digest.py [--n 1000000] [--no-ddsketch] [--json OUT]

Needs: numpy, fastdigest, tdigest (ddsketch optional: its column is skipped
when it is not installed).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import operator
import os
import pickle
import platform
import subprocess
import sys
import time
import tracemalloc
from importlib import metadata
from pathlib import Path

import numpy as np
from _machine import cpu_model  # noqa: E402 - benchmarks/ is the script's folder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


# --- candidates ----------------------------------------------------------------


class Candidate:
    name = ""
    dist = ""  # PyPI distribution

    def make(self): ...
    def batch(self, d, values_list, values_arr): ...
    def update(self, d, x): ...
    def quantile(self, d, q): ...
    def merge(self, ds): ...
    def size(self, d) -> int: ...  # centroids or bins
    def serialized(self, d) -> int: ...


class TDigestPy(Candidate):
    name = "tdigest"
    dist = "tdigest"

    def __init__(self):
        from tdigest import TDigest

        self.T = TDigest

    def make(self):
        return self.T(delta=0.01, K=25)

    def batch(self, d, values_list, values_arr):
        d.batch_update(values_list)

    def updater(self, d):
        return d.update

    def quantile(self, d, q):
        return d.percentile(q * 100.0)

    def merge(self, ds):
        return functools.reduce(operator.add, ds)

    def size(self, d):
        return len(d)

    def serialized(self, d):
        return len(json.dumps(d.to_dict()))


class FastDigest(Candidate):
    dist = "fastdigest"

    def __init__(self, max_centroids):
        import fastdigest

        self.fd = fastdigest
        self.mc = max_centroids
        self.name = f"fastdigest({max_centroids})"

    def make(self):
        return self.fd.TDigest(self.mc)

    def batch(self, d, values_list, values_arr):
        d.batch_update(values_list)

    def batch_nd(self, d, values_arr):
        d.batch_update(values_arr)

    def updater(self, d):
        return d.update

    def quantile(self, d, q):
        return d.quantile(q)

    def merge(self, ds):
        return self.fd.merge_all(ds)

    def merge_loop(self, ds):
        acc = self.fd.TDigest(self.mc)
        for d in ds:
            acc += d
        return acc

    def size(self, d):
        return d.n_centroids

    def serialized(self, d):
        return len(d.to_bytes()) if hasattr(d, "to_bytes") else len(pickle.dumps(d))


class DDSketchPy(Candidate):
    name = "ddsketch"
    dist = "ddsketch"

    def __init__(self):
        from ddsketch import DDSketch

        self.S = DDSketch

    def make(self):
        return self.S(0.01)

    def batch(self, d, values_list, values_arr):
        add = d.add
        for x in values_list:
            add(x)

    def updater(self, d):
        return d.add

    def quantile(self, d, q):
        return d.get_quantile_value(q)

    def merge(self, ds):
        acc = self.S(0.01)
        for d in ds:
            acc.merge(d)
        return acc

    def size(self, d):
        return d._store.length() + d._negative_store.length()

    def serialized(self, d):
        return len(pickle.dumps(d))  # its own format is protobuf (needs the [serialization] extra)


def candidates(with_dd: bool) -> list[Candidate]:
    out: list[Candidate] = [TDigestPy(), FastDigest(100), FastDigest(1000)]
    if with_dd:
        try:
            out.append(DDSketchPy())
        except ImportError:
            print("ddsketch: not installed, column skipped", file=sys.stderr)
    return out


def by_name(name: str) -> Candidate:
    if name == "tdigest":
        return TDigestPy()
    if name.startswith("fastdigest("):
        return FastDigest(int(name[len("fastdigest(") : -1]))
    if name == "ddsketch":
        return DDSketchPy()
    raise SystemExit(f"unknown candidate {name}")


# --- timing ------------------------------------------------------------------------


def timed(fn, setup=None, repeat=3, budget=3.0):
    """Best wall time of fn(setup()) over up to `repeat` runs within `budget` s.
    Returns (best_s, runs, last_result)."""
    best = float("inf")
    total = 0.0
    runs = 0
    result = None
    for _ in range(repeat):
        arg = setup() if setup else None
        gc.collect()
        t0 = time.perf_counter()
        result = fn(arg)
        dt = time.perf_counter() - t0
        best = min(best, dt)
        total += dt
        runs += 1
        if total >= budget:
            break
    return best, runs, result


def per_call(fn, min_time=0.3, chunk=300):
    """Seconds per call of fn(i), run in chunks until min_time has passed."""
    n = 0
    gc.collect()
    t0 = time.perf_counter()
    while True:
        for i in range(chunk):
            fn(i)
        n += chunk
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return dt / n, n


def lognormal(n: int, mu: float, sigma: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(mu, sigma, n)


# --- memory (runs in a subprocess) ---------------------------------------------------


def mem_child(name: str, k: int, values: int, mu: float, sigma: float, seed: int) -> dict:
    data = lognormal(k * values, mu, sigma, seed + 7)
    chunks = [data[i * values : (i + 1) * values].tolist() for i in range(k)]
    del data
    if name.startswith("detector"):
        from spoa.lbnode.anomaly import AnomalyDetector

        compression = int(name.partition(":")[2] or 100)

        # window=values/2, fed w then w-1 values: every class ends with both
        # generations (nearly) full. Digest size saturates at max_centroids, so
        # the window length itself does not matter.
        w = values // 2
        det = AnomalyDetector(max_classes=k, min_samples=min(1000, w), window=w, compression=compression)
        gc.collect()
        tracemalloc.start()
        r0 = rss()
        for i, c in enumerate(chunks):
            det.observe(f"class-{i}", c[:w])
            det.observe(f"class-{i}", c[w : 2 * w - 1])
        for i in range(k):  # build every cached threshold too
            det.threshold(f"class-{i}")
        gc.collect()
        r1 = rss()
        t1 = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return {
            "classes": k,
            "rss_bytes_per_class": (r1 - r0) / k,
            "traced_bytes_per_class": t1 / k,
            "stats": det.stats,
        }
    cand = by_name(name)
    gc.collect()
    tracemalloc.start()
    r0 = rss()
    digests = []
    for c in chunks:
        d = cand.make()
        cand.batch(d, c, None)
        digests.append(d)
    gc.collect()
    r1 = rss()
    t1 = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {
        "digests": k,
        "values_each": values,
        "rss_bytes_per_digest": (r1 - r0) / k,
        "traced_bytes_per_digest": t1 / k,
        "mean_size": sum(cand.size(d) for d in digests) / k,
        "serialized_bytes": cand.serialized(digests[0]),
    }


def run_mem(name: str, k: int, values: int, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--_mem",
        name,
        "--_mem-k",
        str(k),
        "--_mem-values",
        str(values),
        "--mu",
        str(args.mu),
        "--sigma",
        str(args.sigma),
        "--seed",
        str(args.seed),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout)


# --- the benchmark -------------------------------------------------------------------


def accuracy(cand, d, exact: dict[float, float], sorted_values: np.ndarray) -> dict:
    out = {}
    n = sorted_values.size
    for q, ex in exact.items():
        est = float(cand.quantile(d, q))
        rank = np.searchsorted(sorted_values, est, side="right") / n
        out[str(q)] = {"estimate": est, "exact": ex, "rel_err": est / ex - 1.0, "rank_err": rank - q}
    return out


def bench_candidate(cand, values, values_list, singles, qs, exact, sorted_values, args) -> dict:
    res: dict = {"name": cand.name, "dist": cand.dist, "version": metadata.version(cand.dist)}
    log = lambda msg: print(f"  {cand.name}: {msg}", file=sys.stderr, flush=True)  # noqa: E731

    log(f"batch {len(values_list):,}")
    t, runs, d = timed(
        lambda d: (cand.batch(d, values_list, values), d)[1], cand.make, args.repeat, args.budget
    )
    res["batch_s"] = t
    res["batch_runs"] = runs
    res["centroids_1m"] = cand.size(d)
    res["serialized_1m"] = cand.serialized(d)
    if isinstance(cand, FastDigest):
        t, runs, _ = timed(lambda x: cand.batch_nd(x, values), cand.make, args.repeat, args.budget)
        res["batch_ndarray_s"] = t
        tl, _, _ = timed(lambda _: values.tolist(), None, args.repeat, args.budget)
        res["tolist_s"] = tl

    log(f"single {len(singles):,}")

    def single(d):
        upd = cand.updater(d)
        for x in singles:
            upd(x)

    t, runs, _ = timed(single, cand.make, args.repeat, args.budget)
    res["single_s"] = t
    res["single_runs"] = runs

    log("query")
    qn = len(qs)
    s, n = per_call(lambda i: cand.quantile(d, qs[i % qn]))
    res["query_s"] = s
    res["query_calls"] = n

    res["accuracy_batch"] = accuracy(cand, d, exact, sorted_values)
    del d

    log(f"merge {args.merge}")
    parts = np.array_split(values, args.merge)
    ds = []
    for p in parts:
        x = cand.make()
        cand.batch(x, p.tolist(), p)
        ds.append(x)
    t, runs, merged = timed(lambda _: cand.merge(ds), None, args.repeat, args.budget)
    res["merge_s"] = t
    res["merge_runs"] = runs
    if isinstance(cand, FastDigest):
        t, _, _ = timed(lambda _: cand.merge_loop(ds), None, args.repeat, args.budget)
        res["merge_loop_s"] = t
    res["accuracy_merged"] = accuracy(cand, merged, exact, sorted_values)
    res["centroids_merged"] = cand.size(merged)
    return res


def accuracy_sweep(args) -> dict:
    """fastdigest fed like the detector (batches of --sweep-batch values), error
    at checkpoints n, for several max_centroids, over --sweep-seeds data sets."""
    import fastdigest

    mcs = [int(x) for x in args.sweep_centroids.split(",")]
    ns = [n for n in (int(x) for x in args.sweep_n.split(",")) if n <= args.n]
    qs = [0.99, 0.999]
    errs: dict = {}  # (mc, n, q) -> [rel errors]
    for k in range(args.sweep_seeds):
        x = lognormal(max(ns), args.mu, args.sigma, args.seed + 100 + k)
        digests = {mc: fastdigest.TDigest(mc) for mc in mcs}
        fed = 0
        for n in ns:
            for lo in range(fed, n, args.sweep_batch):
                chunk = x[lo : min(n, lo + args.sweep_batch)].tolist()
                for d in digests.values():
                    d.batch_update(chunk)
            fed = n
            ex = np.quantile(x[:n], qs)
            for mc, d in digests.items():
                for q, e in zip(qs, ex):
                    errs.setdefault(f"{mc}/{n}/{q}", []).append(d.quantile(q) / e - 1.0)
    out = {}
    for key, v in errs.items():
        a = np.array(v)
        out[key] = {"mean": float(a.mean()), "max_abs": float(np.abs(a).max()), "errors": v}
    return {"centroids": mcs, "n": ns, "quantiles": qs, "seeds": args.sweep_seeds, "batch": args.sweep_batch, "errors": out}


def sweep_table(sw: dict) -> str:
    head = ["max_centroids", "n"] + [f"p{q * 100:g} mean / worst" for q in sw["quantiles"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * len(head)) + "|"]
    for mc in sw["centroids"]:
        for n in sw["n"]:
            cells = [str(mc), f"{n:,}"]
            for q in sw["quantiles"]:
                e = sw["errors"][f"{mc}/{n}/{q}"]
                cells.append(f"{e['mean'] * 100:+.1f} % / {e['max_abs'] * 100:.1f} %")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_detector(args, values) -> dict:
    from spoa.lbnode.anomaly import AnomalyDetector

    k, r = args.det_classes, args.det_rates
    rng = np.random.default_rng(args.seed + 3)
    det = AnomalyDetector(max_classes=k, compression=args.det_compression)
    keys = [f"fe-{i}" for i in range(k)]
    warm = rng.lognormal(args.mu, args.sigma, (k, 2000))
    for key, row in zip(keys, warm):
        det.observe(key, row)
    batches = rng.lognormal(args.mu, args.sigma, (8, k, r))

    def interval(i):
        b = batches[i % len(batches)]
        for key, row in zip(keys, b):
            det.flag(key, row)
            det.observe(key, row)

    s, n = per_call(interval, min_time=1.0, chunk=2)
    return {
        "classes": k,
        "rates_per_class": r,
        "interval_s": s,
        "intervals": n,
        "per_rate_ns": s / (k * r) * 1e9,
        "compression": args.det_compression,
        "stats": det.stats,
    }


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "numpy": np.__version__,
        "loadavg_start": os.getloadavg(),
    }


def fmt_t(s: float) -> str:
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    if s >= 1e-6:
        return f"{s * 1e6:.2f} µs"
    return f"{s * 1e9:.0f} ns"


def fmt_b(b: float) -> str:
    return f"{b / 1024:.1f} KiB" if b >= 10240 else f"{b:.0f} B"


def table(report: dict) -> str:
    cands = report["candidates"]
    names = [c["name"] for c in cands]
    base = cands[0]
    rows: list[tuple[str, list[str]]] = []

    def ratio_row(label, key):
        vals = []
        for c in cands:
            v = c.get(key)
            vals.append(f"{base[key] / v:.0f}x" if v else "-")
        rows.append((label, vals))

    n = report["params"]["n"]
    rows.append((f"batch update {n:,} values", [fmt_t(c["batch_s"]) for c in cands]))
    ratio_row("  speed-up vs tdigest", "batch_s")
    rows.append(("  ... from ndarray (vs list)", [fmt_t(c["batch_ndarray_s"]) if "batch_ndarray_s" in c else "-" for c in cands]))
    rows.append(("  ndarray.tolist() itself", [fmt_t(c["tolist_s"]) if "tolist_s" in c else "-" for c in cands]))
    rows.append(("  per value", [fmt_t(c["batch_s"] / n) for c in cands]))
    s = report["params"]["singles"]
    rows.append((f"{s:,} single update() calls", [fmt_t(c["single_s"]) for c in cands]))
    ratio_row("  speed-up vs tdigest", "single_s")
    rows.append(("  per call", [fmt_t(c["single_s"] / s) for c in cands]))
    rows.append(("quantile query (batch digest)", [fmt_t(c["query_s"]) for c in cands]))
    ratio_row("  speed-up vs tdigest", "query_s")
    m = report["params"]["merge"]
    rows.append((f"merge {m} digests (merge_all)", [fmt_t(c["merge_s"]) for c in cands]))
    ratio_row("  speed-up vs tdigest", "merge_s")
    rows.append(("  ... as a += loop", [fmt_t(c["merge_loop_s"]) if "merge_loop_s" in c else "-" for c in cands]))
    rows.append(("centroids / bins (batch digest)", [str(c["centroids_1m"]) for c in cands]))
    mem = report["memory"]

    def mem_cell(c: dict, key: str) -> str:
        m = mem.get(c["name"], {})
        return fmt_b(m[key]) if key in m else m.get("error", "-")

    rows.append(("memory per digest (RSS)", [mem_cell(c, "rss_bytes_per_digest") for c in cands]))
    rows.append(("  tracemalloc (Python objs)", [mem_cell(c, "traced_bytes_per_digest") for c in cands]))
    rows.append(("  serialized (batch digest)", [fmt_b(c["serialized_1m"]) for c in cands]))
    for which, label in (("accuracy_batch", "batch digest"), ("accuracy_merged", "merged")):
        for q in report["params"]["quantiles"]:
            rows.append(
                (
                    f"p{q * 100:g} rel. error, {label}",
                    [f"{c[which][str(q)]['rel_err'] * 100:+.3f} %" for c in cands],
                )
            )
        for q in report["params"]["quantiles"]:
            rows.append(
                (
                    f"p{q * 100:g} rank error, {label}",
                    [f"{c[which][str(q)]['rank_err'] * 1e6:+.0f} ppm" for c in cands],
                )
            )
    w0 = max(len(r[0]) for r in rows)
    ws = [max(len(names[i]), *(len(r[1][i]) for r in rows)) for i in range(len(names))]
    lines = ["| " + " | ".join(["what".ljust(w0)] + [nm.rjust(w) for nm, w in zip(names, ws)]) + " |"]
    lines.append("|" + "|".join(["-" * (w0 + 2)] + ["-" * (w + 1) + ":" for w in ws]) + "|")
    for label, vals in rows:
        lines.append("| " + " | ".join([label.ljust(w0)] + [v.rjust(w) for v, w in zip(vals, ws)]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="values for the batch digest")
    ap.add_argument("--singles", type=int, default=100_000, help="single update() calls")
    ap.add_argument("--merge", type=int, default=100, help="digests to merge (the n values cut in as many parts)")
    ap.add_argument("--quantiles", default="0.5,0.99,0.999")
    ap.add_argument("--mu", type=float, default=10.0, help="lognormal mu (median e^mu)")
    ap.add_argument("--sigma", type=float, default=1.5, help="lognormal sigma")
    ap.add_argument("--seed", type=int, default=20261127)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per measurement before repeats stop")
    ap.add_argument("--mem-digests", type=int, default=0, help="digests built for the memory figure (0: 1000 for fastdigest, 100 otherwise)")
    ap.add_argument("--mem-values", type=int, default=5000, help="values fed to each of them")
    ap.add_argument("--det-classes", type=int, default=1024)
    ap.add_argument("--det-compression", type=int, default=100, help="the detector's compression (max_centroids)")
    ap.add_argument("--det-rates", type=int, default=100, help="rates per class per interval")
    ap.add_argument("--sweep-centroids", default="100,300,1000", help="fastdigest accuracy sweep: max_centroids values")
    ap.add_argument("--sweep-n", default="10000,100000,200000,1000000", help="fastdigest accuracy sweep: checkpoints")
    ap.add_argument("--sweep-seeds", type=int, default=5)
    ap.add_argument("--sweep-batch", type=int, default=1000, help="values per batch_update in the sweep")
    ap.add_argument("--no-ddsketch", action="store_true")
    ap.add_argument("--no-detector", action="store_true")
    ap.add_argument("--json", metavar="OUT", help="also write the full report as JSON ('-': stdout, no table)")
    ap.add_argument("--_mem", help=argparse.SUPPRESS)
    ap.add_argument("--_mem-k", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_mem-values", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._mem:
        print(json.dumps(mem_child(args._mem, args._mem_k, args._mem_values, args.mu, args.sigma, args.seed)))
        return

    qs = [float(q) for q in args.quantiles.split(",")]
    report: dict = {
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "params": {
            "n": args.n,
            "singles": args.singles,
            "merge": args.merge,
            "quantiles": qs,
            "mu": args.mu,
            "sigma": args.sigma,
            "seed": args.seed,
            "repeat": args.repeat,
            "budget_s": args.budget,
        },
    }
    values = lognormal(args.n, args.mu, args.sigma, args.seed)
    values_list = values.tolist()
    singles = lognormal(args.singles, args.mu, args.sigma, args.seed + 1).tolist()
    sorted_values = np.sort(values)
    exact = {q: float(np.quantile(values, q)) for q in qs}
    report["exact"] = {str(q): v for q, v in exact.items()}

    cands = candidates(not args.no_ddsketch)
    report["candidates"] = []
    t0 = time.perf_counter()
    for cand in cands:
        report["candidates"].append(bench_candidate(cand, values, values_list, singles, qs, exact, sorted_values, args))

    report["memory"] = {}
    for cand in cands:
        k = args.mem_digests or (1000 if isinstance(cand, FastDigest) else 100)
        print(f"  memory: {cand.name} ({k} digests)", file=sys.stderr, flush=True)
        report["memory"][cand.name] = run_mem(cand.name, k, args.mem_values, args)

    print("  accuracy sweep", file=sys.stderr, flush=True)
    report["sweep"] = accuracy_sweep(args)

    if not args.no_detector:
        print("  detector", file=sys.stderr, flush=True)
        report["detector"] = bench_detector(args, values)
        report["detector"]["memory"] = run_mem(f"detector:{args.det_compression}", args.det_classes, 4000, args)
    report["elapsed_s"] = time.perf_counter() - t0
    report["machine"]["loadavg_end"] = os.getloadavg()

    if args.json == "-":
        print(json.dumps(report, indent=2))
        return
    m = report["machine"]
    print(
        f"{m['cpu']}, {m['cpus']} CPUs, Python {m['python']}, numpy {m['numpy']}; "
        f"load {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}; {report['started']}; "
        f"run {report['elapsed_s']:.0f} s"
    )
    print(
        "versions: " + ", ".join(f"{c['dist']} {c['version']}" for c in report["candidates"] if not c["name"].endswith("(1000)"))
    )
    print(
        f"data: lognormal(mu={args.mu}, sigma={args.sigma}), n={args.n:,}; exact "
        + ", ".join(f"p{q * 100:g}={v:,.0f}" for q, v in exact.items())
    )
    print()
    print(table(report))
    sw = report["sweep"]
    print()
    print(
        f"fastdigest fed in batches of {sw['batch']} (as the detector), relative error of the value, "
        f"mean / worst |error| over {sw['seeds']} data sets:"
    )
    print(sweep_table(sw))
    if "detector" in report:
        d = report["detector"]
        dm = d["memory"]
        print()
        print(
            f"AnomalyDetector (compression {d['compression']}, 2 digest generations): one interval of {d['classes']} classes x "
            f"{d['rates_per_class']} rates (flag + observe) = {fmt_t(d['interval_s'])} "
            f"({d['per_rate_ns']:.0f} ns per rate); memory at {d['classes']} full classes: "
            + (
                f"{fmt_b(dm['rss_bytes_per_class'])} per class (RSS), "
                f"{dm['rss_bytes_per_class'] * d['classes'] / 2**20:.1f} MiB in all"
                if "rss_bytes_per_class" in dm
                else dm.get("error", "?")
            )
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
