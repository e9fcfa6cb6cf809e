"""Repository-wide pytest policy.

In CI (CI=true) a skipped test is a failure: the e2e suite on real HAProxy
is the proof of the product, and a skip would let CI pass without it. The
one exception is the unit run on the pure-Python twins, where the compiled
modules' own tests skip by design.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# CI's run on the pure-Python twins (SPOA_NO_EXTENSIONS=1, after the full run):
# there the tests of a compiled module skip by design.
TWINS_ONLY = os.environ.get("SPOA_NO_EXTENSIONS", "") not in ("", "0")


def _expected_skip(report) -> bool:
    reason = str(report.longrepr)
    return TWINS_ONLY and ("compiled" in reason or "is not built" in reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail") and not _expected_skip(report):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (counts as a failure): {report.longrepr}"
