"""`python -m spoa lbnode`: the LB node process built from its configuration."""

from __future__ import annotations

import asyncio
import logging
import signal

import numpy as np

from .. import __version__
from ..config import ConfigError, read_key_file, startup_error
from ..netutil import derived_node_id, set_receive_buffer
from ..netutil import parse_address
from ..wire.stream_transport import DatagramListener
from .forecast import ARIMA, SES, TSB, Croston, DampedHolt, History, Naive
from .node import INITIAL_CAPACITY, LbNode, LeaseTable
from .packet_receiver import BatchReceiver, open_batch_receiver
from .segment_history import SegmentHistory

log = logging.getLogger("spoa.lbnode")

# Most recently refreshed connections handed to an ARIMA refit (per class it
# fits a few of the longest; handing it all would copy every history).
ARIMA_REFIT_SAMPLE = 256


def forecaster_from_config(f: dict, capacity: int):
    """The forecaster a `forecast` config section names (method and its parameters), for
    `capacity` slots (spoa.lbnode.forecast.make_forecaster builds one from a name and keyword arguments)."""
    method = f["method"]
    if method == "naive":
        return Naive(capacity)
    if method == "ses":
        return SES(capacity, alpha=f["alpha"])
    if method == "damped_holt":
        return DampedHolt(capacity, alpha=f["alpha"], beta=f["beta"], phi=f["phi"])
    if method == "croston":
        return Croston(capacity, alpha=f["alpha"])
    if method == "tsb":
        return TSB(capacity, alpha=f["alpha"], beta=f["beta"])
    try:
        import statsmodels  # noqa: F401 - fitting needs it; say so at start, not at the first refit
    except ImportError:
        raise ConfigError("forecast.method: arima needs statsmodels (pip install 'spoa-lease[arima]')") from None
    return ARIMA(capacity, order=tuple(f["arima_order"]))


def policy_from_config(lease: dict, interval_ms: int, capacity: int, forecast: dict | None = None):
    """The lease policy a `lease` config section names, with its bounds; the activity
    policy's silence forecaster is the `forecast` section's method (gap_estimate: forecast)."""
    from .lease_policy import ActivityPolicy, EndBound, LeaseBounds, VolumePolicy

    bounds = LeaseBounds(min_ms=lease["min_ms"], max_ms=lease["max_ms"], standard_ms=lease["standard_ms"])
    end = None
    if lease["end_bound"]:
        end = EndBound(lease["end_quantile"], lease["end_margin_ms"], lease["end_min_closes"])
    if lease["policy"] == "activity":
        gaps = None
        if lease["gap_estimate"] == "forecast" and forecast is not None:
            gaps = forecaster_from_config(forecast, capacity)
        return ActivityPolicy(bounds, quantile=lease["quantile"], safety=lease["safety"], interval_ms=interval_ms,
                              capacity=capacity, gap_forecaster=gaps, end_bound=end)
    return VolumePolicy(bounds, lease["resource_utilization_threshold"], interval_ms=interval_ms, capacity=capacity,
                        calibrated_lease_ms=lease["calibrated_lease_ms"], end_bound=end)


def build_lbnode(config: dict) -> LbNode:
    node = config["lbnode"]
    capacity = node["max_connections"]
    # Its parts start at the table's first size and grow with it.
    start = min(capacity, INITIAL_CAPACITY)
    anomaly = None
    if config["anomaly"]["enabled"]:
        from .anomaly import AnomalyDetector

        a = config["anomaly"]
        anomaly = AnomalyDetector(q_high=a["quantile"], factor=a["factor"], min_samples=a["min_samples"])
    forecaster = forecaster_from_config(config["forecast"], start)
    # The rolling per-connection history (bounded ring): ARIMA refits read it,
    # and it is what one inspects a connection's recent volumes by. float32:
    # it costs 4 B x forecast.history per connection slot.
    history = History(start, config["forecast"]["history"], np.float32)
    segments = SegmentHistory(node["max_segments"], history=node["segment_history"])
    policy = policy_from_config(config["lease"], node["interval_ms"], start, config["forecast"])
    table = LeaseTable(capacity, forecaster, policy,
                       config["lease"]["standard_ms"], node["interval_ms"], node["remember_expired"], anomaly,
                       history, segments)
    return LbNode(table, read_key_file(node["key_file"]), node["node_id"], node["interval_ms"], node["mtu"])


