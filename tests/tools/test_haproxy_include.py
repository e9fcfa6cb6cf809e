"""Static checks of the HAProxy include (haproxy/*.cfg): rules a config test cannot see.

`haproxy -c` on 2.6/2.8/3.2 is in tests/e2e/test_agent_haproxy.py; these read
the files themselves, for what must hold whatever HAProxy accepts.
"""

from __future__ import annotations

import re
from pathlib import Path

HAPROXY_DIR = Path(__file__).resolve().parents[2] / "haproxy"
_UNITS_MS = {"us": 0.001, "ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "": 1}


def sections(path: Path) -> dict[str, list[list[str]]]:
    """{"backend be_x": [["timeout", "server", "10m"], ...]} (comments and blank lines dropped)."""
    out: dict[str, list[list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        words = line.split()
        if not raw[0].isspace():
            current = " ".join(words[:2])
            out[current] = []
        elif current is not None:
            out[current].append(words)
    return out


def duration_ms(text: str) -> float:
    value, unit = re.fullmatch(r"(\d+)([a-z]*)", text).groups()
    return int(value) * _UNITS_MS[unit]


def timeouts(lines: list[list[str]]) -> dict[str, float]:
    return {w[1]: duration_ms(w[2]) for w in lines if w[0] == "timeout"}


def test_tcp_lease_classes_route_but_never_cut_earlier_than_the_default():
    """A class backend with a shorter timeout closed quiet connections of that class
    earlier than unclassified ones: a lease is never a reason to close a connection."""
    cfg = sections(HAPROXY_DIR / "example-tcp.cfg")
    default = next(w[1] for w in cfg["frontend fe_tcp"] if w[0] == "default_backend")
    floor = timeouts(cfg[f"backend {default}"])
    assert {"server", "tunnel"} <= floor.keys()
    classes = [name for name in cfg if name.startswith("backend be_tcp_")]
    assert len(classes) == 3
    for name in classes:
        mine = timeouts(cfg[name])
        for kind in ("server", "tunnel"):
            assert mine.get(kind, floor[kind]) >= floor[kind], (name, kind, mine, floor)


def test_no_timeout_is_taken_from_a_lease():
    """`set-timeout tunnel var(sess.lease.duration_ms)` cut live WebSockets (see test_tunnel.py)."""
    for path in HAPROXY_DIR.glob("*.cfg"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            assert not ("set-timeout" in code and "lease" in code), f"{path.name}:{number}: {line.strip()}"
