"""Helpers both daemons use: node ids, UDP receive buffers and their drop counts."""

from __future__ import annotations

import hashlib
import logging
import os
import socket

log = logging.getLogger("spoa.netutil")


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
