"""Sends connection publishing packets to the LB nodes over UDP.

UDP because a lost packet costs one interval of freshness, never
correctness: the next packet carries the full current state again.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

from .packet import encode_packet
from .records import ConnectionRecord, PacketHeader
from .server import parse_address

log = logging.getLogger("spoa.publisher")


class Publisher:
    def __init__(self, targets: Sequence[str], key: bytes, mtu: int) -> None:
        self.key = key
        self.mtu = mtu
        self.targets = []
        self._sockets: dict[int, socket.socket] = {}
        for target in targets:
            host, port = parse_address(target)
            info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
            family, address = info[0], info[4]
            if family not in self._sockets:
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sockets[family] = sock
            self.targets.append((family, address))
        self.datagrams_sent = 0
        self.bytes_sent = 0
        self.send_errors = 0

    def send(self, header: PacketHeader, records: Sequence[ConnectionRecord]) -> None:
        datagrams = encode_packet(header, records, self.key, self.mtu)
        for family, address in self.targets:
            sock = self._sockets[family]
            for datagram in datagrams:
                try:
                    sock.sendto(datagram, address)
                except OSError as exc:  # full buffer, unreachable: the next interval resends state
                    self.send_errors += 1
                    log.debug("send to %s failed: %s", address, exc)
                else:
                    self.datagrams_sent += 1
                    self.bytes_sent += len(datagram)

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
