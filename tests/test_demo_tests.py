"""The demo site's own test suite (``demo_site/jobs/tests``), run as its developers would
(``cd demo_site && python -m pytest``), with conndiag's pytest plugin loaded from its entry
point.

Its tests of the broken endpoints only check what the client sees ("Task run success"),
as a team's tests would, and are marked strict expected failures: with the plugin they
fail (the suite is green), without it (``-p no:conndiag``) they pass, which a strict xfail
turns into a failure. That is the point of the plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import django
import pytest

SITE = Path(__file__).resolve().parent.parent / "demo_site"
# whole pytest sessions, seconds each: once, in the main session
pytestmark = pytest.mark.slow


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env.pop("DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-rA", "-p", "no:xdist", *args],
        cwd=SITE,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_demo_suite_is_green_because_the_plugin_fails_the_broken_endpoints():
    """Broken endpoints: expected failures, with conndiag's refusal as the reason; the safe
    endpoint, the escape hatch and the async ORM pass."""
    result = _run()
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    # the demo's async view uses the async ORM: skipped on Django < 4.1
    expected = (
        "4 passed, 2 xfailed" if django.VERSION >= (4, 1) else "3 passed, 1 skipped, 2 xfailed"
    )
    assert expected in out, out
    assert "XFAIL jobs/tests/test_ops.py::test_trigger_job_in_thread" in out
    assert "XFAIL jobs/tests/test_ops.py::test_trigger_job_in_pool" in out
    assert "PASSED jobs/tests/test_ops.py::test_trigger_job_runs_the_job_in_the_view" in out
    assert "PASSED jobs/tests/test_ops.py::test_trigger_job_background_uses_the_escape_hatch" in out


def test_the_plugin_s_report_names_the_thread_the_request_and_the_fix():
    """With ``--runxfail`` the expected failures show as failures: conndiag's full message."""
    out = _run("--runxfail", "-k", "in_thread").stdout
    assert (
        "conndiag refused 1 query during jobs/tests/test_ops.py::test_trigger_job_in_thread" in out
    )
    assert "thread 'jobs-thread'" in out
    assert "started by request POST /ops/trigger-job-in-thread (view ops)" in out
    assert "Fix: run the work synchronously in the view" in out


def test_without_the_plugin_the_broken_endpoints_tests_pass():
    """The same suite with the plugin off: the broken endpoints' tests pass (XPASS, which
    the strict markers fail): without conndiag, CI would not see the bug."""
    result = _run(
        "-p",
        "no:conndiag",
        # the marker the plugin registers (the demo's --strict-markers wants it known)
        "-o",
        "markers=conndiag_allow: conndiag's plugin is off here",
        "-k",
        "not conndiag_events and not escape_hatch",
    )
    assert result.returncode == 1, result.stdout
    assert "[XPASS(strict)]" in result.stdout
    assert result.stdout.count("XPASS(strict)") >= 2, result.stdout
