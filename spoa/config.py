"""YAML configuration with a declared schema: every error names its key.

Each process (agent, lbnode, ...) declares its sections as dicts of Field;
load() merges defaults, the file and command-line overrides, and raises
ConfigError("agent.max_frame_size: must be ...") on the first problem.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .netutil import parse_address


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending key."""


@dataclass(frozen=True)
class Field:
    kind: type | tuple[type, ...]
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None
    # Extra check raising ValueError with a reason (e.g. address syntax).
    check: Callable[[Any], Any] | None = None
    # For lists: the type and check of each item.
    item_kind: type | None = None
    nullable: bool = False
    allow_empty: bool = False  # for lists


def _check_address(value: str) -> None:
    parse_address(value)


def _check_tcp_address(value: str) -> None:
    if parse_address(value)[0] == "unix":
        raise ValueError("expected HOST:PORT")


MIN_KEY_BYTES = 16


def read_key_file(path: str) -> bytes:
    """The shared HMAC key: the file's bytes, surrounding whitespace removed."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"cannot read key file {path}: {exc.strerror}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"key file {path} holds {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
    return key


def _check_key_file(value: str) -> None:
    read_key_file(value)


def _check_namespace(value: str) -> None:
    # Braces would change the keys' hash tags (the slot a key lives in); the rest keeps keys readable.
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise ValueError("expected 1 to 64 of A-Z a-z 0-9 _ . -")


LOG_LEVELS = ("debug", "info", "warning", "error")

AGENT_SCHEMA: dict[str, dict[str, Field]] = {
    "agent": {
        "listen": Field(list, ["127.0.0.1:12345"], "SPOP listen addresses: HOST:PORT, [V6]:PORT or unix:PATH",
                        item_kind=str, check=_check_address),
        "max_frame_size": Field(int, 65532, "largest frame accepted; HELLO answers min(this, HAProxy's)",
                                minimum=256, maximum=16 << 20),
        "max_inflight_per_connection": Field(int, 256, "async NOTIFYs pending per connection before reads pause",
                                             minimum=1, maximum=100000),
        "max_connections": Field(int, 10000, "connections beyond this are closed at once", minimum=1),
        "hello_timeout": Field((int, float), 10.0, "seconds to wait for HAPROXY-HELLO", minimum=0.1, maximum=3600),
        "handler_timeout": Field((int, float), 5.0, "seconds an async handler may run", minimum=0.001, maximum=3600),
        "max_reassembled_size": Field(int, 1 << 20, "bound on a reassembled 2.x fragmented NOTIFY",
                                      minimum=256, maximum=64 << 20),
        "allow_async": Field(bool, True, "announce `async` when HAProxy 2.x offers it"),
        "accept_fragments": Field(bool, True, "announce `fragmentation` (2.x then fragments big NOTIFYs)"),
        "shutdown_grace": Field((int, float), 5.0, "seconds to drain connections on SIGTERM", minimum=0, maximum=600),
        "idle_timeout": Field((int, float), 120.0, "seconds a connection may send nothing after HELLO (nothing "
                              "pending) before it is closed; keep it above HAProxy's `timeout idle` (2.x) and the "
                              "agents backend's `timeout server` (3.1+), which close first", minimum=1,
                              maximum=86400),
        "frame_timeout": Field((int, float), 10.0, "seconds from a frame's first byte to its last (and from a "
                               "fragmented NOTIFY's first fragment to its last) before the connection is closed",
                               minimum=0.1, maximum=3600),
        "max_buffered_bytes": Field(int, 256 << 20, "bytes of partial frames and reassemblies held across all "
                                    "connections; the connection that would exceed it is refused (status 13)",
                                    minimum=64 << 10, maximum=1 << 40),
    },
    "lease": {
        "standard_ms": Field(int, 30000, "the standard lease, sent when no prediction applies",
                             minimum=1, maximum=(1 << 31) - 1),
        "min_ms": Field(int, 1000, "a predicted lease below this is refused (standard lease, source fallback)",
                        minimum=1, maximum=(1 << 31) - 1),
        "max_ms": Field(int, 3_600_000, "a predicted lease above this is refused (standard lease, source fallback)",
                        minimum=1, maximum=(1 << 31) - 1),
        "hint_ttl_ms": Field(int, 5000, "a hint older than this is stale (the LB node went quiet): fallback",
                             minimum=1, maximum=86_400_000),
        "refresh_fraction": Field(float, 0.34, "under a predicted lease, publish a connection every "
                                  "lease x this (never more often than every interval)", minimum=0.01, maximum=1.0),
        "class_bounds_ms": Field(list, [60_000, 600_000], "sess.lease.class is short up to the first bound, "
                                 "medium up to the second, long above (TCP frontends route on it)", item_kind=int,
                                 minimum=1, maximum=(1 << 31) - 1),
    },
    "tracker": {
        "segment_size": Field(int, 1 << 20, "level-0 segment size in bytes", minimum=1024, maximum=1 << 40),
        "min_segment_size": Field(int, 64 << 10, "hot segments split down to this size", minimum=1024,
                                  maximum=1 << 40),
        "max_segment_size": Field(int, 64 << 20, "idle segments merge up to this size", minimum=1024,
                                  maximum=1 << 50),
        "split_bytes": Field(int, 256 << 10, "bytes in one interval that make a tail segment hot",
                             minimum=1, maximum=1 << 50),
        "idle_ms": Field(int, 5000, "quiet time after which a segment counts as idle", minimum=1,
                         maximum=86_400_000),
        "max_segments_per_connection": Field(int, 16, "bound per connection (coarsens beyond); must fit "
                                             "one datagram at publish.mtu", minimum=2, maximum=65535),
        "max_total_segments": Field(int, 4_000_000, "bound across connections (coarsens beyond)",
                                    minimum=4, maximum=1 << 40),
        "max_connections": Field(int, 1_000_000, "tracked connections; more are refused and counted",
                                 minimum=1, maximum=1 << 40),
        "expire_ms": Field(int, 300_000, "a connection unseen this long is closed as expired", minimum=1,
                           maximum=86_400_000 * 30),
    },
    "publish": {
        "interval_ms": Field(int, 1000, "reporting interval", minimum=10, maximum=3_600_000),
        "lb_nodes": Field(list, [], "LB node addresses HOST:PORT (UDP); empty: track without publishing",
                          item_kind=str, check=_check_tcp_address, allow_empty=True),
        "node_id": Field(int, None, "this server node's id in the packets; null: derived from the host name and "
                         "agent.listen[0] (stable across restarts, distinct per agent; set it where host names "
                         "repeat)", minimum=0, maximum=(1 << 64) - 1, nullable=True),
        "key_file": Field(str, None, "file holding the shared HMAC key (required with lb_nodes)",
                          check=_check_key_file, nullable=True),
        "mtu": Field(int, 1400, "largest datagram sent", minimum=576, maximum=65507),
        "transport": Field(str, "udp", "udp, or tcp (length-prefixed datagrams on one connection per LB node, "
                           "to its lbnode.tcp_listen)", choices=("udp", "tcp")),
    },
    "sampler": {
        "source": Field(str, "auto", "kernel: sock_diag tcp_info; spoe: counters in SPOE messages; "
                        "auto: kernel when it works here", choices=("auto", "kernel", "spoe")),
    },
    "metrics": {
        "listen": Field(str, None, "Prometheus /metrics address HOST:PORT (off when null)",
                        check=_check_tcp_address, nullable=True),
    },
    "log": {
        "level": Field(str, "info", "log level", choices=LOG_LEVELS),
        "format": Field(str, "text", "text or json (one object per line)", choices=("text", "json")),
    },
}


FORECASTERS = ("naive", "ses", "damped_holt", "croston", "tsb", "arima")
POLICIES = ("volume", "activity")

LBNODE_SCHEMA: dict[str, dict[str, Field]] = {
    "lbnode": {
        "listen": Field(str, "127.0.0.1:9400", "UDP address publishing packets arrive on (hints leave from it)",
                        check=_check_tcp_address),
        "tcp_listen": Field(str, None, "also accept packets over TCP here (length-prefixed; hints return on "
                            "the connection)", check=_check_tcp_address, nullable=True),
        "tcp_idle_timeout": Field((int, float), 300.0, "seconds a TCP peer may send nothing before it is closed "
                                  "(agents send every publish interval)", minimum=1, maximum=86400),
        "tcp_message_timeout": Field((int, float), 10.0, "seconds from a TCP message's first byte to its last "
                                     "before the peer is closed", minimum=0.1, maximum=3600),
        "tcp_max_buffered_bytes": Field(int, 64 << 20, "bytes of unfinished TCP messages held across peers; the "
                                        "peer that would exceed it is closed", minimum=64 << 10, maximum=1 << 40),
        "key_file": Field(str, None, "file holding the HMAC key shared with the server nodes (required)",
                          check=_check_key_file, nullable=True),
        "node_id": Field(int, None, "this LB node's id in the hints; null: derived from the host name and the "
                         "bound lbnode.listen address (stable across restarts, distinct per LB node; set it where "
                         "host names repeat)", minimum=0, maximum=(1 << 64) - 1, nullable=True),
        "receive_buffer": Field(int, 8 << 20, "UDP receive buffer in bytes: holds the bursts of datagrams "
                                "server nodes send at each interval (the kernel drops what does not fit; "
                                "spoa_lbnode_udp_drops counts it)", minimum=64 << 10, maximum=1 << 30),
        "interval_ms": Field(int, 1000, "forecast / lease / hint interval", minimum=10, maximum=3_600_000),
        "max_connections": Field(int, 1_000_000, "connections held; beyond, new ones are refused and counted. "
                                 "The tables grow to it as connections arrive (about 1 kB per held connection "
                                 "with the default history; an idle LB node is ~45 MB)", minimum=1, maximum=1 << 32),
        "remember_expired": Field(int, 100_000, "expired connections remembered to detect premature expiries",
                                  minimum=0, maximum=1 << 32),
        "mtu": Field(int, 1400, "largest hint datagram", minimum=576, maximum=65507),
        "max_segments": Field(int, 2_000_000, "segments whose state is held (beyond, new ones are not tracked "
                              "and counted); about 110 B + 4 B x segment_history each", minimum=1,
                              maximum=1 << 32),
        "segment_history": Field(int, 8, "intervals of bytes kept per segment (a ring)", minimum=1,
                                 maximum=10_000),
    },
    "lease": {
        "policy": Field(str, "activity", "activity: from the predicted time to the next activity (the default: "
                        "it wins the backtest on real traces); volume: the specification's predicted_volume / "
                        "threshold", choices=POLICIES),
        "standard_ms": Field(int, 30000, "lease when no prediction applies", minimum=1, maximum=(1 << 31) - 1),
        "min_ms": Field(int, 12000, "shortest lease granted: what a lease must cover to survive lost refreshes, "
                        "and what a connection that ends silently right after its traffic holds (the backtest "
                        "frontier picks 12 s: benchmarks/RESULTS.md)",
                        minimum=1, maximum=(1 << 31) - 1),
        "max_ms": Field(int, 3_600_000, "longest lease granted", minimum=1, maximum=(1 << 31) - 1),
        "resource_utilization_threshold": Field((int, float), 100.0, "volume policy: bytes per interval that "
                                                "buy one ms of lease", minimum=1e-9, maximum=1e18),
        "calibrated_lease_ms": Field(int, 30000, "volume policy: a class's typical active interval (geometric "
                                     "mean of its active volumes) buys this lease, which calibrates the "
                                     "threshold per class; null: resource_utilization_threshold for all",
                                     minimum=1, maximum=(1 << 31) - 1, nullable=True),
        "gap_estimate": Field(str, "forecast", "activity policy: the next silence predicted by forecast.method "
                              "over each connection's silence lengths (forecast), or the quantile of its last "
                              "silences (quantile)", choices=("forecast", "quantile")),
        "quantile": Field(float, 0.99, "activity policy: quantile of inter-activity gaps (gap_estimate: "
                          "quantile; also ARIMA's stand-in until it is fitted)", minimum=0.5, maximum=0.9999),
        "safety": Field((int, float), 1.0, "activity policy: factor on the predicted silence (quiet connections "
                        "are refreshed well inside it: a margin here buys little but stale state)", minimum=1.0,
                        maximum=100.0),
        "end_bound": Field(bool, True, "an idle connection's lease ends end_margin_ms after the idle time at "
                           "which its class's connections have closed (end_quantile of it): connections whose "
                           "end is never announced are dropped soon after, live ones are refreshed before"),
        "end_quantile": Field(float, 0.95, "end bound: quantile of a class's idle time at close", minimum=0.5,
                              maximum=1.0),
        "end_margin_ms": Field(int, 2000, "end bound: time after it (a close record's trip: about an interval "
                               "and the LB node's phase)", minimum=0, maximum=(1 << 31) - 1),
        "end_min_closes": Field(int, 8, "end bound: announced closes a class needs before it applies",
                                minimum=1, maximum=64),
    },
    "forecast": {
        "method": Field(str, "ses", "forecaster of next-interval volume, and of the next silence for the "
                        "activity policy (ses: on the backtest frontier it needs fewer entries than naive at equal "
                        "stale state; tsb equals it on silences and costs more)", choices=FORECASTERS),
        "alpha": Field(float, 0.3, "smoothing of the level (and Croston/TSB sizes)", minimum=0.001, maximum=1.0),
        "beta": Field(float, 0.1, "smoothing of the trend (Holt) or demand probability (TSB)", minimum=0.001,
                      maximum=1.0),
        "phi": Field(float, 0.9, "damping of the trend (Holt)", minimum=0.5, maximum=1.0),
        "arima_order": Field(list, [1, 0, 0], "ARIMA (p, d, q)", item_kind=int),
        "arima_refit_intervals": Field(int, 60, "ARIMA refit period, in intervals (off the hot path)",
                                       minimum=1, maximum=1_000_000),
        "history": Field(int, 32, "intervals of volume history kept per connection (a ring; 4 B each per "
                         "connection slot; ARIMA refits fit on it)", minimum=8, maximum=10_000),
    },
    "anomaly": {
        "enabled": Field(bool, True, "flag connections far outside their class"),
        "quantile": Field(float, 0.999, "class quantile of segment rates", minimum=0.5, maximum=0.99999),
        "factor": Field((int, float), 4.0, "flag above quantile x factor", minimum=1.0, maximum=1e6),
        "min_samples": Field(int, 1000, "class samples before flagging", minimum=1, maximum=1 << 32),
    },
    "cluster": {
        "store": Field(list, [], "seed nodes HOST:PORT of the Valkey/Redis Cluster holding the tier's state "
                       "(issue 13); empty: this LB node runs alone, its state in memory only",
                       item_kind=str, check=_check_tcp_address, allow_empty=True),
        "advertise": Field(str, None, "HOST:PORT agents should send this LB node's share to; null: "
                           "lbnode.listen", check=_check_tcp_address, nullable=True),
        "namespace": Field(str, "spoa", "prefix of every key this tier writes (tiers sharing one store "
                           "keep apart by it)", check=_check_namespace),
        "slots": Field(int, 4096, "ownership slots (a power of two): connections hash to one by the store's "
                       "CRC16, each slot has one owner among the live LB nodes; a node's share varies by "
                       "about sqrt(2 / slots) around 1/N (2.2 % at 4096)", minimum=16, maximum=16384),
        "membership_ms": Field(int, 3000, "lease of this node's membership key, renewed every third of it; a "
                               "node that finds its key lapsed is fenced (answers nothing) and rejoins, "
                               "unless the key was lost while the store was unreachable (a failover): then "
                               "it sets it again and keeps its slots",
                               minimum=300, maximum=600_000),
        "grace_ms": Field(int, 3000, "an adopted connection's lease ends no sooner than this after its "
                          "adoption (the agents' time to re-route)", minimum=0, maximum=3_600_000),
        "gc_ms": Field(int, 7_200_000, "expiry of a slot's stored state (a garbage-collection backstop for "
                       "slots nobody owns any more; the owner renews it); above lease.max_ms",
                       minimum=1000, maximum=30 * 86_400_000),
        "timeout_ms": Field(int, 500, "bound on one store round trip; beyond, the store counts as "
                            "unreachable for it (served from memory, retried)", minimum=10, maximum=60_000),
    },
    "metrics": AGENT_SCHEMA["metrics"],
    "log": AGENT_SCHEMA["log"],
}


def defaults(schema: dict[str, dict[str, Field]]) -> dict[str, dict[str, Any]]:
    return {section: {key: f.default for key, f in fields.items()} for section, fields in schema.items()}


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _is_kind(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False  # YAML `yes` must not pass as the integer 1
    return isinstance(value, kinds)


def validate_value(path: str, f: Field, value: Any) -> Any:
    if value is None and f.nullable:
        return None
    if not _is_kind(value, f.kind):
        raise ConfigError(f"{path}: must be {_type_name(f.kind)}, got {value!r}")
    items = value if f.kind is list else [value]
    if f.kind is list and not items and not f.allow_empty:
        raise ConfigError(f"{path}: must not be empty")
    for i, item in enumerate(items):
        where = f"{path}[{i}]" if f.kind is list else path
        if f.item_kind is not None and not _is_kind(item, f.item_kind):
            raise ConfigError(f"{where}: must be {_type_name(f.item_kind)}, got {item!r}")
        if isinstance(item, float) and not math.isfinite(item):
            # NaN compares false with every bound: it would pass the range check.
            raise ConfigError(f"{where}: must be a finite number, got {item!r}")
        if f.minimum is not None and item < f.minimum or f.maximum is not None and item > f.maximum:
            raise ConfigError(f"{where}: {item!r} is out of range [{f.minimum}, {f.maximum}]")
        if f.choices is not None and item not in f.choices:
            raise ConfigError(f"{where}: {item!r} is not one of {', '.join(map(str, f.choices))}")
        if f.check is not None:
            try:
                f.check(item)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
    return value


def load(
    schema: dict[str, dict[str, Field]],
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Defaults, then the YAML file, then overrides ({"section.key": value})."""
    config = defaults(schema)
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for section, values in data.items():
            if section not in schema:
                raise ConfigError(f"{section}: unknown section (known: {', '.join(schema)})")
            if not isinstance(values, dict):
                raise ConfigError(f"{section}: must be a mapping")
            for key, value in values.items():
                if key not in schema[section]:
                    raise ConfigError(
                        f"{section}.{key}: unknown key (known: {', '.join(schema[section])})"
                    )
                config[section][key] = validate_value(f"{section}.{key}", schema[section][key], value)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, key = dotted.split(".", 1)
        config[section][key] = validate_value(dotted, schema[section][key], value)
    for check in CROSS_CHECKS:
        check(config)
    return config


