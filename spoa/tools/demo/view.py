"""What the demo shows while it runs.

On a terminal (and with `rich` installed: `pip install "rich>=13"`), a live
view redrawn every second; otherwise (a pipe, CI, `--plain`, no rich) a
progress line every 2 s and the long-lived connections every 4 s.

Both show the same things: connections (SPOP, tracked by the agent, held by
the LB node), segments and granularity levels, per connection the actual vs
predicted volume per interval, the lease in force and its source (from the
tap) and the X-Lease the client last saw (what HAProxy applied), leases by
source on each hop, premature expiries, anomalies, errors; with --lbnodes N > 1, per LB
node its slots, connections held and adopted, hints sent and whether it answers or is fenced.
"""

from __future__ import annotations

import sys
import time

from .stack import PLAIN_EVERY_S, Stack, by_label, metric
from .tier import node_figures

SHORT_LABEL = "short"


def human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


SHORT_SOURCE = {"predicted": "pred", "fallback": "fall", "standard": "std"}


def lease_text(ms: int | None, source: str | None, short: bool = False) -> str:
    if not source:
        return "-"
    if short:
        source = SHORT_SOURCE.get(source, source)
    if not ms:
        return source
    return f"{ms / 1000:.1f}s {source}"


def connection_rows(stack: Stack, limit: int = 12) -> tuple[list[dict], dict]:
    """Long-lived connections one per row (labelled by the client that opened
    them), one-request ones summed up. Returns (rows, short summary)."""
    rows = []
    short = {"live": 0, "closed": 0, "bytes": 0}
    tap, gen = stack.tap, stack.loadgen
    if tap is None:
        return rows, short
    ports = gen.ports if gen is not None else {}
    clients = gen.clients if gen is not None else {}
    for view in tap.conns.values():
        label = ports.get(view.src_port, "?")
        if label == SHORT_LABEL:
            short["closed" if view.closed else "live"] += 1
            short["bytes"] += view.total
            continue
        client = clients.get(label)
        # the client's X-Lease belongs to this connection only while it is the client's current one
        current = client is not None and client.local_port == view.src_port
        rows.append({
            "label": label, "port": view.src_port, "closed": view.closed, "level": view.level,
            "segments": view.segments, "levels": view.segment_levels, "actual": view.actual,
            "predicted": view.predicted, "lease_ms": view.lease_ms, "lease_source": view.lease_source,
            "hinted_ms": view.hinted_ms, "total": view.total,
            "x_lease": lease_text(client.lease_ms, client.lease_source, short=True) if current else "-",
        })
    rows.sort(key=lambda r: (r["closed"], r["label"], r["port"]))
    return rows[:limit], short


def totals(stack: Stack) -> dict:
    a, lb = stack.agent_metrics, stack.lbnode_metrics
    log = stack.haproxy_log
    tap = stack.tap
    samples = metric(lb, "spoa_lbnode_forecast_samples_total")
    return {
        "spop": int(metric(a, "spoa_agent_connections_active")),
        "tracked": int(metric(a, "spoa_lease_tracked_connections")),
        "registered": int(by_label(a, "spoa_lease_tracker_events_total").get("registered", 0)),
        "held": int(metric(lb, "spoa_lbnode_connections")),
        "segments": int(metric(a, "spoa_lease_segments")),
        "levels": tap.level_histogram() if tap else {},
        "segment_levels": tap.segment_level_histogram() if tap else {},
        "events": {k: int(v) for k, v in by_label(a, "spoa_lease_tracker_events_total").items()},
        "packets": int(metric(a, "spoa_lease_packets_sent_total")),
        "records": int(metric(a, "spoa_lease_records_published_total")),
        "deferred": int(metric(a, "spoa_lease_records_deferred_total")),
        "hints": int(metric(lb, "spoa_lbnode_hints_sent_total")),
        "haproxy_leases": dict(log.sources) if log else {},
        "requests": log.requests if log else 0,
        "agent_leases": {k: int(v) for k, v in by_label(a, "spoa_lease_leases_total").items()},
        "lbnode_leases": {k: int(v) for k, v in by_label(lb, "spoa_lbnode_leases_total").items()},
        "premature": int(metric(lb, "spoa_lbnode_premature_expiries_total")),
        "expired": int(metric(lb, "spoa_lbnode_expired_total")),
        "anomalies": int(metric(lb, "spoa_lbnode_anomalies_total")),
        "mae": metric(lb, "spoa_lbnode_forecast_abs_error_total") / samples if samples else None,
        "client_errors": stack.loadgen.stats.errors if stack.loadgen else 0,
    }


def lbnode_rows(stack: Stack) -> list[tuple[str, dict]]:
    """Each LB node of a tier with its figures, in start order; [] for the single LB node."""
    if stack.opts.lbnodes == 1:
        return []
    return [(name, node_figures(stack.lbnode_metrics_by_node.get(name, {}))) for name in stack.opts.lbnode_names]


