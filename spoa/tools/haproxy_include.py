"""The HAProxy include (haproxy/ in the checkout), as installed with the package.

The files ship as package data of `spoa.haproxy_include` (setup.py maps it to
the top-level haproxy/ folder), so a pip-installed agent has the SPOE config
to give HAProxy: `spoa-lease haproxy-include DIR` writes them out for an
operator, and the demo runs HAProxy on them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# spoe-lease.conf: the engine; agents.cfg: the agents backend; the examples: frontends using it.
FILES = ("spoe-lease.conf", "agents.cfg", "example.cfg", "example-tcp.cfg")


def include_dir() -> Path:
    """The folder holding the include files, on the file system (HAProxy reads paths)."""
    folder = resources.files("spoa.haproxy_include")
    path = Path(str(folder))
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"HAProxy include incomplete in {path}: {', '.join(missing)} missing "
                                "(a broken install: reinstall spoa-lease)")
    return path


def write_include(target: Path) -> list[Path]:
    """Copy the include into `target` (created if needed); the files written."""
    source = include_dir()
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name in FILES:
        out = target / name
        out.write_bytes((source / name).read_bytes())
        written.append(out)
    return written


def haproxy_arguments(target: Path) -> str:
    """The `haproxy` arguments and environment an operator starts with."""
    return (f'SPOA_LEASE_DIR={target} SPOA_LEASE_AGENT=127.0.0.1:12345 haproxy -f your.cfg -f {target}/agents.cfg\n'
            f'  (your frontends: filter spoe engine lease config "${{SPOA_LEASE_DIR}}/spoe-lease.conf"; '
            f'models: {target}/example.cfg, {target}/example-tcp.cfg)')