def _check_segment_sizes(config: dict) -> None:
    t = config.get("tracker")
    if t and not t["min_segment_size"] <= t["segment_size"] <= t["max_segment_size"]:
        raise ConfigError("tracker.segment_size: must lie between tracker.min_segment_size and "
                          "tracker.max_segment_size")
    if t and t["max_total_segments"] < 2 * t["max_segments_per_connection"]:
        raise ConfigError("tracker.max_total_segments: must be at least twice "
                          "tracker.max_segments_per_connection")


def _check_segments_fit_mtu(config: dict) -> None:
    """A connection record never spans datagrams: its segments must fit one."""
    t, p = config.get("tracker"), config.get("publish")
    if t and p:
        from .wire.packet import max_segments

        fit = max_segments(p["mtu"], 255)
        if t["max_segments_per_connection"] > fit:
            raise ConfigError(f"tracker.max_segments_per_connection: {t['max_segments_per_connection']} segments "
                              f"do not fit one datagram at publish.mtu {p['mtu']} (at most {fit})")


def _check_publish_key(config: dict) -> None:
    p = config.get("publish")
    if p and p["lb_nodes"] and not p["key_file"]:
        raise ConfigError("publish.key_file: required when publish.lb_nodes is set (packets are authenticated)")
    node = config.get("lbnode")
    if node is not None and not node["key_file"]:
        raise ConfigError("lbnode.key_file: required (packets and hints are authenticated)")


