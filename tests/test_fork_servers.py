"""Real pre-forking servers over a connection the master opened at import time.

``tests.multiproc.wsgi_query_at_import`` runs a query when it is imported: under uWSGI
without ``lazy-apps`` and gunicorn ``--preload`` that happens once, in the master, and every
worker inherits the connection (persistent: ``CONN_MAX_AGE=None``). Concurrent requests each
ask the database server to echo their own value: a response with another value read another
request's result rows. Without conndiag that happens (the control); with it, every worker
replaces the inherited connection before its first query, so nothing crosses, nothing
fails, and each worker reports one replacement with its own pid.
"""

from __future__ import annotations

import json
import os
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests import servers

pytestmark = [pytest.mark.slow, pytest.mark.mysql]

DB_NAME = "conndiag_fork" + os.environ.get("CONNDIAG_TEST_DB_SUFFIX", "")
APP = "tests.multiproc.wsgi_query_at_import:application"
WORKERS = 4
REQUESTS = 80


@pytest.fixture
def database() -> Any:
    with servers.mysql_site_database(DB_NAME) as admin:
        yield admin


def hammer(server: servers.Server) -> tuple[int, list[str], set[int]]:
    """REQUESTS concurrent echo requests: (mismatches, failures, pids that answered)."""

    def one(i: int) -> tuple[bool | None, str | int]:
        try:
            answer = json.loads(server.get(f"/echo/?v=request-{i}"))
        except (OSError, ValueError) as exc:
            body = exc.read().decode()[:200] if isinstance(exc, urllib.error.HTTPError) else ""
            return None, f"{type(exc).__name__}: {exc} {body}"
        return answer["echoed"] == answer["sent"], int(answer["pid"])

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, range(REQUESTS)))
    mismatches = sum(1 for ok, _ in results if ok is False)
    failures = [str(detail) for ok, detail in results if ok is None]
    pids = {int(detail) for ok, detail in results if ok is not None}
    return mismatches, failures, pids


FORKED = {"alias": "default", "vendor": "mysql", "context": "forked", "action": "replaced"}


def events_of(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def serve(kind: str, tmp_path: Path, conndiag: bool = True, **options: Any) -> Any:
    env = {**servers.mysql_site_env(DB_NAME), "CONNDIAG_TEST_EVENTS": str(tmp_path / "events")}
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    if not conndiag:
        env["CONNDIAG_TEST_WITHOUT_CONNDIAG"] = "1"
    return servers.running(
        kind, APP, tmp_path, processes=WORKERS, env=env, ready_path="/pid/", **options
    )


UWSGI_VARIANTS = {
    "default": {},
    "enable-threads": {"enable_threads": True},
    "threads-2": {"threads": 2},
    "py-call-osafterfork": {"py_call_osafterfork": True, "enable_threads": True},
}


@pytest.mark.parametrize("variant", list(UWSGI_VARIANTS))
def test_uwsgi_prefork_replaces_the_masters_connection_in_every_worker(
    variant: str, tmp_path: Path, database: Any
) -> None:
    """uWSGI, 4 workers forked from C by a master that queried at import: 0 mismatches, 0
    failed requests, exactly one replacement per worker that queried, carrying that
    worker's real pid (not the master's) and naming the master as the opener, counted in
    ``conndiag_queries_total{context="forked",action="replaced"}`` across the workers."""
    with serve("uwsgi", tmp_path, **UWSGI_VARIANTS[variant]) as server:
        workers = server.workers()
        master = server.proc.pid
        mismatches, failures, served_by = hammer(server)
        replaced_metric = servers.wait_for(
            "every replacement in conndiag_queries_total",
            lambda: servers.sample(
                server.get("/metrics").decode(), "conndiag_queries_total", **FORKED
            ),
            lambda value: value == len(served_by),
        )
    assert replaced_metric == len(served_by)
    assert (mismatches, failures) == (0, [])
    assert served_by <= workers and len(served_by) >= 2
    events = events_of(tmp_path / "events")
    replaced = [e for e in events if e["event"] == "conndiag.query.flagged"]
    assert all(
        (e["context"], e["action"], e["level"]) == ("forked", "replaced", "error") for e in replaced
    )
    assert sorted(e["pid"] for e in replaced) == sorted(served_by)  # one per worker
    assert all(f"that process {master} opened" in e["message"] for e in replaced)
    dropped = [e for e in events if e.get("reason") == "forked"]
    assert len(dropped) == len(served_by)
    assert {e["connection_pid"] for e in dropped} == {master}
    queries = [e for e in events if e["event"] == "conndiag.query"]
    # Request queries carry the worker's pid; a worker whose only request was the replaced
    # one (uWSGI may hand a loaded worker few requests) logged no routine query at all.
    requests = {e["pid"] for e in queries if e["context"] == "request"}
    assert requests <= served_by
    assert requests | {e["pid"] for e in replaced} == served_by
    assert {e["pid"] for e in queries if e["context"] == "background"} == {master}  # the import


def test_uwsgi_lazy_apps_has_nothing_to_replace(tmp_path: Path, database: Any) -> None:
    """With lazy-apps each worker imports the application itself: its connection is its own,
    nothing is replaced, nothing crosses."""
    with serve("uwsgi", tmp_path, lazy_apps=True) as server:
        workers = server.workers()
        mismatches, failures, served_by = hammer(server)
    assert (mismatches, failures) == (0, [])
    assert served_by <= workers
    events = events_of(tmp_path / "events")
    assert not [e for e in events if e.get("context") == "forked" or e.get("reason") == "forked"]
    assert {e["pid"] for e in events if e["event"] == "conndiag.query"} <= workers


def test_gunicorn_preload_replaces_the_masters_connection(tmp_path: Path, database: Any) -> None:
    """gunicorn --preload (workers forked by Python): the same guarantees as uWSGI's."""
    with serve("gunicorn", tmp_path, preload=True) as server:
        workers = server.workers()
        master = server.proc.pid
        mismatches, failures, served_by = hammer(server)
    assert (mismatches, failures) == (0, [])
    events = events_of(tmp_path / "events")
    replaced = [e for e in events if e["event"] == "conndiag.query.flagged"]
    assert sorted(e["pid"] for e in replaced) == sorted(served_by)
    assert served_by <= workers
    assert all(f"that process {master} opened" in e["message"] for e in replaced)


def test_without_conndiag_the_workers_read_each_others_rows(tmp_path: Path, database: Any) -> None:
    """The control: the same uWSGI site without conndiag shares the master's connection, and
    requests get another request's result (or fail). This is what the tests above prevent."""
    with serve("uwsgi", tmp_path, conndiag=False) as server:
        mismatches, failures, _ = hammer(server)
    assert mismatches + len(failures) > 0
    assert not events_of(tmp_path / "events")  # conndiag is really absent
