"""YAML configuration with a declared schema: every error names its key.

Each process (agent, lbnode, ...) declares its sections as dicts of Field;
load() merges defaults, the file and command-line overrides, and raises
ConfigError("agent.max_frame_size: must be ...") on the first problem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .server import parse_address


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


def _check_address(value: str) -> None:
    parse_address(value)


def _check_tcp_address(value: str) -> None:
    if parse_address(value)[0] == "unix":
        raise ValueError("expected HOST:PORT")


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
    },
    "lease": {
        "standard_ms": Field(int, 30000, "the standard lease, sent when no prediction applies",
                             minimum=1, maximum=(1 << 31) - 1),
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
    if f.kind is list and not items:
        raise ConfigError(f"{path}: must not be empty")
    for i, item in enumerate(items):
        where = f"{path}[{i}]" if f.kind is list else path
        if f.item_kind is not None and not _is_kind(item, f.item_kind):
            raise ConfigError(f"{where}: must be {_type_name(f.item_kind)}, got {item!r}")
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
    return config
