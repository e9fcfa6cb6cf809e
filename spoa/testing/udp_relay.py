"""A lossy UDP relay between server nodes and an LB node, for tests on loopback.

Agents send their publishing datagrams to the relay's ``address``; it forwards
each to the LB node unless ``drop(wall_time)`` says to lose it, and forwards
what the LB node sends back (hints, which go to the address packets came
from: the relay's upstream socket) to the agent that last sent. One thread,
one ``select`` over both sockets, stopped by ``close`` within 50 ms::

    with LossyRelay("127.0.0.1:9400", drop=lambda t: random.random() < 0.1) as relay:
        ... agent configured with publish.lb_nodes: [relay.address] ...
    relay.dropped, relay.forwarded

Only the standard library; datagrams are passed through unread.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable

from ..netutil import parse_address

__all__ = ["LossyRelay"]


class LossyRelay:
    def __init__(self, upstream: str, drop: Callable[[float], bool] | None = None, host: str = "127.0.0.1") -> None:
        up_host, up_port = parse_address(upstream)
        self.upstream = (str(up_host), int(up_port))
        self.drop = drop or (lambda _t: False)
        self.downstream_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.downstream_sock.bind((host, 0))
        self.upstream_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.upstream_sock.bind((host, 0))
        self.address = "%s:%d" % self.downstream_sock.getsockname()
        self.forwarded = 0  # agent -> LB node datagrams passed on
        self.dropped = 0
        self.drop_times: list[float] = []  # wall times of the dropped ones
        self.returned = 0  # LB node -> agent datagrams
        self._agent: tuple[str, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lossy-udp-relay", daemon=True)

    def start(self) -> LossyRelay:
        self._thread.start()
        return self

    def _run(self) -> None:
        socks = [self.downstream_sock, self.upstream_sock]
        while not self._stop.is_set():
            ready, _, _ = select.select(socks, [], [], 0.05)
            for sock in ready:
                try:
                    data, addr = sock.recvfrom(65535)
                except OSError:
                    continue
                if sock is self.downstream_sock:
                    self._agent = addr
                    now = time.time()
                    if self.drop(now):
                        self.dropped += 1
                        self.drop_times.append(now)
                        continue
                    self._send(self.upstream_sock, data, self.upstream)
                    self.forwarded += 1
                elif self._agent is not None:
                    self._send(self.downstream_sock, data, self._agent)
                    self.returned += 1

    @staticmethod
    def _send(sock: socket.socket, data: bytes, addr: tuple[str, int]) -> None:
        try:
            sock.sendto(data, addr)
        except OSError:
            pass  # the peer is not up (yet): UDP loses it, as the network would

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self.downstream_sock.close()
        self.upstream_sock.close()

    def __enter__(self) -> LossyRelay:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
