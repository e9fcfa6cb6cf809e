"""An agent outage must cost HAProxy's clients (almost) nothing, on 2.6, 2.8 and 3.2.

The lease is advice (`option continue-on-error`), so while the agent is down
requests must go on at the rate they would without SPOE. Before the include
failed fast, every request waited `timeout processing` (500 ms): at 32
keep-alive clients 64 req/s instead of thousands, for the whole outage on 2.6
(it keeps trying an agent its health check marked DOWN), on 2.8 until the
health check marked it DOWN (~5 s) and on 3.2 for ~2 s (a refused connect was
retried after HAProxy's 1 s turn-around).

Measured on twin frontends loaded next to the include, both answering from
example.cfg's be_static: one runs the "lease" engine of spoe-lease.conf on every
request, the other does not. One client loop drives both at once with the same
number of keep-alive connections, so machine noise (2 cores, other test runs)
hits both alike: per second of the outage the SPOE twin must serve at least half
of what the plain twin serves. Then the agent comes back and leases must too.
"""

from __future__ import annotations

import asyncio
import time

from .harness import AgentProcess, HAProxyProcess, free_port, wait_until

CLIENTS = 32  # per twin
BEFORE_S = 2.0  # agent up: leases must flow (the SPOE twin really asks the agent)
OUTAGE_S = 10.0  # agent SIGKILLed, not restarted
AFTER_S = 4.0  # agent restarted on the same port
MIN_RATIO = 0.5  # SPOE twin / plain twin, every second of the outage after the first
# The first second also holds the requests in flight when the agent died: each
# waits `timeout processing` (250 ms) once, up to a quarter of that second.
MIN_FIRST_RATIO = 0.25
MIN_OUTAGE_RATIO = 0.8  # over the whole outage (measured 93-94 %)
MAX_RECOVERY_S = 3.0  # agent listening again -> responses carry a lease again

TWINS = """
# Two frontends that differ only by SPOE (cf. benchmarks/haproxy-bench.cfg).
frontend fe_outage_spoe
    bind "${OUTAGE_SPOE}"
    http-request set-log-level silent
    tcp-request connection set-var(sess.cid) uuid
    filter spoe engine lease config "${SPOA_LEASE_DIR}/spoe-lease.conf"
    http-request send-spoe-group lease lease-http
    http-after-response set-header X-Lease "duration=%[var(sess.lease.duration_ms)];source=%[var(sess.lease.source)];seq=%[var(txn.lease.seq)]"
    default_backend be_static

frontend fe_outage_plain
    bind "${OUTAGE_PLAIN}"
    http-request set-log-level silent
    tcp-request connection set-var(sess.cid) uuid
    http-after-response set-header X-Lease "duration=%[var(sess.lease.duration_ms)];source=%[var(sess.lease.source)];seq=%[var(txn.lease.seq)]"
    default_backend be_static
"""

_REQUEST = b"GET / HTTP/1.1\r\nHost: outage\r\n\r\n"


async def _client(port: int, log: list, stop: asyncio.Event) -> None:
    """Requests back to back on one keep-alive connection: (time, status, leased)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while not stop.is_set():
            writer.write(_REQUEST)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            at = head.find(b"content-length: ")
            await reader.readexactly(int(head[at + 16:head.index(b"\r\n", at)]))
            # txn.lease.seq: this request's answer (sess.lease.* outlive it on a keep-alive connection)
            log.append((time.monotonic(), int(head[9:12]), b";seq=\r\n" not in head))
    finally:
        writer.close()


def _rate(log: list, start: float, end: float) -> float:
    return sum(1 for t, _, _ in log if start <= t < end) / (end - start)


def test_agent_outage_keeps_the_request_rate(haproxy_binary, app_server, tmp_path):
    twins = tmp_path / "twins.cfg"
    twins.write_text(TWINS)
    spoe_port, plain_port = free_port(), free_port()
    agent = AgentProcess(tmp_path).start()
    haproxy = HAProxyProcess(haproxy_binary, tmp_path, agent.port, app_server.port, extra=(twins,),
                             env={"OUTAGE_SPOE": f"127.0.0.1:{spoe_port}",
                                  "OUTAGE_PLAIN": f"127.0.0.1:{plain_port}"}).start()
    spoe: list = []
    plain: list = []
    marks: dict[str, float] = {}
    try:
        wait_until(lambda: haproxy.server_check("spoa-lease-agents", "agent1")["check_status"] == "L7OK",
                   timeout=10, what="agent1 check L7OK")

        async def drive() -> None:
            nonlocal agent
            stop = asyncio.Event()
            tasks = [asyncio.create_task(_client(port, log, stop))
                     for port, log in ((spoe_port, spoe), (plain_port, plain)) for _ in range(CLIENTS)]
            try:
                marks["start"] = time.monotonic()
                await asyncio.sleep(BEFORE_S)
                agent.kill()
                marks["killed"] = time.monotonic()
                await asyncio.sleep(OUTAGE_S)
                marks["spawned"] = time.monotonic()
                agent = await asyncio.to_thread(AgentProcess(tmp_path, port=agent.port).start)
                marks["restarted"] = time.monotonic()  # listening (start() waited for its ports)
                await asyncio.sleep(AFTER_S)
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), timeout=15)

        asyncio.run(drive())
    finally:
        haproxy.stop()
        agent.stop()

    start, killed, restarted = marks["start"], marks["killed"], marks["restarted"]
    # every request answered 2xx, agent or not
    assert spoe and plain and all(200 <= status < 300 for _, status, _ in spoe + plain)
    # with the agent up the SPOE twin got its leases: it really depends on the agent
    before = [leased for t, _, leased in spoe if start + 0.5 <= t < killed]
    assert before and sum(before) >= 0.99 * len(before)

    seconds = [(_rate(spoe, killed + i, killed + i + 1), _rate(plain, killed + i, killed + i + 1))
               for i in range(int(OUTAGE_S))]
    first_lease = next((t for t, _, leased in spoe if t >= marks["spawned"] and leased), None)
    print(f"\n{haproxy_binary.line}: agent up spoe {_rate(spoe, start + 0.5, killed):.0f}/s "
          f"plain {_rate(plain, start + 0.5, killed):.0f}/s; outage spoe {_rate(spoe, killed, restarted):.0f}/s "
          f"plain {_rate(plain, killed, restarted):.0f}/s; per second "
          + " ".join(f"{s:.0f}/{p:.0f}" for s, p in seconds)
          + (f"; first lease {first_lease - marks['spawned']:.2f} s after the agent was started, "
             f"{first_lease - restarted:+.2f} s from when it listened" if first_lease else ""))
    assert seconds[0][0] >= MIN_FIRST_RATIO * seconds[0][1], seconds
    assert all(s >= MIN_RATIO * p for s, p in seconds[1:]), seconds
    assert _rate(spoe, killed, restarted) >= MIN_OUTAGE_RATIO * _rate(plain, killed, restarted), seconds

    # the agent is back: leases are back, soon
    assert first_lease is not None and first_lease - restarted <= MAX_RECOVERY_S
    tail = [leased for t, _, leased in spoe if restarted + MAX_RECOVERY_S <= t]
    assert tail and sum(tail) >= 0.99 * len(tail)