def _check_arima_order(config: dict) -> None:
    f = config.get("forecast")
    if f and (len(f["arima_order"]) != 3 or not all(0 <= v <= 5 for v in f["arima_order"])
              or f["arima_order"][1] > 2):
        raise ConfigError("forecast.arima_order: must be [p, d, q] with 0 <= p, q <= 5 and 0 <= d <= 2")


def _check_lease_bounds(config: dict) -> None:
    lease = config.get("lease")
    if lease and "min_ms" in lease and not lease["min_ms"] <= lease["standard_ms"] <= lease["max_ms"]:
        raise ConfigError("lease.standard_ms: must lie between lease.min_ms and lease.max_ms")
    bounds = lease.get("class_bounds_ms") if lease else None
    if bounds is not None and (len(bounds) != 2 or bounds[0] >= bounds[1]):
        raise ConfigError("lease.class_bounds_ms: must be two increasing bounds [short, medium]")


@contextmanager
def startup_error(key: str) -> Iterator[None]:
    """An OSError while opening what `key` configures (a socket in use, an
    address not on this host, a name that does not resolve) becomes a
    ConfigError naming the key: the process stops at start with exit code 2."""
    try:
        yield
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise ConfigError(f"{key}: {where}{exc.strerror or exc}") from None


def physical_memory() -> int:
    """Bytes of RAM on this machine: what any size limit must fit in."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits_memory(needs: dict[str, int], what: str) -> None:
    """ConfigError naming the key that needs the most, when the worst case of
    the configured limits ({key: bytes at that limit}) exceeds this machine's RAM:
    a limit the process could never reach would end in an allocation failure."""
    total, ram = sum(needs.values()), physical_memory()
    if total > ram:
        key = max(needs, key=needs.__getitem__)
        raise ConfigError(f"{key}: {what} at the configured limits need about {total / 2**30:.1f} GiB "
                          f"({key} alone {needs[key] / 2**30:.1f} GiB), more than this machine's "
                          f"{ram / 2**30:.1f} GiB of memory; lower it")


# The whole agent per tracked connection (tracker slab, ids, hints; measured in
# benchmarks/RESULTS.md, "The whole agent's memory per connection") and per
# segment beyond a connection's inline tail segments.
AGENT_BYTES_PER_CONNECTION = 800
AGENT_BYTES_PER_SEGMENT = 64


def _check_agent_memory(config: dict) -> None:
    t = config.get("tracker")
    if t:
        check_fits_memory({"tracker.max_connections": t["max_connections"] * AGENT_BYTES_PER_CONNECTION,
                           "tracker.max_total_segments": t["max_total_segments"] * AGENT_BYTES_PER_SEGMENT,
                           "agent.max_buffered_bytes": config["agent"]["max_buffered_bytes"]},
                          "tracked connections and segments")


# The LB node per held connection beyond its history ring (tables, slot map,
# forecaster and policy state, two segments; measured in benchmarks/RESULTS.md,
# "LB node memory"), per segment beyond its ring, per remembered expiry.
LBNODE_BYTES_PER_CONNECTION = 850
LBNODE_BYTES_PER_SEGMENT = 110
LBNODE_BYTES_PER_EXPIRED = 200


def _check_lbnode_memory(config: dict) -> None:
    node, f = config.get("lbnode"), config.get("forecast")
    if node and f:
        check_fits_memory({"lbnode.max_connections": node["max_connections"] * LBNODE_BYTES_PER_CONNECTION,
                           "forecast.history": node["max_connections"] * 4 * f["history"],
                           "lbnode.max_segments": node["max_segments"] * (LBNODE_BYTES_PER_SEGMENT
                                                                          + 4 * node["segment_history"]),
                           "lbnode.remember_expired": node["remember_expired"] * LBNODE_BYTES_PER_EXPIRED},
                          "LB-node state")


def _check_cluster(config: dict) -> None:
    c = config.get("cluster")
    if not c:
        return
    if c["slots"] & (c["slots"] - 1):
        raise ConfigError(f"cluster.slots: {c['slots']} is not a power of two (16, 32, ... 16384)")
    if c["gc_ms"] <= config["lease"]["max_ms"]:
        raise ConfigError(f"cluster.gc_ms: must be above lease.max_ms ({config['lease']['max_ms']}): a connection "
                          "under its longest lease must not lose its stored state")
    interval = config["lbnode"]["interval_ms"]
    if c["membership_ms"] < 3 * interval:
        raise ConfigError(f"cluster.membership_ms: must be at least 3 x lbnode.interval_ms ({interval}): the "
                          "membership is renewed at the end of an interval, at least three times per lease")
    if c["membership_ms"] < 3 * c["timeout_ms"]:
        raise ConfigError("cluster.membership_ms: must be at least 3 x cluster.timeout_ms (renewed every third "
                          "of it, each renewal bounded by the timeout)")


CROSS_CHECKS = (_check_segment_sizes, _check_segments_fit_mtu, _check_publish_key, _check_lease_bounds,
                _check_arima_order, _check_agent_memory, _check_lbnode_memory, _check_cluster)


def reference_markdown(title: str, schema: dict[str, dict[str, Field]]) -> str:
    """The configuration reference of one process, as docs/configuration.md shows it."""
    lines = [f"## {title}", ""]
    for section, fields in schema.items():
        lines += [f"### `{section}`", "", "| key | type | default | range | meaning |", "|---|---|---|---|---|"]
        for key, f in fields.items():
            kinds = f.kind if isinstance(f.kind, tuple) else (f.kind,)
            kind = " or ".join(k.__name__ for k in kinds) + (" or null" if f.nullable else "")
            if f.choices:
                bounds = ", ".join(map(str, f.choices))
            elif f.minimum is not None or f.maximum is not None:
                bounds = f"{f.minimum} … {f.maximum}" if f.maximum is not None else f"≥ {f.minimum}"
            else:
                bounds = ""
            default = "null" if f.default is None else yaml.safe_dump(f.default, default_flow_style=True).strip()
            default = default.removesuffix("\n...").strip()
            lines.append(f"| `{key}` | {kind} | `{default}` | {bounds} | {f.help} |")
        lines.append("")
    return "\n".join(lines)
