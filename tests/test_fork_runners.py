"""Parallel test runners over conndiag: Django's ``test --parallel 2`` (workers forked by
``multiprocessing`` over the test databases the parent opened) and pytest-xdist (workers
started fresh), on in-memory SQLite, file SQLite, MariaDB and PostgreSQL.

The suite (``tests/forksuite/suite.py``) must give the same results with conndiag as
without it, and conndiag must raise no alarm: no refusal, no flagged query, no connection
reported dropped as inherited. (Django's workers do inherit connections: the parent's test
database connections, which each worker closes before switching to its clone, and, on
SQLite, the in-memory database itself.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unavailable, unavailable_reason
from tests.servers import ROOT

pytestmark = pytest.mark.slow

ALARMS = ("conndiag.query.refused", "conndiag.query.flagged", "conndiag.internal_error")


def run_suite(
    runner: str, tmp_path: Path, servers: list[str], conndiag: bool
) -> tuple[str, list[Any]]:
    """Run the suite; returns (its summary line, conndiag's alarm events)."""
    tag = f"{runner}_{'with' if conndiag else 'without'}"
    work = tmp_path / tag
    work.mkdir()
    events = work / "events"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "tests.forksuite.settings",
        "CONNDIAG_FORKSUITE_SERVERS": ",".join(servers),
        "CONNDIAG_FORKSUITE_DIR": str(work),
        "CONNDIAG_FORKSUITE_TAG": "_" + tag,
        "CONNDIAG_TEST_EVENTS": str(events),
    }
    if not conndiag:
        env["CONNDIAG_FORKSUITE_WITHOUT"] = "1"
    if runner == "django":
        cmd = [sys.executable, "-m", "django", "test", "tests.forksuite.suite"]
        cmd += ["--parallel", "2", "--noinput", "-v", "1"]
    else:
        cmd = [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-q"]
        cmd += ["--ds", "tests.forksuite.settings", "-c", str(work / "pytest.ini")]
        cmd += ["--rootdir", str(ROOT), str(ROOT / "tests/forksuite/suite.py")]
        (work / "pytest.ini").write_text("[pytest]\n")
    out = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    text = out.stdout + out.stderr
    if runner == "django":
        ran = re.search(r"^Ran (\d+) tests?", text, re.M)
        ok = re.search(r"^(OK|FAILED.*)$", text, re.M)
        summary = f"{ran.group(1) if ran else '?'} {ok.group(1) if ok else '?'}"
    else:
        found = re.findall(r"(\d+ (?:passed|failed|error|errors))", text)
        summary = ", ".join(found) or "?"
    assert out.returncode == 0, f"{tag}: {summary}\n{text[-3000:]}"
    lines = events.read_text().splitlines() if events.exists() else []
    alarms = [
        e
        for e in map(json.loads, (line for line in lines if line.startswith("{")))
        if e["event"] in ALARMS or e["level"] in ("warning", "error")
    ]
    return summary, alarms


@pytest.mark.parametrize("runner", ["django", "xdist"])
def test_parallel_runner_same_results_no_alarm(runner: str, tmp_path: Path) -> None:
    """On in-memory SQLite, file SQLite, MariaDB and PostgreSQL at once: the same outcome
    with conndiag as without it, every test passing, and no alarm (nothing at warning or
    error level)."""
    servers = []
    for service in ("mysql", "postgres"):
        reason = unavailable_reason(service)
        if reason is not None:
            unavailable(f"a {service} server: {reason}")
        servers.append(service)
    with ThreadPoolExecutor(max_workers=2) as pool:  # two runs at once (own databases)
        baseline = pool.submit(run_suite, runner, tmp_path, servers, conndiag=False)
        with_it, alarms = run_suite(runner, tmp_path, servers, conndiag=True)
        without, _ = baseline.result()
    assert with_it == without
    assert with_it == ("8 OK" if runner == "django" else "8 passed")
    assert alarms == []
