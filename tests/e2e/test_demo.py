"""`python -m spoa demo` headless, as CI and a new user run it.

20 s of the whole system on loopback (HAProxy 3.2, agent, LB node, backend,
traffic): it must exit 0, print plain progress lines (no TTY), end with a JSON
summary showing that leases flowed end to end, and leave nothing running. With
`--lbnodes 3`: the same through a tier of three LB nodes on a local 3x3 Valkey
Cluster, every slot owned, each node answering, its store gone at the end too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from spoa.config import LBNODE_SCHEMA

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


def _run_demo(*args: str) -> tuple[list[str], dict, str]:
    """The demo headless for DURATION s: (its stdout lines, its JSON summary, its whole stdout)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "spoa", "demo", "--duration", str(DURATION), *args], cwd=REPO,
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=DURATION + 60)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return lines, json.loads(lines[-1]), done.stdout


def _assert_nothing_left(summary: dict) -> None:
    """Nothing it started survives, and its work dir is gone."""
    for name, pid in summary["pids"].items():
        assert not _running(pid), f"{name} (pid {pid}) still runs"
    assert not _processes_mentioning(summary["work_dir"])
    assert not summary["work_dir_kept"] and not Path(summary["work_dir"]).exists()


def test_demo_runs_headless_and_leases_flow_end_to_end():
    lines, summary, stdout = _run_demo()

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
    assert "\x1b[" not in stdout
    assert summary["lbnodes"] == 1 and summary["store"] is None and list(summary["lbnode_nodes"]) == ["lbnode"]
    _assert_nothing_left(summary)


def test_demo_with_a_tier_of_three_lbnodes():
    lines, summary, _ = _run_demo("--lbnodes", "3")
    assert summary["errors"] == [], summary["errors"]
    names = ["lbnode1", "lbnode2", "lbnode3"]
    assert summary["lbnodes"] == 3 and list(summary["lbnode_nodes"]) == names
    assert summary["exit_codes"] == {"haproxy": 0, "agent": 0, **dict.fromkeys(names, 0)}
    nodes = summary["lbnode_nodes"].values()
    assert sum(n["slots_owned"] for n in nodes) == LBNODE_SCHEMA["cluster"]["slots"].default  # each slot once
    assert all(n["members"] == 3 and n["answering"] and not n["fenced"] for n in nodes), nodes
    assert all(n["slots_owned"] > 0 for n in nodes)  # each its share
    # the sums the single-node summary shows are the tier's: each connection held by one node
    assert summary["lbnode_connections"] == sum(n["new_connections"] for n in nodes) > 0
    assert summary["hints_sent"] == sum(n["hints_sent"] for n in nodes) and summary["hints_applied"] > 0
    assert summary["leases_predicted"] > 0 and summary["premature_expiries"] == 0
    store = summary["store"]
    assert store["primaries"] == 3 and store["replicas"] == 1 and len(store["seeds"]) == len(store["pids"]) == 6
    # the live view's lines, per node (no TTY: plain)
    for name in names:
        assert any(line.strip().startswith(name) and "slots" in line for line in lines), name
    for pid in store["pids"]:
        assert not _running(pid), f"store node (pid {pid}) still runs"
    _assert_nothing_left(summary)
