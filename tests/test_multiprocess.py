"""A real multi-process run: gunicorn workers against MariaDB, metrics aggregated across them.

gunicorn (3 gthread workers, 2 threads each) serves ``tests.multiproc`` with
``PROMETHEUS_MULTIPROC_DIR`` set and the ``child_exit`` hook of
``tests/multiproc/gunicorn_conf.py``. The site's ``default`` database is a dedicated
``conndiag_mp`` database with persistent connections, so the server's process list for it
counts exactly the site's open connections.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests import servers
from tests.servers import ROOT, children, sample, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.mysql]

DB_NAME = "conndiag_mp" + os.environ.get("CONNDIAG_TEST_DB_SUFFIX", "")
REQUESTS = 40


def _processlist_count(admin: Any) -> int:
    """Rows of SHOW PROCESSLIST connected to the test database."""
    with admin.cursor() as cursor:
        cursor.execute("SHOW FULL PROCESSLIST")
        return sum(1 for row in cursor.fetchall() if row[3] == DB_NAME)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


@pytest.fixture
def database() -> Iterator[Any]:
    """The site's own MariaDB database (created empty, dropped after); yields an admin
    connection."""
    with servers.mysql_site_database(DB_NAME) as admin:
        yield admin


@pytest.fixture
def gunicorn(tmp_path: Path, database: Any) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """gunicorn, 3 gthread workers x 2 threads, multi-process metrics, child_exit hook."""
    mp_dir = tmp_path / "prometheus"
    mp_dir.mkdir()
    env = {**servers.mysql_site_env(DB_NAME), "PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}
    with servers.running(
        "gunicorn",
        "tests.multiproc.wsgi:application",
        tmp_path,
        processes=3,
        threads=2,
        env=env,
        extra_args=["--config", str(ROOT / "tests/multiproc/gunicorn_conf.py")],
        ready_path="/metrics",
    ) as server:
        yield server.base, server.proc


def test_counters_and_open_gauge_across_gunicorn_workers(
    gunicorn: tuple[str, subprocess.Popen[bytes]], database: Any
) -> None:
    """After N requests (one query each) the aggregated counter is exactly N; the open
    gauge equals the server's process list; kill -9 of a worker removes its connections
    from the gauge (child_exit -> mark_process_dead) while the counter keeps its queries."""
    base, proc = gunicorn

    def request(_: int) -> int:
        return int(json.loads(_get(base + "/item-count/"))["pid"])

    with ThreadPoolExecutor(max_workers=4) as pool:
        served_by = list(pool.map(request, range(REQUESTS)))
    assert len(served_by) == REQUESTS

    def scrape() -> str:
        return _get(base + "/metrics").decode()

    labels = {"alias": "default", "vendor": "mysql"}
    queries = {**labels, "context": "request", "action": "observed"}
    text = wait_for(
        f"conndiag_queries_total == {REQUESTS}",
        scrape,
        lambda t: sample(t, "conndiag_queries_total", **queries) == REQUESTS,
    )
    time.sleep(1.5)  # a flush period later it is still exact: nothing counted twice
    text = scrape()
    assert sample(text, "conndiag_queries_total", **queries) == REQUESTS
    assert (
        sample(text, "conndiag_query_duration_seconds_count", **labels, context="request")
        == REQUESTS
    )
    assert "pid=" not in text

    open_before = sample(text, "conndiag_connections_open", **labels)
    processes = _processlist_count(database)
    assert processes >= 1
    assert open_before == processes

    victim = next(pid for pid in served_by if pid in children(proc.pid))
    os.kill(victim, signal.SIGKILL)

    def after_kill() -> tuple[float, int, set[int]]:
        text = scrape()
        # no sample at all when no live worker has an open connection any more
        gauge = sample(text, "conndiag_connections_open", **labels) or 0.0
        return gauge, _processlist_count(database), children(proc.pid)

    gauge, processes_after, workers = wait_for(
        "the killed worker's connections to leave the gauge and the process list",
        after_kill,
        lambda v: v[0] == v[1] and v[1] < processes and victim not in v[2] and len(v[2]) == 3,
    )
    assert gauge == processes_after < open_before
    text = scrape()
    assert sample(text, "conndiag_queries_total", **queries) == REQUESTS
    oldest = sample(text, "conndiag_oldest_connection_opened_timestamp_seconds", **labels)
    if gauge:
        assert oldest is not None and oldest <= time.time()
