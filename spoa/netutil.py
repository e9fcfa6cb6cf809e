"""Helpers both daemons use: listen addresses, node ids, the wire clock, UDP receive
buffers and their drop counts, the /metrics listener.

Neutral on purpose: the server node (spoa.servernode, with the SPOP agent) and
the LB node (spoa.lbnode) both import it, and neither process loads the other
(tests/test_layout.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time

log = logging.getLogger("spoa.netutil")


def parse_address(text: str) -> tuple[str, str | int]:
    """Parse 'HOST:PORT', '[V6]:PORT' or 'unix:PATH'.

    Returns (host, port) for TCP and ('unix', path) for unix sockets.
    """
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ValueError(f"{text!r}: empty unix socket path")
        return "unix", path
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: expected HOST:PORT, [IPV6]:PORT or unix:PATH")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)


def now_ms() -> int:
    """Wall-clock milliseconds: the timestamps in packets, hints and leases."""
    return time.time_ns() // 1_000_000


def derived_node_id(address: str) -> int:
    """A node id from this host's name and the address it serves on.

    Used when `publish.node_id` / `lbnode.node_id` are not set: stable across
    restarts (so state on the peers carries over) and different for every
    listener on every host, so two nodes started from the same file do not
    take each other's packets or hints for replays.
    """
    text = f"{socket.gethostname()}|{address}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def set_receive_buffer(sock: socket.socket, size: int) -> int:
    """Ask for a `size`-byte receive buffer; the size the kernel granted.

    A reporting interval arrives as a burst (one datagram per ~8 records, all
    sent at once) while the receiver may be busy ending its own interval; the
    default buffer (~208 KiB, about 90 datagrams of 1400 bytes) drops the rest
    of the burst. SO_RCVBUFFORCE passes net.core.rmem_max when we may (root,
    CAP_NET_ADMIN); otherwise the kernel caps SO_RCVBUF there, and we say so.
    """
    force = getattr(socket, "SO_RCVBUFFORCE", 33)
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # the kernel reports it doubled
    if granted < size:
        log.warning("UDP receive buffer is %d bytes, not the %d asked (raise net.core.rmem_max): bursts "
                    "beyond it are dropped by the kernel (see the udp_drops metric)", granted, size)
    return granted


def udp_drops(sock: socket.socket) -> int | None:
    """Datagrams the kernel dropped on this socket (full receive buffer), or None.

    Read from /proc/net/udp{,6} (the `drops` column of the socket's inode):
    cheap, and only at scrape time.
    """
    try:
        inode = str(os.stat(f"/proc/self/fd/{sock.fileno()}").st_ino)
        name = "/proc/net/udp6" if sock.family == socket.AF_INET6 else "/proc/net/udp"
        with open(name) as table:
            next(table)
            for line in table:
                fields = line.split()
                if fields[9] == inode:
                    return int(fields[12])
    except (OSError, ValueError, IndexError):
        pass
    return None


def start_metrics_server(address: str, registry) -> tuple:
    """Start the /metrics HTTP server in a thread; returns (server, thread).
    An OSError names the address (e.g. in use)."""
    from prometheus_client import ProcessCollector, start_http_server  # only a daemon serving /metrics pays

    # process_cpu_seconds_total and process_resident_memory_bytes: the
    # dashboard's CPU per interval and memory (docker/grafana).
    ProcessCollector(registry=registry)
    host, port = parse_address(address)
    try:
        return start_http_server(int(port), addr=str(host), registry=registry)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, address) from exc
