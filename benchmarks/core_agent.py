#!/usr/bin/env python3
"""The SPOP core alone, for bench_e2e.py: spoa's Agent + AgentServer (uvloop,
the same protocol code as `python -m spoa agent`) with one small handler and
none of the product's own per-message work (connection tracking, sampler,
publisher).

The handler does what a minimal real handler does: it reads the arguments a
lease decision needs (src, src_port, dst, dst_port, frontend, cid: 6 x
Message.get) and answers 3 set-var (sess.duration_ms, sess.source, txn.seq),
the same variables as the product, so HAProxy does the same work.

Counters are served as Prometheus-style text on --metrics (only the few that
bench_e2e.py reads, named as the product's /metrics names them), without
prometheus_client, so this file depends only on spoa.spop.agent / spoa.spop.server.

SPOA_NO_EXTENSIONS=1 selects the pure-Python codec, as for the product.

    python benchmarks/core_agent.py --listen 127.0.0.1:PORT --metrics 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spoa.spop.agent import Agent, AgentSettings  # noqa: E402
from spoa.spop.server import AgentServer  # noqa: E402

SESS, TXN = 1, 2
COUNTERS = ("connections_total", "hellos", "healthchecks", "frames_in", "frames_out", "bytes_in", "bytes_out",
            "notify_frames", "messages", "acks", "unknown_messages", "handler_errors", "acks_truncated")
GAUGES = ("connections_active", "max_pipeline_depth")


def make_handler():
    sequence = count(1)

    def lease(message, actions):
        get = message.get
        get("src"), get("src_port"), get("dst"), get("dst_port"), get("frontend"), get("cid")
        actions.set_var(SESS, "duration_ms", 30000)
        actions.set_var(SESS, "source", "standard")
        actions.set_var(TXN, "seq", next(sequence))

    return lease


def metrics_text(stats) -> str:
    lines = [f"spoa_agent_{n}_total {getattr(stats, n, 0)}" for n in COUNTERS]
    lines += [f"spoa_agent_{n} {getattr(stats, n, 0)}" for n in GAUGES]
    lines.append(f"spoa_agent_pipeline_depth_count {sum(getattr(stats, 'pipeline_depth', {}).values())}")
    for status, n in getattr(stats, "errors", {}).items():
        lines.append(f'spoa_agent_protocol_errors_total{{status="{status}"}} {n}')
    return "\n".join(lines) + "\n"


def serve_metrics(stats, address: str) -> None:
    host, port = address.rsplit(":", 1)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = metrics_text(stats).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer((host, int(port)), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()


async def serve(listen: str, metrics: str | None) -> None:
    agent = Agent(AgentSettings())
    handler = make_handler()
    for name in ("lease-request", "lease-session"):
        agent.registry.register(name, handler)
    server = AgentServer(agent, [listen])
    await server.start()
    if metrics:
        serve_metrics(agent.stats, metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(2.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True)
    ap.add_argument("--metrics")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.listen, args.metrics))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(args.listen, args.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
