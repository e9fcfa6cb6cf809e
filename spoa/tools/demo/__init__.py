"""`python -m spoa demo`: the whole system on loopback, with a live view.

One command starts HAProxy (provisioned like the tests do, `spoa.tools.provision`)
with the project's own haproxy/ include, the SPOP agent publishing to the LB
node every 500 ms, the LB node, a backend (`spoa.tools.demo.backend`: a streaming
download, a chatty WebSocket, short HTTP), a traffic generator
(`spoa.tools.demo.loadgen`) and a UDP tap that sees every publishing packet
(`spoa.tools.demo.tap`), then shows what flows (`spoa.tools.demo.view`) and ends with one
JSON summary line (`spoa.tools.demo.summary`).

Modules:
    runner   one run: starts the stack, drives the view, prints the summary
    stack    starts, watches and stops every process (process groups,
             parent-death signal, finally + atexit), scrapes /metrics
    backend  the application behind HAProxy (also `python -m spoa.tools.demo.backend`)
    loadgen  bounded loopback clients (also `python -m spoa.tools.demo.loadgen`)
    tap      second LB-node target: decodes every record, mirrors the forecast
    view     rich live table on a terminal, plain progress lines otherwise
    summary  the final JSON line
"""

from __future__ import annotations


def run(args) -> int:
    """Entry point of `python -m spoa demo` (argparse namespace from spoa.cli)."""
    from .runner import run_demo
    from .stack import DemoOptions

    return run_demo(DemoOptions.from_args(args))
