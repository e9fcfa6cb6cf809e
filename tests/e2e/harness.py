"""Real processes on loopback for the end-to-end tests: HAProxy, the agent, an app.

Everything binds 127.0.0.1 on free ports and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml

from spoa.testing import free_port, http_get, scrape_metrics, wait_port, wait_until  # noqa: F401 - re-exported to the tests
from spoa.tools.demo.loadgen import HttpConn, parse_lease
from spoa.tools.provision import HAProxyBinary

REPO = Path(__file__).resolve().parents[2]
HAPROXY_DIR = REPO / "haproxy"


class SpoaProcess:
    """`python -m spoa COMMAND` as a subprocess, as an operator runs it."""

    command = ""

    def __init__(self, tmp: Path, port: int | None = None, config: dict | None = None) -> None:
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.log_path = tmp / f"{self.command}-{self.port}.log"
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = tmp / f"{self.command}-{self.port}.yaml"
            self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    def start(self):
        log = open(self.log_path, "ab")
        args = [sys.executable, "-m", "spoa", self.command, "--listen", f"127.0.0.1:{self.port}",
                "--metrics", f"127.0.0.1:{self.metrics_port}"]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        log.close()
        if self.command == "agent":  # the LB node listens on UDP: its metrics port says it is up
            wait_port(self.port, proc=self.proc)
        wait_port(self.metrics_port, proc=self.proc)
        return self

    def metrics(self) -> dict[str, float]:
        """Prometheus text -> {"name{labels}": value}."""
        return scrape_metrics(self.metrics_port)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
                raise
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class AgentProcess(SpoaProcess):
    command = "agent"


class LbNodeProcess(SpoaProcess):
    command = "lbnode"


class _AppHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        url = urlsplit(self.path)
        if url.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            self._tunnel()
            return
        if url.path == "/stream":
            query = parse_qs(url.query)
            self._stream(int(query["bytes"][0]), int(query.get("rate", ["0"])[0]))
            return
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _tunnel(self) -> None:
        """A WebSocket-like upgrade: 101, then the connection echoes raw bytes until EOF."""
        self.send_response(101, "Switching Protocols")
        self.send_header("Connection", "Upgrade")
        self.send_header("Upgrade", "websocket")
        key = self.headers.get("Sec-WebSocket-Key")
        if key:  # HAProxy answers 502 to a 101 whose accept does not match (RFC 6455 4.2.2)
            accept = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
            self.send_header("Sec-WebSocket-Accept", base64.b64encode(accept).decode())
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        try:
            while data := self.connection.recv(65536):
                self.connection.sendall(data)
        except OSError:
            pass

    def _stream(self, size: int, rate: int) -> None:
        """`size` bytes at `rate` bytes/s (0: as fast as possible)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        chunk = b"x" * 65536
        started = time.monotonic()
        sent = 0
        while sent < size:
            n = min(len(chunk), size - sent)
            self.wfile.write(chunk[:n])
            sent += n
            if rate:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)

    def log_message(self, *args) -> None:
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionResetError:
            pass  # HAProxy dropping an idle server connection


class _ThreadingServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the default 5 drops SYNs under 200 clients


class AppServer:
    """The application behind HAProxy: a tiny keep-alive HTTP server in a thread."""

    def __init__(self) -> None:
        self.server = _ThreadingServer(("127.0.0.1", 0), _AppHandler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> AppServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TcpEchoServer:
    """The TCP application behind the TCP frontend: echoes what it reads."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def stop(self) -> None:
        self.sock.close()


class HAProxyProcess:
    """HAProxy in the foreground (-db) with haproxy/example.cfg, example-tcp.cfg and agents.cfg."""

    def __init__(self, binary: HAProxyBinary, tmp: Path, agent_port: int, app_port: int,
                 tcp_app_port: int = 9, extra: tuple[Path, ...] = (), env: dict[str, str] | None = None) -> None:
        """`extra`: more configuration files loaded after the include (a test's
        own frontends), `env`: the variables they use."""
        self.binary = binary
        self.extra = tuple(extra)
        self.http_port = free_port()
        self.tcp_port = free_port()
        self.run_dir = tmp
        self.log_path = tmp / f"haproxy-{binary.line}-{self.http_port}.log"
        self.env = binary.run_env()
        self.env.update(
            SPOA_LEASE_DIR=str(HAPROXY_DIR),
            SPOA_LEASE_HTTP=f"127.0.0.1:{self.http_port}",
            SPOA_LEASE_APP=f"127.0.0.1:{app_port}",
            SPOA_LEASE_RUN=str(tmp),
            SPOA_LEASE_AGENT=f"127.0.0.1:{agent_port}",
            SPOA_LEASE_TCP=f"127.0.0.1:{self.tcp_port}",
            SPOA_LEASE_TCP_APP=f"127.0.0.1:{tcp_app_port}",
        )
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None

    def args(self, *extra: str) -> list[str]:
        files = [HAPROXY_DIR / name for name in ("example.cfg", "example-tcp.cfg", "agents.cfg")] + list(self.extra)
        return self.binary.command(*extra, *(arg for path in files for arg in ("-f", str(path))))

    def check(self) -> subprocess.CompletedProcess:
        return subprocess.run(self.args("-c"), env=self.env, capture_output=True, text=True, timeout=30)

    def start(self) -> HAProxyProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args("-db"), env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_port(self.http_port, proc=self.proc)
        return self

    def cli(self, command: str) -> str:
        """One command on the stats socket."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.run_dir / "haproxy.sock"))
            s.sendall(command.encode() + b"\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.decode()

    def server_check(self, backend: str, server: str) -> dict[str, str]:
        """`show stat` row of one server as {column: value}."""
        lines = self.cli("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == backend and row.get("svname") == server:
                return row
        raise KeyError(f"{backend}/{server} not in show stat")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)  # soft stop
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


_LEASE = re.compile(r"duration=(\d+);source=(\w+);seq=(\d+)")


def parse_lease_header(value: str | None) -> tuple[int, str, int] | None:
    """X-Lease "duration=30000;source=standard;seq=7" -> (30000, "standard", 7)."""
    m = _LEASE.fullmatch(value or "")
    return (int(m[1]), m[2], int(m[3])) if m else None



async def request_round(conns: list[HttpConn]) -> tuple[Counter, Counter]:
    """One request on every keep-alive connection, all at once: (lease sources seen in X-Lease, statuses)."""
    sources, statuses = Counter(), Counter()

    async def one(conn: HttpConn) -> None:
        status, headers, _ = await conn.request("/")
        statuses[status] += 1
        lease = parse_lease(headers.get("x-lease"))
        sources[lease[1] if lease else "none"] += 1

    await asyncio.gather(*(one(conn) for conn in conns))
    return sources, statuses
