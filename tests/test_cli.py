"""`python -m spoa agent` as an operator runs it: a subprocess on loopback."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from spoa.spop.constants import FrameType, Scope
from spoa.testing import SpopClient, build_notify

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
TIMEOUT = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spoa", *args], capture_output=True, text=True,
                          cwd=REPO, env=ENV, timeout=timeout)


class Agent:
    """The agent subprocess; stderr goes to a file that tests can read."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.log_path = tmp_path / f"agent-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "spoa", "agent", *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=REPO, env=ENV)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 10) -> None:
        """Until the 'ready' line is logged (the signal handlers are installed by then)."""
        deadline = time.monotonic() + timeout
        while "ready on" not in self.log():
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"agent not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.02)

    def terminate(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


@pytest.fixture
def start_agent(tmp_path):
    started: list[Agent] = []

    def start(*args: str) -> Agent:
        agent = Agent(tmp_path, *args)
        started.append(agent)
        agent.wait_ready()
        return agent

    yield start
    for agent in started:
        agent.close()


def _socket_path(tmp_path: Path) -> Path:
    """A unix socket path that fits sun_path (108 bytes), under tmp_path when it can."""
    path = tmp_path / "spoa.sock"
    if len(str(path)) < 100:
        return path
    return Path(tempfile.mkdtemp(prefix="spoa-", dir="/tmp")) / "spoa.sock"


def _lease_session(client: SpopClient, sid: int) -> list[tuple]:
    return client.notify(sid, 1, [("lease-session", [("src", "192.0.2.1")])])


def test_help():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "agent" in result.stdout
    result = run_cli("agent", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--listen", "--config", "--metrics", "--log-level"):
        assert option in result.stdout


def test_runs_without_config_answers_and_exports_metrics(start_agent):
    port, mport = free_port(), free_port()
    agent = start_agent("--listen", f"127.0.0.1:{port}", "--metrics", f"127.0.0.1:{mport}")
    with SpopClient(timeout=TIMEOUT).connect(f"127.0.0.1:{port}") as client:
        hello = client.hello()
        assert hello["version"] == "2.0" and hello["max-frame-size"] == 16380
        sess, txn = int(Scope.SESS), int(Scope.TXN)
        assert ("set-var", sess, "duration_ms", 30000) in _lease_session(client, 1)  # the standard lease
        assert client.notify(3, 1, [("something-else", [])]) == [("unset-var", txn, "noop")]
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=TIMEOUT) as resp:
        text = resp.read().decode()
    acks = re.search(r"^spoa_agent_acks_total (\S+)$", text, re.M)
    assert acks and float(acks.group(1)) >= 2, text
    assert re.search(r"^spoa_agent_unknown_messages_total 1\.0$", text, re.M)
    assert agent.terminate() == 0


def test_sigterm_exits_0_and_disconnects_open_connections(start_agent):
    port = free_port()
    agent = start_agent("--listen", f"127.0.0.1:{port}")
    client = SpopClient(timeout=TIMEOUT).connect(f"127.0.0.1:{port}")
    client.hello()
    assert _lease_session(client, 1)
    started = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    frame = client.read_frame()
    assert frame is not None and frame.type == FrameType.AGENT_DISCONNECT
    assert frame.kv()["status-code"] == 0
    client.expect_close()
    client.close()
    assert agent.proc.wait(10) == 0
    assert time.monotonic() - started < 5  # the default shutdown_grace
    assert "Traceback" not in agent.log()


def test_sigterm_with_peers_that_never_read(start_agent, tmp_path):
    """ACKs piling up unread (and idle peers) must not hold the exit beyond shutdown_grace."""
    config = tmp_path / "agent.yaml"
    config.write_text("agent:\n  shutdown_grace: 1\n")
    port = free_port()
    agent = start_agent("--config", str(config), "--listen", f"127.0.0.1:{port}")
    idle = [SpopClient(timeout=TIMEOUT).connect(f"127.0.0.1:{port}") for _ in range(3)]
    stuck = SpopClient(timeout=TIMEOUT).connect(f"127.0.0.1:{port}")
    stuck.hello(max_frame_size=65532)
    # NOTIFYs of 400 messages: each ACK is ~3x its NOTIFY; never read them.
    notify = b"".join(build_notify(2 * i + 1, 1, [("lease-session", [])] * 400) for i in range(20))
    stuck.sock.setblocking(False)
    sent, deadline = 0, time.monotonic() + 3
    while sent < 16 << 20 and time.monotonic() < deadline:
        try:
            sent += stuck.sock.send(notify)
        except BlockingIOError:
            break  # the agent stopped reading: its write buffer is full
    stuck.sock.setblocking(True)
    time.sleep(0.2)
    started = time.monotonic()
    assert agent.terminate() == 0
    print(f"sent {sent} bytes; exit after {time.monotonic() - started:.2f}s")
    assert time.monotonic() - started < 4
    for c in idle + [stuck]:
        c.close()


def test_unix_socket_listen_replaces_a_stale_socket(start_agent, tmp_path):
    path = _socket_path(tmp_path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a killed agent leaves its socket file behind
    stale.close()
    assert path.is_socket()
    agent = start_agent("--listen", f"unix:{path}")
    with SpopClient(timeout=TIMEOUT).connect(f"unix:{path}") as client:
        client.hello()
        assert _lease_session(client, 1)
    assert agent.terminate() == 0


def test_unix_socket_in_use_is_not_taken_over(start_agent, tmp_path):
    path = _socket_path(tmp_path)
    first = start_agent("--listen", f"unix:{path}")
    second = run_cli("agent", "--listen", f"unix:{path}")
    assert second.returncode != 0
    assert "in use" in second.stderr
    with SpopClient(timeout=TIMEOUT).connect(f"unix:{path}") as client:  # the first agent keeps it
        client.hello()
    assert first.terminate() == 0


@pytest.mark.parametrize("kind", ["regular-file", "in-use"])
def test_unusable_unix_socket_path_fails_with_a_one_line_error(start_agent, tmp_path, kind):
    path = _socket_path(tmp_path)
    if kind == "regular-file":
        path.write_text("data")
    else:
        start_agent("--listen", f"unix:{path}")
    result = run_cli("agent", "--listen", f"unix:{path}")
    assert result.returncode in (1, 2)
    assert ("not a socket" if kind == "regular-file" else "in use") in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    if kind == "regular-file":
        assert path.read_text() == "data"


@pytest.mark.parametrize("command", ["agent", "lbnode"])
@pytest.mark.parametrize("where", ["listen", "metrics"])
def test_address_in_use_is_a_config_error_naming_the_key(tmp_path, command, where):
    key = tmp_path / "k.key"
    key.write_bytes(b"k" * 32)
    kind = socket.SOCK_DGRAM if (command, where) == ("lbnode", "listen") else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as busy:
        busy.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            busy.listen()
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        args = ["--listen", taken] if where == "listen" else ["--listen", "127.0.0.1:0", "--metrics", taken]
        result = run_cli(command, *args, *(["--key-file", str(key)] if command == "lbnode" else []))
    assert result.returncode == 2, result.stderr
    expected = f"{command}.listen" if where == "listen" else "metrics.listen"
    assert result.stderr.splitlines()[-1].startswith(f"spoa-lease: config error: {expected}: {taken}: "), \
        result.stderr
    assert "in use" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("address", ["192.0.2.1:12345", "300.1.1.1:12345"])
def test_listen_address_not_on_this_host_is_a_config_error(address):
    result = run_cli("agent", "--listen", address)
    assert result.returncode == 2 and result.stderr.startswith(f"spoa-lease: config error: agent.listen: {address}: ")
    assert "Traceback" not in result.stderr


# (id, YAML text or None, extra CLI args, text the error must contain). The
# first group runs as real subprocesses (all at once); the rest, variations of
# the same code path, call cli.main() in-process to keep the suite fast.
SUBPROCESS_MISTAKES = [
    ("unknown-key", "agent: {max_frame_sise: 1}\n", [], "agent.max_frame_sise: unknown key"),
    ("wrong-type", 'agent: {max_frame_size: "big"}\n', [], "agent.max_frame_size: must be an integer"),
    ("out-of-range", "agent: {max_frame_size: 10}\n", [], "agent.max_frame_size: 10 is out of range"),
    ("unknown-section", "agnet: {max_frame_size: 1024}\n", [], "agnet: unknown section"),
    ("cli-bad-address", None, ["--listen", "nohost"], "agent.listen"),
    ("missing-file", "<missing>", [], "cannot read config file"),
    ("invalid-yaml", "agent: [\n", [], "not valid YAML"),
]
INPROCESS_MISTAKES = [
    ("bool-as-int", "agent: {max_frame_size: true}\n", [], "agent.max_frame_size: must be an integer"),
    ("below-minimum", "agent: {hello_timeout: 0}\n", [], "agent.hello_timeout"),
    ("bad-address-in-file", "agent: {listen: [nohost]}\n", [], "agent.listen[0]"),
    ("empty-list", "agent: {listen: []}\n", [], "agent.listen: must not be empty"),
    ("metrics-on-unix", "metrics: {listen: unix:/tmp/m.sock}\n", [], "metrics.listen"),
    ("bad-choice", "log: {level: loud}\n", [], "log.level"),
    ("not-a-mapping", "- agent\n", [], "top level must be a mapping"),
    ("section-not-mapping", "agent: 3\n", [], "agent: must be a mapping"),
    ("cli-port-out-of-range", None, ["--listen", "127.0.0.1:99999"], "agent.listen"),
    ("cli-empty-unix-path", None, ["--listen", "unix:"], "agent.listen"),
    ("cli-metrics-without-port", None, ["--metrics", "localhost"], "metrics.listen"),
    ("file-is-a-directory", "<directory>", [], "cannot read config file"),
    ("missing-key-file", 'publish: {lb_nodes: ["127.0.0.1:9400"], key_file: /nonexistent/lease.key}\n', [],
     "publish.key_file: cannot read key file /nonexistent/lease.key"),
    ("publish-without-key", 'publish: {lb_nodes: ["127.0.0.1:9400"]}\n', [], "publish.key_file: required"),
    ("lease-bounds", "lease: {min_ms: 5000, standard_ms: 1000}\n", [], "lease.standard_ms: must lie between"),
    ("segments-over-mtu", "tracker: {max_segments_per_connection: 100}\n", [],
     "tracker.max_segments_per_connection: 100 segments do not fit"),
    # NaN compares false with every bound: each once passed, then hung or broke the agent
    ("nan-hello-timeout", "agent: {hello_timeout: .nan}\n", [], "agent.hello_timeout: must be a finite number"),
    ("nan-refresh", "lease: {refresh_fraction: .nan}\n", [], "lease.refresh_fraction: must be a finite number"),
    ("inf-grace", "agent: {shutdown_grace: .inf}\n", [], "agent.shutdown_grace: must be a finite number"),
    ("more-than-memory", "tracker: {max_connections: 1099511627776}\n", [],
     "tracker.max_connections: tracked connections and segments at the configured limits need about"),
]


def _mistake_command(tmp: Path, case_id: str, text: str | None, args: list[str]) -> tuple[list[str], Path]:
    path = tmp / f"{case_id}.yaml"
    if text == "<directory>":
        path.mkdir()
    elif text is not None and text != "<missing>":
        path.write_text(text)
    cmd = ["agent"] + (["--config", str(path)] if text is not None else [])
    if "--listen" not in args:
        cmd += ["--listen", "127.0.0.1:0"]
    return cmd + args, path


def _check_mistake(case_id: str, needle: str, returncode: int, stderr: str, path: Path) -> None:
    assert returncode == 2, (returncode, stderr)
    assert needle in stderr, stderr
    assert stderr.startswith("spoa-lease: config error: ") and "Traceback" not in stderr, stderr
    if case_id in ("missing-file", "file-is-a-directory"):
        assert str(path) in stderr


@pytest.fixture(scope="module")
def mistake_results(tmp_path_factory):
    """Run every SUBPROCESS_MISTAKES case at once: id -> (returncode, stderr, seconds, config path)."""
    tmp = tmp_path_factory.mktemp("config-mistakes")
    procs = {}
    for case_id, text, args, _ in SUBPROCESS_MISTAKES:
        cmd, path = _mistake_command(tmp, case_id, text, args)
        proc = subprocess.Popen([sys.executable, "-m", "spoa", *cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV)
        procs[case_id] = (proc, time.monotonic(), path)
    results = {}
    for case_id, (proc, started, path) in procs.items():
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        results[case_id] = (proc.returncode, err, time.monotonic() - started, path)
    return results


@pytest.mark.parametrize("case_id, needle", [(c[0], c[3]) for c in SUBPROCESS_MISTAKES],
                         ids=[c[0] for c in SUBPROCESS_MISTAKES])
def test_config_mistakes_fail_fast_naming_the_key(mistake_results, case_id, needle):
    returncode, stderr, seconds, path = mistake_results[case_id]
    _check_mistake(case_id, needle, returncode, stderr, path)
    assert seconds < 15  # fails at once: it never starts serving


@pytest.mark.parametrize("case_id, text, args, needle", INPROCESS_MISTAKES, ids=[c[0] for c in INPROCESS_MISTAKES])
def test_more_config_mistakes(tmp_path, capsys, monkeypatch, case_id, text, args, needle):
    from spoa import cli

    async def must_not_serve(config):
        raise AssertionError(f"config accepted: {config}")

    monkeypatch.setattr(cli, "serve_agent", must_not_serve)
    monkeypatch.setattr(cli.logs, "setup", lambda *a, **k: None)
    cmd, path = _mistake_command(tmp_path, case_id, text, args)
    returncode = cli.main(cmd)
    _check_mistake(case_id, needle, returncode, capsys.readouterr().err, path)


def test_empty_config_file_means_defaults(start_agent, tmp_path):
    config = tmp_path / "empty.yaml"
    config.write_text("")
    port = free_port()
    agent = start_agent("--config", str(config), "--listen", f"127.0.0.1:{port}")
    with SpopClient(timeout=TIMEOUT).connect(f"127.0.0.1:{port}") as client:
        assert client.hello(max_frame_size=65532)["max-frame-size"] == 65532
    assert agent.terminate() == 0


def test_config_values_reach_the_agent(start_agent, tmp_path):
    port = free_port()
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"agent:\n  listen: ['127.0.0.1:{port}']\n  max_frame_size: 4096\n  accept_fragments: false\n"
        "  allow_async: false\nlease:\n  standard_ms: 1234\nlog:\n  format: json\n"
    )
    agent = start_agent("--config", str(config))
    with SpopClient(timeout=TIMEOUT).connect(f"127.0.0.1:{port}") as client:
        hello = client.hello()
        assert hello["max-frame-size"] == 4096 and hello["capabilities"] == "pipelining"
        assert _lease_session(client, 1)[0] == ("set-var", int(Scope.SESS), "duration_ms", 1234)
    assert agent.terminate() == 0
    assert '"level": "info"' in agent.log()  # JSON log lines


@pytest.mark.parametrize("text, needle", [
    ("lbnode: {interval_ms: 1000}\n", "lbnode.key_file: required"),
    ("lbnode: {key_file: /nonexistent/lease.key}\n", "lbnode.key_file: cannot read key file"),
    ("lease: {policy: psychic}\n", "lease.policy"),
    ("forecast: {arima_order: [1, 3, 0]}\n", "forecast.arima_order"),
    ("lease: {safety: .nan}\n", "lease.safety: must be a finite number"),
    ("anomaly: {quantile: .nan}\n", "anomaly.quantile: must be a finite number"),
    ("lease: {resource_utilization_threshold: .inf}\n", "lease.resource_utilization_threshold: must be a finite"),
    # in range, but more than this machine could ever allocate (a numpy MemoryError traceback once)
    ("lbnode: {max_connections: 4294967296}\n", "lbnode.max_connections: LB-node state at the configured limits"),
    ("{lbnode: {max_connections: 100000000}, forecast: {history: 10000}}\n", "forecast.history: LB-node state at the configured limits"),
])
def test_lbnode_config_mistakes_fail_fast(tmp_path, capsys, text, needle):
    from spoa import cli

    path = tmp_path / "lbnode.yaml"
    path.write_text(text)
    args = ["lbnode", "--config", str(path)]
    if "key_file" not in needle:  # a good key, so that the mistake under test is the one reported
        key = tmp_path / "good.key"
        key.write_bytes(b"k" * 32)
        args += ["--key-file", str(key)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("spoa-lease: config error: ") and needle in err, err


def test_short_key_file_is_refused(tmp_path, capsys):
    from spoa import cli

    key = tmp_path / "short.key"
    key.write_bytes(b"tooshort")
    assert cli.main(["lbnode", "--key-file", str(key)]) == 2
    assert "at least 16 are needed" in capsys.readouterr().err


def test_sighup_reloads_lease_settings_and_refuses_a_bad_file(start_agent, tmp_path):
    port = free_port()
    config = tmp_path / "agent.yaml"
    config.write_text("lease: {standard_ms: 30000}\n")
    agent = start_agent("--listen", f"127.0.0.1:{port}", "--config", str(config))
    sess = int(Scope.SESS)
    with SpopClient(timeout=TIMEOUT).connect(f"127.0.0.1:{port}") as client:
        client.hello()
        assert ("set-var", sess, "duration_ms", 30000) in _lease_session(client, 1)
        config.write_text("lease: {standard_ms: 45000}\ntracker: {idle_ms: 9000}\n")
        agent.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + TIMEOUT
        while "configuration reloaded" not in agent.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "after a restart only: tracker.idle_ms" in agent.log()
        assert ("set-var", sess, "duration_ms", 45000) in _lease_session(client, 3)  # same connection
        config.write_text("lease: {standard_ms: -1}\n")
        agent.proc.send_signal(signal.SIGHUP)
        while "reload refused" not in agent.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "lease.standard_ms: -1 is out of range" in agent.log()
        assert ("set-var", sess, "duration_ms", 45000) in _lease_session(client, 5)  # unchanged, still serving
    assert agent.terminate() == 0


def test_haproxy_include_writes_the_shipped_files(tmp_path, capsys):
    from spoa import cli

    target = tmp_path / "include"
    assert cli.main(["haproxy-include", str(target)]) == 0
    out = capsys.readouterr().out
    shipped = Path(__file__).resolve().parents[1] / "haproxy"
    for name in ("spoe-lease.conf", "agents.cfg", "example.cfg", "example-tcp.cfg"):
        assert (target / name).read_bytes() == (shipped / name).read_bytes()
        assert f"wrote {target / name}" in out
    assert f"-f {target}/agents.cfg" in out and f"SPOA_LEASE_DIR={target}" in out


def test_haproxy_include_into_a_file_is_a_clear_error(tmp_path, capsys):
    from spoa import cli

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["haproxy-include", str(blocker)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"spoa-lease: haproxy-include: {blocker}:") and "Traceback" not in err


def test_provision_command_takes_lines(monkeypatch):
    from spoa import cli
    from spoa.tools import provision

    seen = []
    monkeypatch.setattr(provision, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["provision", "2.6", "3.2"]) == 0
    assert cli.main(["provision"]) == 0
    assert seen == [["--lines", "2.6,3.2"], []]
    assert cli.main(["provision", "1.8"]) == 2 and len(seen) == 2


def test_free_port_never_hands_out_a_port_twice(monkeypatch):
    """Two HAProxy frontends once got the same port (SO_REUSEPORT shared it
    silently, and the outage test's clients landed on the TCP frontend)."""
    import spoa.testing as testing

    kernel_picks = iter([47001, 47001, 47002])  # the kernel offering a port again

    class Socket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            self.port = next(kernel_picks)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(testing, "_GIVEN_PORTS", set())
    monkeypatch.setattr(testing.socket, "socket", Socket)
    assert [testing.free_port(), testing.free_port()] == [47001, 47002]
