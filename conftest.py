"""Repository-wide pytest policy.

In CI (CI=true) a skipped test is a failure: the e2e suite on real HAProxy
is the proof of the product, and a skip would let CI pass without it.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (counts as a failure): {report.longrepr}"
