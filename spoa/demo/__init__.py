"""`python -m spoa demo`: the whole system on loopback, with a live view.

One command starts HAProxy (provisioned like the tests do, `spoa.provision`)
with the project's own haproxy/ include, the SPOP agent publishing to the LB
node every 500 ms, the LB node, a backend (`spoa.demo.backend`: a streaming
download, a chatty WebSocket, short HTTP), a traffic generator
(`spoa.demo.loadgen`) and a UDP tap that sees every publishing packet
(`spoa.demo.tap`), then shows what flows (`spoa.demo.view`) and ends with one
JSON summary line (`spoa.demo.summary`).

Modules:
    stack    starts, watches and stops every process (process groups,
             parent-death signal, finally + atexit), scrapes /metrics
    backend  the application behind HAProxy (also `python -m spoa.demo.backend`)
    loadgen  bounded loopback clients (also `python -m spoa.demo.loadgen`)
    tap      second LB-node target: decodes every record, mirrors the forecast
    view     rich live table on a terminal, plain progress lines otherwise
    summary  the final JSON line
"""

from __future__ import annotations


def run(args) -> int:
    """Entry point of `python -m spoa demo` (argparse namespace from spoa.cli)."""
    from .stack import DemoOptions, run_demo

    return run_demo(DemoOptions.from_args(args))
