"""Real uWSGI (the PyPI binary) against MariaDB: conndiag's metrics stay exact in every mode.

uWSGI serves ``tests.multiproc`` (persistent connections, ``CONN_MAX_AGE=None``) with
``PROMETHEUS_MULTIPROC_DIR`` set and **no hook of any kind** (no ``postfork``, no
``uwsgi.atexit``, no ``mark_process_dead``): dead workers are swept by conndiag's own view.
In every mode: after N requests that each run one query, every scrape, whichever worker
answers it, shows exactly N; ``conndiag_connections_open`` equals MariaDB's process list for
the site's database; the directory holds files for live workers plus the archive; and
SIGTERM stops the server promptly. No mode needs ``--enable-threads``: conndiag starts no
thread.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests import servers
from tests.servers import sample, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.mysql]

# one database per suite run and per xdist worker (two uWSGI sites must not share a process list)
DB_NAME = (
    "conndiag_uwsgi"
    + os.environ.get("CONNDIAG_TEST_DB_SUFFIX", "")
    + os.environ.get("PYTEST_XDIST_WORKER", "")
)
LABELS = {"alias": "default", "vendor": "mysql"}
QUERIES = {**LABELS, "context": "request", "action": "observed"}
PID_FILE = re.compile(r"_(\d+)\.db$")


def processlist(admin: Any) -> int:
    """MariaDB's connections to the site's database."""
    with admin.cursor() as cursor:
        cursor.execute("SHOW FULL PROCESSLIST")
        return sum(1 for row in cursor.fetchall() if row[3] == DB_NAME)


class Site:
    """A running uWSGI, its multi-process directory and the MariaDB admin connection."""

    def __init__(self, server: servers.Server, mp_dir: Path, admin: Any) -> None:
        self.server = server
        self.mp_dir = mp_dir
        self.admin = admin

    def requests(self, n: int) -> list[int]:
        """``n`` requests of one query each, 4 at a time; the pids that served them."""

        def one(_: int) -> int:
            return int(json.loads(self.server.get("/item-count/"))["pid"])

        with ThreadPoolExecutor(max_workers=4) as pool:
            return list(pool.map(one, range(n)))

    def scrape(self) -> str:
        return self.server.get("/metrics").decode()

    def assert_exact(self, n: int, scrapes: int = 8) -> str:
        """Every one of ``scrapes`` scrapes shows exactly ``n`` queries (after the first
        one does: a response reaches the client just before the server closes it, which is
        when its numbers are pushed)."""
        text = wait_for(
            f"conndiag_queries_total == {n}",
            self.scrape,
            lambda t: sample(t, "conndiag_queries_total", **QUERIES) == n,
            timeout=5,
        )
        for _ in range(scrapes):
            text = self.scrape()
            assert sample(text, "conndiag_queries_total", **QUERIES) == n
            assert (
                sample(text, "conndiag_query_duration_seconds_count", **LABELS, context="request")
                == n
            )
        return text

    def assert_open_gauge_is_the_processlist(self) -> None:
        """conndiag_connections_open == MariaDB's process list (after the server noticed
        a dead worker's sockets closing)."""

        def probe() -> tuple[float, int]:
            gauge = sample(self.scrape(), "conndiag_connections_open", **LABELS) or 0.0
            return gauge, processlist(self.admin)

        gauge, rows = wait_for("open gauge == process list", probe, lambda v: v[0] == v[1], 10)
        assert gauge == rows

    def assert_directory_bounded(self) -> None:
        """After a scrape, only live processes have per-pid files (the rest is archived)."""
        self.scrape()
        live = self.server.workers() | {self.server.proc.pid}
        pids = {int(m[1]) for f in os.listdir(self.mp_dir) if (m := PID_FILE.search(f))}
        assert pids <= live, (pids, live)
        others = [f for f in os.listdir(self.mp_dir) if not PID_FILE.search(f)]
        assert len(others) <= 6, others  # manifest, lock, one archive per type

    def wait_workers_ready(self, count: int) -> set[int]:
        """``count`` workers exist and each has loaded the app (lazy-apps: uWSGI logs it).

        uWSGI itself (with or without conndiag) ignores SIGTERM in a lazy-apps worker that
        is still loading the app, until the master kills it after its mercy: a test must
        not stop a server whose respawned worker is still starting.
        """

        def ready() -> set[int]:
            workers = self.server.workers()
            log = self.server.log()
            return {w for w in workers if f" pid: {w} " in log}

        return wait_for(f"{count} workers ready", ready, lambda w: len(w) == count, 30)

    def stop_promptly(self) -> None:
        """SIGTERM stops master and workers within a few seconds (no 60 s hang)."""
        started = time.monotonic()
        self.server.stop(timeout=15)
        took = time.monotonic() - started
        assert took < 5, f"SIGTERM took {took:.1f} s:\n{self.server.log()[-3000:]}"


