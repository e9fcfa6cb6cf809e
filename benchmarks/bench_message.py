#!/usr/bin/env python3
"""The message path in one process, without HAProxy: NOTIFY frames as HAProxy
2.6 sends them for `lease-request` (8 args, one message per frame, 32
connections interleaved, keep-alive: every connection sends many messages)
fed to SpopProtocol, answered by the product's handler (LeaseModule.on_message,
tracker on, no sampler or publisher) or by benchmarks/core_agent.py's handler.

It isolates what bench_e2e.py's "CPU per message" holds of ours (decode,
dispatch, handler, ACK encode) from HAProxy and the event loop, so a change to
the per-message path is measured in seconds instead of a full e2e run.

    python benchmarks/bench_message.py [--messages 200000] [--connections 32] [--frames-per-read 1,14]

--frames-per-read: NOTIFYs handed to each data_received (HAProxy 2.6 at c=32 sends ~14 per
read, bench_e2e.py's ntf/read column): the per-read cost is shared by that many messages.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from spoa.servernode.lease_module import LEASE_MESSAGES, LeaseModule, LeaseSettings  # noqa: E402
from spoa.servernode.tracker import SegmentTracker  # noqa: E402
from spoa.spop.agent import Agent  # noqa: E402
from spoa.spop.codec import FrameWriter  # noqa: E402
from spoa.spop.frames import write_notify  # noqa: E402
from spoa.spop.protocol import SpopProtocol  # noqa: E402
from spoa.spop.frames import write_haproxy_hello  # noqa: E402

import core_agent  # noqa: E402


class _Transport:
    """Takes the ACKs; the bench counts their bytes."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str):
        return ("127.0.0.1", 1)

    def is_closing(self) -> bool:
        return False


def notify(stream_id: int, cid: str, src_port: int) -> bytes:
    w = FrameWriter()
    write_notify(w, stream_id, 1, [("lease-request", [
        ("cid", cid), ("src", ipaddress.IPv4Address("10.0.0.2")), ("src_port", src_port),
        ("dst", ipaddress.IPv4Address("10.0.0.1")), ("dst_port", 8080), ("frontend", "fe_spoe_on"),
        ("method", "GET"), ("path", "/"),
    ])])
    return w.take()


def run(handler, connections: int, messages: int, per_read: int = 1) -> float:
    agent = Agent()
    for name in LEASE_MESSAGES:
        agent.registry.register(name, handler)
    protos, frames = [], []
    for i in range(connections):
        proto = SpopProtocol(agent)
        proto._transport = _Transport()
        hello = FrameWriter()
        write_haproxy_hello(hello, 16380, "pipelining,async")
        proto.data_received(hello.take())
        protos.append(proto)
        frames.append(b"".join(notify(i * per_read + k + 1, str(uuid.uuid4()), 40000 + i * per_read + k)
                               for k in range(per_read)))
    rounds = max(1, messages // (connections * per_read))
    started = time.process_time()
    for _ in range(rounds):
        for proto, frame in zip(protos, frames):
            proto.data_received(frame)
    elapsed = time.process_time() - started
    return elapsed / (rounds * connections * per_read) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5,
                    help="alternated runs of each handler; the minimum is reported (other jobs only add time)")
    ap.add_argument("--frames-per-read", default="1,14", help="NOTIFYs per read, comma-separated")
    args = ap.parse_args()
    module = LeaseModule(SegmentTracker(), None, None, 1000, 1, LeaseSettings())
    handlers = {"core": core_agent.make_handler(), "product": module.on_message}
    for per_read in (int(x) for x in args.frames_per_read.split(",")):
        best = dict.fromkeys(handlers, float("inf"))
        for _ in range(args.reps):
            for name, handler in handlers.items():
                best[name] = min(best[name], run(handler, args.connections, args.messages, per_read))
        for name, us in best.items():
            print(f"{name:8s} {per_read:3d} per read {us:6.2f} us CPU per message")
    with open("/proc/loadavg") as f:
        print("loadavg", f.read().split()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
