"""spoa.tools.provision: real HAProxy binaries of every supported line."""

from __future__ import annotations

import socket
import subprocess
import textwrap
from pathlib import Path

import pytest

from spoa.tools import provision
from spoa.tools.provision import LINES, HAProxyBinary, ProvisionError


@pytest.fixture(scope="module", params=LINES)
def binary(request: pytest.FixtureRequest) -> HAProxyBinary:
    return provision.ensure(request.param)


def _run(binary: HAProxyBinary, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(binary.command(*args), env=binary.run_env(), capture_output=True, text=True, timeout=30)


def _unused_port() -> int:
    # Port 0 in a bind line is not accepted by every HAProxy version.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_binary_reports_its_line(binary: HAProxyBinary) -> None:
    result = _run(binary, "-vv")

    assert result.returncode == 0, result.stderr
    assert binary.version.startswith(binary.line + ".")
    assert f"HAProxy version {binary.version}" in result.stdout


def test_binary_validates_a_config(binary: HAProxyBinary, tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        textwrap.dedent(f"""\
        defaults
            mode http
            timeout connect 1s
            timeout client 5s
            timeout server 5s

        frontend web
            bind 127.0.0.1:{_unused_port()}
            default_backend app

        backend app
            server app1 127.0.0.1:{_unused_port()}
        """)
    )

    result = _run(binary, "-c", "-f", str(cfg))

    # 3.x says nothing on success, so the exit code is the verdict.
    assert result.returncode == 0, result.stdout + result.stderr


def test_binary_rejects_a_broken_config(binary: HAProxyBinary, tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text("frontend web\n    no-such-keyword\n")

    result = _run(binary, "-c", "-f", str(cfg))

    assert result.returncode != 0
    assert "no-such-keyword" in result.stderr


def test_ensure_is_idempotent(binary: HAProxyBinary) -> None:
    assert provision.ensure(binary.line) == binary
    assert provision.find(binary.line) == binary


def _fake_haproxy(tmp_path: Path, version: str) -> Path:
    script = tmp_path / "haproxy"
    script.write_text(f"#!/bin/sh\necho 'HAProxy version {version} 2025/01/01 - https://haproxy.org/'\n")
    script.chmod(0o755)
    return script


def test_find_uses_the_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = _fake_haproxy(tmp_path, "3.2.99-fake")
    monkeypatch.setenv("SPOA_HAPROXY_3_2", str(script))

    found = provision.find("3.2")

    assert found == HAProxyBinary(line="3.2", version="3.2.99-fake", argv=(str(script),), env={})


@pytest.mark.parametrize("version", ["2.8.25", "2.60.1", "9.9.9"])
def test_find_rejects_an_override_of_another_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    monkeypatch.setenv("SPOA_HAPROXY_2_6", str(_fake_haproxy(tmp_path, version)))

    assert provision.find("2.6") is None
    # The operator's choice stands: ensure() must not install something else.
    with pytest.raises(ProvisionError, match="not 2.6"):
        provision.ensure("2.6")


def test_unknown_line_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown HAProxy line"):
        provision.find("1.8")


def test_cache_dir_honours_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOA_HAPROXY_CACHE", str(tmp_path))

    assert provision.cache_dir() == tmp_path


def test_debian_archive_is_read_from_deb822_sources(tmp_path: Path) -> None:
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "debian.sources").write_text(
        textwrap.dedent("""\
        Types: deb
        # a comment
        URIs: http://mirror.example/debian-security
        Suites: bookworm-security
        Components: main
        Signed-By: /keys/security.gpg

        Types: deb
        URIs: http://mirror.example/debian
        Suites: stable stable-updates
        Components: main contrib
        Signed-By: /keys/archive.gpg
        """)
    )

    assert provision._debian_archive(tmp_path) == ("http://mirror.example/debian", "/keys/archive.gpg")


def test_debian_archive_is_read_from_a_one_line_sources_list(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# deb http://old.example/debian sid main\n"
        "deb [arch=amd64 signed-by=/keys/archive.gpg] http://mirror.example/debian unstable main\n"
    )

    assert provision._debian_archive(tmp_path) == ("http://mirror.example/debian", "/keys/archive.gpg")


def test_depends_parsing_takes_one_real_package_per_dependency() -> None:
    output = textwrap.dedent("""\
        haproxy
          Depends: libc6
         |Depends: <debconf-2.0>
            cdebconf
          Depends: debconf
          PreDepends: <libssl3>
            libssl3t64
          Depends: lsb-base
            sysvinit-utils
        libc6
          Depends: libgcc-s1
        """)

    assert provision._parse_depends(output) == {"libc6", "cdebconf", "libssl3t64", "lsb-base", "libgcc-s1"}
