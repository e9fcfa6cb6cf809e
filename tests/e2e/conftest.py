"""Fixtures for the end-to-end suite: a real HAProxy of each line, the agent, an app.

A line whose HAProxy cannot be provisioned makes its tests fail, not skip:
the e2e suite is the product's proof and CI must say when it did not run.
"""

from __future__ import annotations

import pytest

from spoa.tools import provision

from .harness import AgentProcess, AppServer, HAProxyProcess, TcpEchoServer


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session", params=provision.LINES, ids=lambda line: f"haproxy-{line}")
def haproxy_binary(request):
    return provision.ensure(request.param)


@pytest.fixture(scope="session")
def app_server():
    app = AppServer().start()
    app.echo = TcpEchoServer()
    yield app
    app.echo.stop()
    app.stop()


class Stack:
    """Agent + HAProxy (+ the shared app) for one HAProxy line."""

    def __init__(self, binary, tmp, app, agent_config=None):
        self.binary = binary
        self.tmp = tmp
        self.app = app
        self.agent = AgentProcess(tmp, config=agent_config).start()
        self.haproxy = HAProxyProcess(binary, tmp, self.agent.port, app.port, app.echo.port).start()

    def stop(self):
        self.haproxy.stop()
        self.agent.stop()


@pytest.fixture(scope="module")
def stack(haproxy_binary, app_server, tmp_path_factory):
    """Shared by the read-only tests of a module; tests that kill things build their own."""
    s = Stack(haproxy_binary, tmp_path_factory.mktemp(f"stack-{haproxy_binary.line}"), app_server)
    yield s
    s.stop()


@pytest.fixture
def own_stack(haproxy_binary, app_server, tmp_path):
    s = Stack(haproxy_binary, tmp_path, app_server)
    yield s
    s.stop()
