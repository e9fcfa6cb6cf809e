"""Lease backtest: traces -> per-connection interval series -> simulated publishing.

``traces`` reads pcap/pcapng (dpkt) and CSV traces into :class:`Connections`;
``synthetic`` generates seeded traffic of known shapes; ``simulate`` runs the
server-node cadence and the LB node's leases with the product's own
forecasters and policies; ``report`` prints, writes JSON and draws plots.
``python -m spoa backtest TRACE ... --json OUT [--plots DIR]`` ties them.
"""

from __future__ import annotations

import os

# Submodules are imported on use (``from spoa.tools.backtest.simulate import simulate``):
# the package name ``simulate`` stays the module, and `python -m spoa` does not
# pay for numpy-heavy imports it does not need.
__all__ = ["add_arguments", "report", "simulate", "synthetic", "traces"]

_POLICIES = ("fixed", "volume", "activity")  # simulate.POLICIES (kept import-free here)
_FORECASTERS = ("naive", "ses", "damped_holt", "croston", "tsb", "arima")  # simulate.FORECASTERS


def add_arguments(parser) -> None:
    """The `backtest` subcommand's options (spoa/cli.py registers the subparser)."""
    parser.add_argument("traces", nargs="+", metavar="TRACE",
                        help="pcap/pcapng capture or conn_id,t,dir,bytes,packets CSV (a directory: every file in it)")
    parser.add_argument("--json", required=True, metavar="OUT", help="write the results here")
    parser.add_argument("--plots", metavar="DIR", help="write PNG plots here")
    parser.add_argument("--markdown", metavar="FILE", help="write the per-trace table as Markdown")
    parser.add_argument("--interval-ms", type=int, default=1000, help="publishing interval (default 1000)")
    parser.add_argument("--policies", default=",".join(_POLICIES), help="comma list of fixed, volume, activity")
    parser.add_argument("--forecasters", default=",".join(_FORECASTERS), help="comma list (default: all)")
    parser.add_argument("--loss", type=float, default=0.0, help="probability a published record is lost")
    parser.add_argument("--hint-loss", type=float, help="probability a hint is lost (default: --loss)")
    parser.add_argument("--loss-burst", type=float, default=0.0, metavar="N",
                        help="losses come in bursts of N intervals on average (Gilbert-Elliott; --loss is then "
                             "the share of intervals lost, for records and hints alike); 0: independent loss")
    parser.add_argument("--silent-end", type=float, default=0.0, metavar="P",
                        help="share of connections whose close is never announced (the LB node learns of the "
                             "end only when the lease runs out)")
    parser.add_argument("--crash-rate", type=float, default=0.0, metavar="R",
                        help="server-node crashes per hour: every live connection ends silently at once, the "
                             "restarted node publishes the rest of them as new connections")
    parser.add_argument("--frontier", action="store_true",
                        help="also sweep each policy's knob (fixed lease 5-300 s, activity safety, volume "
                             "calibration, end bound): entries against stale state at premature <= target")
    parser.add_argument("--lb-phase", type=float, default=0.5, help="LB tick, in intervals after the server's")
    parser.add_argument("--quantile", type=float, default=0.99, help="pinball loss quantile (default 0.99)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lbnode-config", metavar="FILE", help="LB node YAML (lease and forecast sections)")
    parser.add_argument("--agent-config", metavar="FILE", help="agent YAML (its lease section: the server side)")
    parser.add_argument("--split-idle", type=float, default=3600.0, metavar="S",
                        help="pcap: a 4-tuple silent this long starts a new connection")
    parser.add_argument("--samples", type=int, default=4, help="connections per trace in the sample plot")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes for the policy passes (default: 2 or the CPU count)")
    parser.add_argument("--summary-only", action="store_true", help="print only the all-traces table")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no table, no log lines")