async def open_lbnode(config: dict) -> LbNode:
    """The LB node built from `config`, its UDP socket bound and drained into its table.

    Without `lbnode.node_id` the id is derived from the bound address (so
    port 0 gives every instance its own).
    """
    lbnode = build_lbnode(config)
    host, port = parse_address(config["lbnode"]["listen"])
    receiver = BatchReceiver(lbnode.key, lbnode.on_batch, lbnode.on_datagram)
    lbnode.receiver = receiver
    lbnode.transport = await open_batch_receiver(host, port, receiver)
    set_receive_buffer(lbnode.transport.sock, config["lbnode"]["receive_buffer"])
    bound = lbnode.transport.get_extra_info("sockname")
    if lbnode.lbnode_id is None:
        lbnode.lbnode_id = derived_node_id(f"{bound[0]}:{bound[1]}")
    if config["cluster"]["store"]:
        lbnode.tier = tier_from_config(config["cluster"], lbnode, f"{bound[0]}:{bound[1]}")
    return lbnode


def tier_from_config(cluster: dict, lbnode: LbNode, bound: str):
    """This node's part in the tier on the store `cluster.store` names (spoa/lbnode/cluster/)."""
    try:
        import redis  # noqa: F401 - say so at start, not at the first store call
    except ImportError:
        raise ConfigError("cluster.store: the tier needs redis-py (pip install 'spoa-lease[cluster]')") from None
    from .cluster.tier import TierMember

    return TierMember(lbnode.table, lbnode.lbnode_id, cluster, cluster["advertise"] or bound)


async def _interval_loop(lbnode: LbNode, refit_every: int) -> None:
    loop = asyncio.get_running_loop()
    table = lbnode.table
    next_at = loop.time()
    ticks = 0
    refit: asyncio.Future | None = None
    while True:
        next_at += lbnode.interval_ms / 1000
        await asyncio.sleep(max(0.0, next_at - loop.time()))
        try:
            lbnode.tick()
            if lbnode.tier is not None:
                await lbnode.tier.round()  # bounded by cluster.timeout_ms per store call
        except Exception:
            log.exception("interval failed")
        ticks += 1
        if isinstance(table.forecaster, ARIMA) and ticks % refit_every == 0 and (refit is None or refit.done()):
            histories = {slot: table.history.series(slot) for slot in table.newest(ARIMA_REFIT_SAMPLE).tolist()}
            refit = loop.run_in_executor(None, table.forecaster.refit, histories)


async def serve_lbnode(config: dict, reload=None) -> None:
    with startup_error("lbnode.listen"):
        lbnode = await open_lbnode(config)
    receiver, transport = lbnode.receiver, lbnode.transport
    loop = asyncio.get_running_loop()
    tcp_server = None
    node = config["lbnode"]
    if node["tcp_listen"]:
        # The TCP option: the same datagrams, length-prefixed, through the same receiver.
        tcp_host, tcp_port = parse_address(node["tcp_listen"])
        tcp_server = DatagramListener(receiver.datagram_received, node["tcp_idle_timeout"],
                                      node["tcp_message_timeout"], node["tcp_max_buffered_bytes"])
        with startup_error("lbnode.tcp_listen"):
            await tcp_server.start(tcp_host, tcp_port)
    if config["metrics"]["listen"]:
        from .metrics import serve_lbnode_metrics

        with startup_error("metrics.listen"):
            serve_lbnode_metrics(config["metrics"]["listen"], lbnode, receiver, tcp_server)
    if lbnode.tier is not None:
        await lbnode.tier.round()  # join (or find the store down) before the first interval
    ticker = loop.create_task(_interval_loop(lbnode, config["forecast"]["arima_refit_intervals"]))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None:
        # Leases, policy and forecaster hold per-connection state built from
        # the old values: only logging changes live; the rest is named.
        loop.add_signal_handler(signal.SIGHUP, reload, lambda new: {"log"})
    log.info("spoa-lease lbnode %s ready on udp %s (policy %s, forecaster %s%s)", __version__,
             config["lbnode"]["listen"], config["lease"]["policy"], config["forecast"]["method"],
             f", tier on {','.join(config['cluster']['store'])}" if lbnode.tier is not None else "")
    await stop.wait()
    ticker.cancel()
    if lbnode.tier is not None:
        await lbnode.tier.close()  # last changes written, membership given up: the others take over now
    transport.close()
    if tcp_server is not None:
        tcp_server.close()
    log.info("stopped: %d connections held, %d premature expiries", len(lbnode.table),
             lbnode.table.stats.premature_expiries)
