"""`python -m spoa demo` headless, as CI and a new user run it.

20 s of the whole system on loopback (HAProxy 3.2, agent, LB node, backend,
traffic): it must exit 0, print plain progress lines (no TTY), end with a JSON
summary showing that leases flowed end to end, and leave nothing running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DURATION = 20


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline or text in environ:
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_demo_runs_headless_and_leases_flow_end_to_end():
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "spoa", "demo", "--duration", str(DURATION)], cwd=REPO, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=DURATION + 60)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads(lines[-1])

    assert summary["errors"] == [], summary["errors"]
    assert summary["stopped_by"] == "duration"
    assert summary["haproxy_version"].startswith("3.2")
    assert summary["connections"] > 0
    assert summary["packets_published"] > 0
    # HAProxy applied predicted leases (its log), the clients saw them (X-Lease) ...
    assert summary["leases_predicted"] > 0
    assert summary["client_leases"].get("predicted", 0) > 0
    # ... which the LB node granted and sent back as hints the agent applied
    assert summary["lbnode_leases"].get("predicted", 0) > 0
    assert summary["hints_sent"] > 0 and summary["hints_applied"] > 0
    assert isinstance(summary["premature_expiries"], int) and summary["premature_expiries"] >= 0
    assert summary["segments_peak"] > 0 and summary["tap_records"] > 0
    assert summary["exit_codes"] == {"haproxy": 0, "agent": 0, "lbnode": 0}

    # no TTY: plain progress lines, no terminal control sequences
    assert sum(line.startswith("[") and "leases haproxy" in line for line in lines) >= DURATION // 4
    assert "\x1b[" not in done.stdout

    # nothing it started survives, and its work dir is gone
    for name, pid in summary["pids"].items():
        assert not _running(pid), f"{name} (pid {pid}) still runs"
    assert not _processes_mentioning(summary["work_dir"])
    assert not summary["work_dir_kept"] and not Path(summary["work_dir"]).exists()
