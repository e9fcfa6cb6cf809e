"""Every benchmark script still starts after the code moves: each one is run
with --help as the README says to run it (PYTHONPATH=. from the checkout), so a
stale import fails here rather than the next time someone measures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def test_every_benchmark_is_listed():
    assert "bench_soak.py" in SCRIPTS and len(SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts(script):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


def test_tier_scale_benchmark_runs_at_tiny_sizes():
    """bench_tier_scale.py end to end (store cluster, 1 and 3 LB-node processes, the failover) at
    a size that takes seconds: its figures are measured elsewhere, here only that it runs."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "benchmarks/bench_tier_scale.py", "--connections", "300", "--intervals",
                             "2", "--interval-ms", "200", "--nodes", "1", "3"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| 3 |" in result.stdout and "Failover with 3 nodes" in result.stdout
