"""run.sh: a second start skips the install unless a build input changed."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _fake_checkout(tmp: Path) -> Path:
    """run.sh next to build inputs, with a venv whose pip and python only log their calls."""
    shutil.copy(REPO / "run.sh", tmp / "run.sh")
    (tmp / "setup.py").write_text("# setup\n")
    (tmp / "pyproject.toml").write_text("[project]\n")
    (tmp / "cext" / "spoa").mkdir(parents=True)
    (tmp / "cext" / "spoa" / "_mod.pyx").write_text("# cython\n")
    (tmp / "spoa").mkdir()
    (tmp / "spoa" / "_mod.so").write_bytes(b"")
    bin_dir = tmp / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("pip", "python"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp}/calls"\n')
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return tmp


def _installs(tmp: Path) -> int:
    subprocess.run(["bash", str(tmp / "run.sh"), "setup"], check=True, timeout=60, capture_output=True)
    calls = (tmp / "calls").read_text().splitlines()
    assert calls[-1] == "python -m spoa.tools.provision"  # provisioning runs every time (instant when cached)
    return sum(line.startswith("pip install") for line in calls)


def test_second_setup_skips_the_install_until_a_build_input_changes(tmp_path):
    tmp = _fake_checkout(tmp_path)
    assert _installs(tmp) == 1
    assert _installs(tmp) == 1  # nothing changed: no install
    (tmp / "spoa" / "plain.py").write_text("x = 1\n")
    assert _installs(tmp) == 1  # Python sources need none (editable install)
    (tmp / "cext" / "spoa" / "_mod.pyx").write_text("# changed\n")
    assert _installs(tmp) == 2
    (tmp / "pyproject.toml").write_text("[project]\ndependencies = []\n")
    assert _installs(tmp) == 3
    (tmp / "spoa" / "_mod.so").unlink()  # compiled modules gone (git clean): rebuild
    assert _installs(tmp) == 4
