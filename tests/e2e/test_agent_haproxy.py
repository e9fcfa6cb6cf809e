"""The agent behind a real HAProxy 2.6, 2.8 and 3.2 on loopback."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time

from .conftest import Stack
from .harness import AgentProcess, http_get, parse_lease_header, wait_until


def test_config_include_validates(stack):
    result = stack.haproxy.check()
    assert result.returncode == 0, result.stdout + result.stderr


def test_response_carries_the_variables_the_agent_set(stack):
    seqs = []
    for _ in range(5):
        status, headers = http_get(stack.haproxy.http_port)
        assert status == 200
        lease = parse_lease_header(headers.get("x-lease"))
        assert lease is not None, headers
        assert lease[:2] == (30000, "standard")
        assert "x-lease-error" not in headers
        seqs.append(lease[2])
    # A fresh number each time: the value is the agent's answer, not a constant.
    assert seqs == sorted(set(seqs)) and len(seqs) == 5
    log = stack.haproxy.log()
    assert "lease=30000 source=standard err=-" in log


def test_spop_health_check_passes(stack):
    row = wait_until(
        lambda: (r := stack.haproxy.server_check("spoa-lease-agents", "agent1"))["check_status"] == "L7OK" and r,
        timeout=10, what="agent1 check L7OK",
    )
    assert row["status"] == "UP"
    assert stack.agent.metrics()["spoa_agent_healthchecks_total"] >= 1


async def _keepalive_client(port: int, requests: int, results: list, start: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await start.wait()
    try:
        for _ in range(requests):
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            await reader.readexactly(int(headers["content-length"]))
            results.append((lines[0].split(" ")[1], headers.get("x-lease")))
    finally:
        writer.close()


def test_200_concurrent_keepalive_clients_are_all_answered(stack):
    before = stack.agent.metrics()
    results: list = []

    async def run():
        start = asyncio.Event()
        tasks = [asyncio.create_task(_keepalive_client(stack.haproxy.http_port, 3, results, start)) for _ in range(200)]
        await asyncio.sleep(0.2)  # all connected, then fire together
        start.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)

    asyncio.run(run())
    assert len(results) == 600
    assert all(status == "200" for status, _ in results)
    leases = [parse_lease_header(v) for _, v in results]
    assert all(lease is not None and lease[1] == "standard" for lease in leases), results[:5]
    after = stack.agent.metrics()
    assert after["spoa_agent_acks_total"] - before["spoa_agent_acks_total"] >= 600
    # HAProxy really pipelined: several NOTIFYs outstanding on one connection.
    assert after["spoa_agent_max_pipeline_depth"] > 1


def test_agent_killed_under_load_then_restarted(own_stack):
    port = own_stack.haproxy.http_port
    outcomes: list[tuple[float, int, str | None, str | None]] = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            status, headers = http_get(port, timeout=5)
            outcomes.append((time.monotonic(), status, headers.get("x-lease"), headers.get("x-lease-error")))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(outcomes) > 50, timeout=10, what="load running")
        own_stack.agent.kill()
        killed_at = time.monotonic()
        # Requests go on, flagged by set-on-error instead of a lease.
        wait_until(lambda: any(t > killed_at and err for t, _, _, err in outcomes), timeout=15,
                   what="set-on-error variable after the kill")
        restarted = AgentProcess(own_stack.tmp, port=own_stack.agent.port).start()
        own_stack.agent = restarted
        restarted_at = time.monotonic()
        wait_until(lambda: any(t > restarted_at and parse_lease_header(lease) and not err
                               for t, _, lease, err in outcomes[-20:]),
                   timeout=20, what="leases again after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert outcomes and all(status == 200 for _, status, _, _ in outcomes), "a client saw an error"
    during = [(lease, err) for t, _, lease, err in outcomes if killed_at < t < restarted_at]
    assert during and any(err for _, err in during)


def test_agent_closing_idle_connections_costs_haproxy_nothing(haproxy_binary, app_server, tmp_path):
    """The agent closes SPOP connections idle past agent.idle_timeout (here 1 s,
    far below HAProxy's own idle timeouts): HAProxy must open new ones for the
    next requests with no error and no lost lease answer, on every line."""
    stack = Stack(haproxy_binary, tmp_path, app_server, agent_config={"agent": {"idle_timeout": 1}})
    try:
        for _ in range(3):
            for _ in range(10):
                status, headers = http_get(stack.haproxy.http_port)
                assert status == 200 and "x-lease-error" not in headers, headers
                assert parse_lease_header(headers.get("x-lease")) is not None, headers
            time.sleep(2.5)  # idle: the agent closes HAProxy's connections
        metrics = stack.agent.metrics()
        assert metrics["spoa_agent_idle_timeouts_total"] >= 2
        assert sum(v for k, v in metrics.items() if k.startswith("spoa_agent_protocol_errors_total")) == 0
    finally:
        stack.stop()


def test_agent_stops_cleanly_under_haproxy(own_stack):
    http_get(own_stack.haproxy.http_port)
    own_stack.agent.proc.send_signal(signal.SIGTERM)
    assert own_stack.agent.proc.wait(timeout=15) == 0
    assert "Traceback" not in own_stack.agent.log()


def test_tcp_frontend_routes_by_lease_class(stack):
    """TCP mode has no set-timeout: the lease class picks the backend's timeouts."""
    before = stack.agent.metrics()["spoa_lease_registrations_total"]
    with socket.create_connection(("127.0.0.1", stack.haproxy.tcp_port), timeout=5) as sock:
        sock.sendall(b"ping over tcp")
        assert sock.recv(100) == b"ping over tcp"
    # the standard lease (30 s) is in the "short" class (<= 60 s by default)
    wait_until(lambda: "fe_tcp be_tcp_short/app1" in stack.haproxy.log(), timeout=5, what="tcp log line")
    assert stack.agent.metrics()["spoa_lease_registrations_total"] > before
