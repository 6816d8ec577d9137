"""The inspector against real gunicorn/uWSGI workers and a real MariaDB (and PostgreSQL for the
orphan): owned, orphan, shared.

The site is ``tests.inspector_site`` (``tests.multiproc`` with persistent connections and
``POLICY["forked"] = "ignore"``). Workers publish into ``PROMETHEUS_MULTIPROC_DIR``; the
command runs as an operator would, in its own process with the site's settings.

Orphan: ``kill -9`` alone leaves none on the same host (the kernel closes the dead worker's
socket and the server drops the connection at once). A worker's connection outlives it when
another process still holds the socket: here a helper the worker forked (as a
``multiprocessing`` fork child does), which never uses it. Killing the worker with ``-9``
leaves that connection on the server, owned by no live process.

Shared: ``gunicorn --preload`` or uWSGI without ``lazy-apps``, with a query at import: the
master opens the connection and the worker inherits it; with the forked policy relaxed, the
worker uses it: master and worker both claim one server connection.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from tests import servers

pytestmark = [pytest.mark.slow, pytest.mark.mysql]

DB_NAME = "conndiag_insp" + os.environ.get("CONNDIAG_TEST_DB_SUFFIX", "")
APP = "tests.inspector_site.wsgi:application"


def site_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    multiproc = tmp_path / "prom"
    multiproc.mkdir(exist_ok=True)
    return {
        **servers.mysql_site_env(DB_NAME),
        "DJANGO_SETTINGS_MODULE": "tests.inspector_site.settings",
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        **extra,
    }


def connections_command(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """``manage.py conndiag connections --json`` in its own process, as an operator runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "django", "conndiag", "connections", "--json"],
        cwd=servers.ROOT,
        env={**os.environ, **env, "PYTHONPATH": str(servers.ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    start = proc.stdout.find("{\n")
    assert start >= 0, proc.stdout + proc.stderr
    return proc.returncode, json.loads(proc.stdout[start:])


def rows(report: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {r["server_id"]: r for r in report["aliases"]["default"]["connections"]}


def worker_rows(report: dict[str, Any], pids: set[int]) -> dict[int, dict[str, Any]]:
    return {sid: r for sid, r in rows(report).items() if {o["pid"] for o in r["owners"]} & pids}


@contextmanager
def postgres_site_database(name: str) -> Iterator[None]:
    """A fresh PostgreSQL database ``name`` with ``tests.testapp``'s table, dropped after."""
    import psycopg

    db = settings.DATABASES["postgres"]
    params = {
        "host": db["HOST"],
        "port": int(db["PORT"]),
        "user": db["USER"],
        "password": db["PASSWORD"] or None,
    }
    with psycopg.connect(**params, dbname=db["NAME"], autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(**params, dbname=name, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE testapp_item (id serial PRIMARY KEY, name varchar(100) NOT NULL)"
        )
    try:
        yield
    finally:
        with psycopg.connect(**params, dbname=db["NAME"], autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def site(vendor: str, tmp_path: Path) -> tuple[dict[str, str], Any]:
    """The site's environment and database for ``vendor``."""
    env = site_env(tmp_path)
    if vendor == "mysql":
        return env, servers.mysql_site_database(DB_NAME)
    env["DJANGO_SETTINGS_MODULE"] = "tests.inspector_site.pg_settings"
    return env, postgres_site_database(DB_NAME)


@pytest.mark.parametrize("vendor", ["mysql", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_orphan_left_by_a_killed_worker(tmp_path: Path, vendor: str) -> None:
    """Two workers' persistent connections are listed, owned, unflagged (exit 0); after
    ``kill -9`` of a worker whose socket a helper process still holds, its connection is an
    orphan (exit 1), and the dead worker's file is ignored and removed. MariaDB's
    processlist and PostgreSQL's pg_stat_activity alike."""
    env, database = site(vendor, tmp_path)
    with (
        database,
        servers.running(
            "gunicorn", APP, tmp_path, env=env, processes=2, ready_path="/item-count/"
        ) as server,
    ):
        workers = server.workers()
        seen: set[int] = set()
        servers.wait_for(
            "both workers to hold a connection",
            lambda: seen.add(json.loads(server.get("/item-count/"))["pid"]) or seen,
            lambda s: s >= workers,
        )
        status, report = connections_command(env)
        owned = worker_rows(report, workers)
        assert {r["owners"][0]["pid"] for r in owned.values()} == workers, report
        assert all(r["flags"] == [] for r in owned.values()), owned
        assert all(r["host"] == "this" for r in owned.values())
        assert status == 0, report

        # A worker forks a helper (it inherits the worker's sockets), then dies by kill -9.
        spawned = json.loads(server.get("/spawn-helper/?seconds=60"))
        victim, helper = spawned["worker"], spawned["helper"]
        [victim_sid] = [sid for sid, r in owned.items() if r["owners"][0]["pid"] == victim]
        multiproc = Path(env["PROMETHEUS_MULTIPROC_DIR"]) / "conndiag-connections"
        assert (multiproc / f"{victim}.json").exists()
        try:
            os.kill(victim, signal.SIGKILL)
            servers.wait_for(
                "the worker to die", lambda: victim in server.workers(), lambda v: not v
            )
            status, report = connections_command(env)
            orphan = rows(report)[victim_sid]
            assert orphan["flags"] == ["orphan"], orphan
            assert orphan["owners"] == []
            assert orphan["server"]["state"] in ("Sleep", "idle")
            assert status == 1
            assert not (multiproc / f"{victim}.json").exists()  # the dead worker's file
            assert victim not in {p["pid"] for p in report["processes"]}
        finally:
            os.kill(helper, signal.SIGKILL)
        # The helper gone, the server closes the socket: the orphan disappears.
        servers.wait_for(
            "the orphan to disappear",
            lambda: victim_sid in rows(connections_command(env)[1]),
            lambda present: not present,
        )


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("gunicorn", {"preload": True}),  # the arbiter imports the app, then forks (Python)
        ("uwsgi", {}),  # no lazy-apps: the master loads the app, workers forked from C
    ],
)
def test_shared_connection_inherited_from_the_master(
    tmp_path: Path, kind: str, options: dict[str, Any]
) -> None:
    """The master's import-time connection is inherited by the worker, which uses it (policy
    relaxed): master and worker claim one server connection, flagged ``shared`` (exit 1).
    Under uWSGI the fork is made from C: conndiag notices it before the worker's first query."""
    env = site_env(tmp_path, INSPECTOR_SITE_QUERY_AT_IMPORT="1")
    with (
        servers.mysql_site_database(DB_NAME),
        servers.running(
            kind, APP, tmp_path, env=env, processes=1, ready_path="/item-count/", **options
        ) as server,
    ):
        [worker] = server.workers()
        assert json.loads(server.get("/item-count/"))["pid"] == worker
        status, report = connections_command(env)
        shared = [r for r in rows(report).values() if "shared" in r["flags"]]
        assert len(shared) == 1, report
        owners = {o["pid"]: o for o in shared[0]["owners"]}
        assert set(owners) == {server.proc.pid, worker}
        assert owners[worker]["inherited"] is True
        assert owners[worker]["opened_pid"] == server.proc.pid
        assert owners[server.proc.pid]["inherited"] is False
        assert status == 1