@pytest.fixture
def database() -> Iterator[Any]:
    with servers.mysql_site_database(DB_NAME) as admin:
        yield admin


@pytest.fixture
def site(tmp_path: Path, database: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A factory: ``site(**uwsgi options)`` starts uWSGI and returns a :class:`Site`."""
    started: list[Any] = []

    def start(**options: Any) -> Site:
        mp_dir = tmp_path / f"prometheus{len(started)}"
        mp_dir.mkdir()
        env = {**servers.mysql_site_env(DB_NAME), "PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}
        cm = servers.running(
            "uwsgi",
            "tests.multiproc.wsgi:application",
            tmp_path,
            env=env,
            ready_path="/pid/",
            **options,
        )
        server = cm.__enter__()
        started.append(cm)
        return Site(server, mp_dir, database)

    yield start
    for cm in started:
        cm.__exit__(None, None, None)


MODES = {
    "prefork": {"processes": 3},
    "lazy-apps": {"processes": 3, "lazy_apps": True},
    "threads": {"processes": 2, "threads": 4, "lazy_apps": True},
    "enable-threads": {"processes": 3, "enable_threads": True},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_exact_counts_and_open_gauge(site: Any, mode: str) -> None:
    """N one-query requests: every scrape shows N, the open gauge is the process list, the
    directory holds live workers only, SIGTERM stops promptly."""
    s = site(**MODES[mode])
    s.requests(30)
    s.assert_exact(30)
    s.assert_open_gauge_is_the_processlist()
    s.assert_directory_bounded()
    s.stop_promptly()


def test_kill_9_of_a_worker(site: Any) -> None:
    """kill -9 of a worker that holds a connection: with no hook, the next scrape drops its
    live gauges (the open gauge is the process list again) and keeps its queries."""
    s = site(processes=3, lazy_apps=True)
    served = s.requests(30)
    s.assert_exact(30)
    s.assert_open_gauge_is_the_processlist()
    victim = next(pid for pid in served if pid in s.server.workers())
    os.kill(victim, signal.SIGKILL)
    wait_for("uWSGI to respawn the worker", s.server.workers, lambda w: victim not in w)
    s.wait_workers_ready(3)
    s.assert_open_gauge_is_the_processlist()
    s.assert_exact(30)
    s.requests(10)
    s.assert_exact(40)
    s.assert_directory_bounded()
    s.stop_promptly()


def test_max_requests_respawns(site: Any) -> None:
    """--max-requests 5 with 2 workers (prefork): 30 requests recycle workers about 5 times; the
    counts stay exact, dead workers' files are archived, the gauge is the process list."""
    s = site(processes=2, extra_args=["--max-requests", "5", "--min-worker-lifetime", "0"])
    pids = set(s.requests(30))
    assert len(pids) > 3  # workers were recycled (forked from the master: no app loading)
    wait_for("2 workers", s.server.workers, lambda w: len(w) == 2)
    s.assert_exact(30)
    s.assert_open_gauge_is_the_processlist()
    s.assert_directory_bounded()
    s.stop_promptly()


def test_harakiri(site: Any) -> None:
    """--harakiri 1: a request that sleeps 3 s gets its worker killed; the queries of the
    requests before it stay counted, and the killed worker's connection leaves the gauge."""
    s = site(processes=2, lazy_apps=True, extra_args=["--harakiri", "1"])
    s.requests(20)
    s.assert_exact(20)
    workers = s.server.workers()
    with pytest.raises(OSError):
        s.server.get("/sleep/?s=3", timeout=10)  # the worker dies: the connection drops
    wait_for("a worker to be replaced", s.server.workers, lambda w: len(w - workers) >= 1)
    s.wait_workers_ready(2)
    s.assert_open_gauge_is_the_processlist()
    s.assert_exact(20)
    s.requests(10)
    s.assert_exact(30)
    s.assert_directory_bounded()
    s.stop_promptly()


def test_sighup_reload(site: Any) -> None:
    """SIGHUP: the old workers stop promptly (no conndiag thread to wait for), the new ones
    load the app; the counts survive (archived) and go on."""
    s = site(processes=2, lazy_apps=True)
    s.requests(20)
    s.assert_exact(20)
    # Both workers loaded the app (one may have served every request while the other was
    # still loading: uWSGI does not stop a lazy-apps worker that is loading, see above).
    before = s.wait_workers_ready(2)
    started = time.monotonic()
    s.server.proc.send_signal(signal.SIGHUP)
    wait_for("the old workers to stop", s.server.workers, lambda w: not (w & before), 10)
    took = time.monotonic() - started
    assert took < 5, f"the old workers took {took:.1f} s to stop"
    s.wait_workers_ready(2)
    s.assert_exact(20)
    s.requests(10)
    s.assert_exact(30)
    s.assert_open_gauge_is_the_processlist()
    s.assert_directory_bounded()
    s.stop_promptly()
