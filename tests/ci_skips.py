"""pytest plugin: in CI (CI=true) a test that would skip for a missing tool fails instead.

A green CI must not mean that the browser, Triton or OpenVINO tests never ran because .ci/run did not install
what they need. The failure names the skip's reason. Locally skips stay skips, with their reason. Tests marked for
hardware this machine kind never has (HARDWARE_MARKERS) may still skip. Loaded by tests/conftest.py.
"""

from __future__ import annotations

import os

import pytest

# Hardware this machine kind never has: the only skips CI accepts.
HARDWARE_MARKERS = ("tensorrt", "gpu")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip in CI becomes a failure naming its reason, unless the test is marked for absent hardware."""
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and os.environ.get("CI") == "true" and not hasattr(report, "wasxfail")
            and not any(item.get_closest_marker(m) for m in HARDWARE_MARKERS)):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must run it: {reason} (make .ci/run install what it needs)"
