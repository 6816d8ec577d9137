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
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from django.conf import settings

pytestmark = [pytest.mark.slow, pytest.mark.mysql]

ROOT = Path(__file__).resolve().parent.parent
DB_NAME = "conndiag_mp" + os.environ.get("CONNDIAG_TEST_DB_SUFFIX", "")
REQUESTS = 40
T = TypeVar("T")


def _server() -> Any:
    import MySQLdb

    db = settings.DATABASES["mysql"]
    return MySQLdb.connect(
        host=db["HOST"],
        port=int(db["PORT"]),
        user=db["USER"],
        password=db["PASSWORD"],
        autocommit=True,
    )


def _processlist_count(admin: Any) -> int:
    """Rows of SHOW PROCESSLIST connected to the test database."""
    with admin.cursor() as cursor:
        cursor.execute("SHOW FULL PROCESSLIST")
        return sum(1 for row in cursor.fetchall() if row[3] == DB_NAME)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name{labels}`` in an exposition (labels: exact set)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return None


def _wait_for(
    what: str, probe: Callable[[], T], ok: Callable[[T], bool], timeout: float = 20.0
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}; last: {value!r}")
        time.sleep(0.2)


def _workers(master: int) -> set[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return {int(pid) for pid in children}


@pytest.fixture
def database() -> Iterator[Any]:
    admin = _server()
    with admin.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS `{DB_NAME}`")
        cursor.execute(f"CREATE DATABASE `{DB_NAME}`")
        cursor.execute(
            f"CREATE TABLE `{DB_NAME}`.testapp_item "
            "(id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(100) NOT NULL)"
        )
    try:
        yield admin
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{DB_NAME}`")
        admin.close()


@pytest.fixture
def gunicorn(tmp_path: Path, database: Any) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = _free_port()
    mp_dir = tmp_path / "prometheus"
    mp_dir.mkdir()
    db = settings.DATABASES["mysql"]
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.multiproc.settings",
        "PROMETHEUS_MULTIPROC_DIR": str(mp_dir),
        "CONNDIAG_MP_DB": DB_NAME,
        "CONNDIAG_TEST_MYSQL_URL": f"mysql://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:"
        f"{db['PORT']}/{DB_NAME}",
        "PYTHONPATH": str(ROOT),
    }
    log = (tmp_path / "gunicorn.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "tests.multiproc.wsgi:application",
            "--config",
            str(ROOT / "tests/multiproc/gunicorn_conf.py"),
            "--workers",
            "3",
            "--worker-class",
            "gthread",
            "--threads",
            "2",
            "--bind",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "5",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail("gunicorn exited: " + (tmp_path / "gunicorn.log").read_text())
            try:
                _get(base + "/metrics")
            except OSError:
                return False
            return len(_workers(proc.pid)) == 3

        _wait_for("gunicorn to serve with 3 workers", ready, bool, timeout=30)
        yield base, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


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
    text = _wait_for(
        f"conndiag_queries_total == {REQUESTS}",
        scrape,
        lambda t: _sample(t, "conndiag_queries_total", **queries) == REQUESTS,
    )
    time.sleep(1.5)  # a flush period later it is still exact: nothing counted twice
    text = scrape()
    assert _sample(text, "conndiag_queries_total", **queries) == REQUESTS
    assert (
        _sample(text, "conndiag_query_duration_seconds_count", **labels, context="request")
        == REQUESTS
    )
    assert "pid=" not in text

    open_before = _sample(text, "conndiag_connections_open", **labels)
    processes = _processlist_count(database)
    assert processes >= 1
    assert open_before == processes

    victim = next(pid for pid in served_by if pid in _workers(proc.pid))
    os.kill(victim, signal.SIGKILL)

    def after_kill() -> tuple[float, int, set[int]]:
        text = scrape()
        # no sample at all when no live worker has an open connection any more
        gauge = _sample(text, "conndiag_connections_open", **labels) or 0.0
        return gauge, _processlist_count(database), _workers(proc.pid)

    gauge, processes_after, workers = _wait_for(
        "the killed worker's connections to leave the gauge and the process list",
        after_kill,
        lambda v: v[0] == v[1] and v[1] < processes and victim not in v[2] and len(v[2]) == 3,
    )
    assert gauge == processes_after < open_before
    text = scrape()
    assert _sample(text, "conndiag_queries_total", **queries) == REQUESTS
    oldest = _sample(text, "conndiag_oldest_connection_opened_timestamp_seconds", **labels)
    if gauge:
        assert oldest is not None and oldest <= time.time()