def node_state(name: str, stack: Stack, figures: dict) -> str:
    proc = stack.procs.get(name)
    if proc is None or not proc.alive():
        return "down"
    return "fenced" if figures["fenced"] else "answering" if figures["answering"] else "silent"


def _fmt_counts(d: dict, order=("predicted", "fallback", "standard")) -> str:
    keys = [k for k in order if k in d] + sorted(k for k in d if k not in order)
    return " ".join(f"{k[:4]} {d[k]}" for k in keys) or "-"


class PlainView:
    """Progress lines, for pipes and CI."""

    def __init__(self, out) -> None:
        self.out = out
        self.next_line = 0.0
        self.lines = 0

    def _print(self, text: str) -> None:
        try:
            print(text, file=self.out, flush=True)
        except OSError:  # the terminal or pipe went away (SIGHUP, `| head`): keep stopping cleanly
            pass

    def progress(self, message: str) -> None:
        self._print(f"demo: {message}")

    def start(self) -> None:
        self.next_line = time.monotonic() + PLAIN_EVERY_S

    def update(self, stack: Stack, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self.next_line:
            return
        self.next_line = now + PLAIN_EVERY_S
        self.lines += 1
        t = totals(stack)
        levels = ",".join(f"{k}:{v}" for k, v in t["segment_levels"].items()) or "-"
        self._print(
            f"[{stack.elapsed():5.1f}s] conns reg {t['registered']} tracked {t['tracked']} held {t['held']} | "
            f"segments {t['segments']} levels {{{levels}}} | packets {t['packets']} records {t['records']} "
            f"deferred {t['deferred']} | leases haproxy {_fmt_counts(t['haproxy_leases'])}; "
            f"lbnode {_fmt_counts(t['lbnode_leases'])} | premature {t['premature']} anomalies {t['anomalies']} "
            f"| errors {len(stack.errors) + t['client_errors']}")
        for name, f in lbnode_rows(stack):
            self._print(f"    {name:<9} {node_state(name, stack, f):<9} slots {f['slots_owned']} held "
                        f"{f['connections']} adopted {f['adopted']} hints {f['hints_sent']} "
                        f"premature {f['premature_expiries']}")
        if self.lines % 2 == 0 or force:
            rows, short = connection_rows(stack, limit=10)
            for r in rows:
                if r["closed"]:
                    continue
                self._print(
                    f"    {r['label']:<9} :{r['port']:<5} level {r['level']:>2} segments {r['segments']:>2} | "
                    f"actual {human(r['actual']):>7}/iv predicted {human(r['predicted']):>7}/iv | "
                    f"lease {lease_text(r['lease_ms'], r['lease_source']):<16} x-lease {r['x_lease']}")
            gen = stack.loadgen
            if gen is not None and gen.short.connections:
                self._print(f"    short     {gen.short.connections} one-request connections, last x-lease "
                            f"{lease_text(gen.short.lease_ms, gen.short.lease_source)}")

    def stopping(self) -> None:
        self._print("demo: stopping everything it started")

    def stop(self, stack: Stack) -> None:
        pass


class LiveView:
    """rich Live: one screen, redrawn every second."""

    def __init__(self, out) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(file=out)
        self.live = Live(console=self.console, auto_refresh=False, transient=False, vertical_overflow="crop")
        self.next_draw = 0.0
        self.note = ""

    def progress(self, message: str) -> None:
        try:
            self.console.print(f"[dim]demo:[/dim] {message}")
        except OSError:
            pass

    def start(self) -> None:
        self.live.start()

    def update(self, stack: Stack, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self.next_draw:
            return
        self.next_draw = now + 1.0
        try:
            self.live.update(self.render(stack), refresh=True)
        except OSError:  # the terminal went away (SIGHUP): keep stopping cleanly
            pass

    def stopping(self) -> None:
        self.note = "stopping..."

    def stop(self, stack: Stack) -> None:
        if self.live.is_started:
            self.note = "stopped"
            try:
                self.live.update(self.render(stack), refresh=True)
                self.live.stop()
            except OSError:
                pass

    def render(self, stack: Stack):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        t = totals(stack)
        opts = stack.opts
        version = stack.binary.version if stack.binary else "?"
        procs = "  ".join(f"{name} {'[green]up[/]' if p.alive() else '[red]down[/]'}"
                          for name, p in stack.procs.items())
        until = f"/{opts.duration:.0f}s" if opts.duration else " (Ctrl-C stops)"
        head = Text.from_markup(
            f"[bold]spoa-lease demo[/]  HAProxy {version}  policy [bold]{opts.policy}[/]  "
            f"{stack.elapsed():.0f}s{until}  {procs}  [yellow]{self.note}[/]")

        overview = Table.grid(padding=(0, 2))
        overview.add_column(style="bold", no_wrap=True)
        overview.add_column()
        levels = " ".join(f"L{k}:{v}" for k, v in t["segment_levels"].items()) or "-"
        ev = t["events"]
        overview.add_row("connections", f"SPOP {t['spop']}  tracked by the agent {t['tracked']}  held by the LB node "
                                        f"{t['held']}  registered so far {t['registered']}")
        overview.add_row("segments", f"{t['segments']} now, by granularity level {levels}  "
                                     f"(splits {ev.get('splits', 0)}, merges {ev.get('merges', 0)})")
        overview.add_row("publishing", f"packets {t['packets']}  records {t['records']}  deferred {t['deferred']}  "
                                       f"hints back {t['hints']}")
        overview.add_row("LB node", f"premature expiries {t['premature']}  expired {t['expired']}  anomalies "
                                    f"{t['anomalies']}  forecast MAE {human(t['mae'])}/interval")
        overview.add_row("leases", f"HAProxy {_fmt_counts(t['haproxy_leases'])} ({t['requests']} logged)   agent "
                                   f"{_fmt_counts(t['agent_leases'])}   LB node {_fmt_counts(t['lbnode_leases'])}")

        wide = self.console.width >= 110
        table = Table(title="connections (tap: every record the agent publishes)", title_justify="left",
                      expand=False, box=None, padding=(0, 1), header_style="bold underline")
        columns = [("client", "left", 9), ("port", "right", 5), ("lvl", "right", 3), ("segs", "right", 4),
                   ("seg levels", "left", None), ("actual", "right", 7), ("forecast", "right", 8),
                   ("total", "right", 6), ("lease", "left", 10), ("X-Lease", "left", 10)]
        if not wide:
            columns = [c for c in columns if c[0] not in ("port", "seg levels")]
        for name, justify, width in columns:
            table.add_column(name, justify=justify, no_wrap=True, min_width=width,
                             max_width=16 if width is None else None, overflow="ellipsis")
        rows, short = connection_rows(stack, limit=12)
        colors = {"predicted": "green", "fallback": "yellow", "standard": "white"}
        for r in rows:
            style = "dim" if r["closed"] else None
            lease = lease_text(r["lease_ms"], r["lease_source"], short=True)
            color = colors.get(r["lease_source"], "white")
            cells = {"client": r["label"] + (" ended" if r["closed"] else ""), "port": str(r["port"]),
                     "lvl": str(r["level"]), "segs": str(r["segments"]),
                     "seg levels": " ".join(map(str, r["levels"][:8])), "actual": human(r["actual"]),
                     "forecast": human(r["predicted"]), "total": human(r["total"]),
                     "lease": f"[{color}]{lease}[/]", "X-Lease": r["x_lease"]}
            table.add_row(*(cells[c[0]] for c in columns), style=style)
        gen = stack.loadgen
        if gen is not None and gen.short.connections:
            x_lease = lease_text(gen.short.lease_ms, gen.short.lease_source, short=True)
            cells = {"client": f"short x{gen.short.connections}", "seg levels": "1 request each",
                     "X-Lease": x_lease}
            table.add_row(*(cells.get(c[0], "") for c in columns), style="dim")
        table.caption = ("actual: bytes in the connection's last reported 500 ms interval; forecast: the LB node's "
                         "(SES) for that interval, mirrored on the same records. lease: the agent's, in force. "
                         "X-Lease: on the client's last response (a WebSocket has only its 101). "
                         "pred/fall/std: predicted/fallback/standard.")
        table.caption_justify = "left"

        parts = [head, overview]
        nodes = lbnode_rows(stack)
        if nodes:
            parts.append(self._tier_table(stack, nodes, Table))
        parts.append(table)
        errors = stack.errors + (stack.loadgen.stats.last_errors if stack.loadgen else [])
        if errors:
            parts.append(Text(f"errors: {len(errors)}; last: {errors[-1].splitlines()[0]}", style="red"))
        return Group(*parts)


    @staticmethod
    def _tier_table(stack: Stack, nodes: list[tuple[str, dict]], table_class):
        tier = table_class(title="LB nodes (the tier: each owns a share of the slots)", title_justify="left",
                           box=None, padding=(0, 1), header_style="bold underline")
        for name in ("node", "state", "slots", "held", "adopted", "hints sent", "premature"):
            tier.add_column(name, justify="left" if name in ("node", "state") else "right", no_wrap=True)
        colors = {"answering": "green", "fenced": "yellow", "silent": "yellow", "down": "red"}
        for name, f in nodes:
            state = node_state(name, stack, f)
            tier.add_row(name, f"[{colors[state]}]{state}[/]", str(f["slots_owned"]), str(f["connections"]),
                         str(f["adopted"]), str(f["hints_sent"]), str(f["premature_expiries"]))
        return tier


def make_view(opts, out=None):
    out = out or sys.stdout
    if not opts.plain and out.isatty():
        import importlib.util

        if importlib.util.find_spec("rich") is not None:
            return LiveView(out)
        print("demo: `pip install rich` for the live view; plain progress lines follow", file=out)
    return PlainView(out)
