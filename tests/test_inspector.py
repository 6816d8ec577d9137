"""The inspector: published connections joined with MariaDB's and PostgreSQL's own lists.

Every connection here is real: raw driver connections stand for "another application or a
leaked connection" (nothing publishes them), threads hold Django connections, and ``KILL``
drops a connection on the server the way ``wait_timeout`` would.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections
from django.test import override_settings

from conndiag import inspector, publish, runtime
from tests.conftest import kill_mysql_connection

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "mysql", "postgres"])


@pytest.fixture
def pubdir(tmp_path: Path) -> Iterator[Path]:
    with override_settings(
        CONNDIAG={"INSPECTOR_DIR": str(tmp_path), "POLICY": {"forked": "ignore"}}
    ):
        yield tmp_path


class Holder:
    """A thread that opens a Django connection to ``alias`` and keeps it until released."""

    def __init__(self, alias: str, name: str = "holder") -> None:
        self.alias = alias
        self.ready = threading.Event()
        self.release = threading.Event()
        self.server_id: int | None = None
        self.work: Callable[[], None] | None = None
        self.thread = threading.Thread(target=self.run, name=name)
        self.thread.start()
        assert self.ready.wait(10)

    def run(self) -> None:
        db = connections[self.alias]
        with db.cursor() as cursor:
            cursor.execute("SELECT 1")
        from conndiag.state import state_of

        state = state_of(db)
        assert state is not None
        self.server_id = state.server_id
        self.ready.set()
        self.release.wait(30)
        if self.work is not None:
            self.work()
        db.close()

    def stop(self) -> None:
        self.release.set()
        self.thread.join(10)


def rows_of(report: dict[str, Any], alias: str) -> dict[int | None, dict[str, Any]]:
    return {row["server_id"]: row for row in report["aliases"][alias]["connections"]}


def raw_mysql() -> Any:
    import MySQLdb

    sd = connections["mysql"].settings_dict
    return MySQLdb.connect(
        host=sd["HOST"],
        port=int(sd["PORT"]),
        user=sd["USER"],
        password=sd["PASSWORD"],
        database=sd["NAME"],
    )


def raw_postgres() -> Any:
    import psycopg

    sd = connections["postgres"].settings_dict
    return psycopg.connect(
        host=sd["HOST"],
        port=int(sd["PORT"]),
        user=sd["USER"],
        password=sd["PASSWORD"] or None,
        dbname=sd["NAME"],
    )


def test_mysql_owned_orphan_and_own(pubdir: Path) -> None:
    """A thread's connection is owned by this process (no flag); a raw driver connection
    nothing publishes is an orphan; the inspector's own connection is marked as such."""
    holder = Holder("mysql", "holder-thread")
    orphan = raw_mysql()
    try:
        report = inspector.inspect(["mysql"])
        rows = rows_of(report, "mysql")
        owned = rows[holder.server_id]
        assert owned["flags"] == []
        [owner] = owned["owners"]
        assert owner["pid"] == os.getpid()
        assert owner["thread"] == "holder-thread"
        assert owned["server"]["user"] == connections["mysql"].settings_dict["USER"]
        assert rows[orphan.thread_id()]["flags"] == ["orphan"]
        assert rows[orphan.thread_id()]["owners"] == []
        own = [r for r in rows.values() if r.get("inspector")]
        assert len(own) == 1
        assert report["flag_counts"]["orphan"] >= 1
    finally:
        orphan.close()
        holder.stop()


def test_postgres_owned_and_orphan(pubdir: Path) -> None:
    """The same on PostgreSQL, from pg_stat_activity (backend pids)."""
    holder = Holder("postgres")
    orphan = raw_postgres()
    try:
        rows = rows_of(inspector.inspect(["postgres"]), "postgres")
        assert rows[holder.server_id]["flags"] == []
        assert rows[holder.server_id]["owners"][0]["pid"] == os.getpid()
        assert rows[orphan.info.backend_pid]["flags"] == ["orphan"]
        assert rows[orphan.info.backend_pid]["server"]["state"].startswith("idle")
    finally:
        orphan.close()
        holder.stop()


def test_a_connection_the_server_dropped_is_gone(pubdir: Path) -> None:
    """KILL on the server: the thread still holds the connection, its next query fails."""
    holder = Holder("mysql")
    holder.work = lambda: None
    try:
        kill_mysql_connection(holder.server_id or 0)
        time.sleep(0.2)
        rows = rows_of(inspector.inspect(["mysql"]), "mysql")
        assert rows[holder.server_id]["flags"] == ["gone"]
        assert rows[holder.server_id]["server"] is None
    finally:
        holder.stop()


def test_a_connection_two_processes_use_is_shared(pubdir: Path) -> None:
    """A real fork of the thread holding a connection; the child uses the inherited
    connection (POLICY forked: ignore): parent and child both claim it."""
    holder = Holder("mysql")
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    child: list[int] = []
    inspected = threading.Event()

    def fork_and_use() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                with connections["mysql"].cursor() as cursor:
                    cursor.execute("SELECT 1")
                os.write(ready_w, b"x")
                os.read(done_r, 1)
            except BaseException as exc:
                os.write(ready_w, repr(exc).encode()[:500])
            finally:
                os._exit(0)  # no close: COM_QUIT would break the parent's connection
        child.append(pid)
        os.close(ready_w)
        os.close(done_r)
        inspected.wait(30)  # the parent keeps (and then closes) its connection only after

    holder.work = fork_and_use
    # The child frees this thread's connections: let it free none that is still open here.
    connections["mysql"].close()
    holder.release.set()
    try:
        assert os.read(ready_r, 500) == b"x"
        rows = rows_of(inspector.inspect(["mysql"]), "mysql")
        shared = rows[holder.server_id]
        assert shared["flags"][0] == "shared"
        assert sorted(o["pid"] for o in shared["owners"]) == sorted([os.getpid(), child[0]])
        assert [o["inherited"] for o in shared["owners"] if o["pid"] == child[0]] == [True]
    finally:
        os.write(done_w, b"x")
        if child:
            os.waitpid(child[0], 0)
        inspected.set()
        holder.thread.join(10)
        os.close(ready_r)
        os.close(done_w)


def test_the_command_exits_non_zero_on_a_flag_and_prints_a_table(pubdir: Path) -> None:
    """``conndiag connections`` prints one row per connection and fails on an orphan; the
    JSON form has the same rows."""
    orphan = raw_mysql()
    try:
        out = io.StringIO()
        with pytest.raises(CommandError) as info:
            call_command("conndiag", "connections", "--database", "mysql", stdout=out)
        assert info.value.returncode == 1
        text = out.getvalue()
        assert "OWNER (pid/thread)" in text
        line = next(line for line in text.splitlines() if f"  {orphan.thread_id()}  " in line)
        assert "(no live process)" in line
        assert line.rstrip().endswith("orphan")
        out = io.StringIO()
        with pytest.raises(CommandError):
            call_command("conndiag", "connections", "--json", "--database", "mysql", stdout=out)
        report = json.loads(out.getvalue())
        assert report["exit_status"] == 1
        assert rows_of(report, "mysql")[orphan.thread_id()]["flags"] == ["orphan"]
    finally:
        orphan.close()


def test_the_command_exits_zero_when_nothing_is_flagged(pubdir: Path) -> None:
    """Only owned connections: exit status 0, and the doctor still runs without the word."""
    out = io.StringIO()
    call_command("conndiag", "connections", "--database", "postgres", stdout=out)
    assert "nothing flagged" in out.getvalue()
    out = io.StringIO()
    call_command("conndiag", "--json", "--database", "default", stdout=out)
    assert "databases" in json.loads(out.getvalue())


def test_sqlite_lists_what_the_processes_published(pubdir: Path) -> None:
    """No server list on SQLite: the published connections are listed, with their owner."""
    holder = Holder("default", "sqlite-holder")
    try:
        report = inspector.inspect(["default"])
        [row] = [
            r
            for r in report["aliases"]["default"]["connections"]
            if r["owners"][0]["thread"] == "sqlite-holder"
        ]
        assert row["server_id"] is None
        assert row["flags"] == []
        assert report["aliases"]["default"]["server"]["available"] is False
    finally:
        holder.stop()


@pytest.mark.parametrize(
    ("client", "own", "same"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("localhost", "127.0.0.1", True),
        ("", "::1", True),
        ("10.0.0.5", "10.0.0.5", True),
        ("10.0.0.6", "10.0.0.5", False),
        ("10.0.0.6", "127.0.0.1", False),
    ],
)
def test_same_host(client: str, own: str, same: bool) -> None:
    """This host is the inspector's own client address (loopback and the socket are one)."""
    assert inspector.same_host(client, own) is same


@pytest.mark.parametrize(
    ("host", "part"),
    [("10.0.0.5:51234", "10.0.0.5"), ("[::1]:5000", "::1"), ("localhost", "localhost"), (None, "")],
)
def test_processlist_host_part(host: str | None, part: str) -> None:
    """processlist HOST is address:port (or a name, for the socket)."""
    assert inspector._host_part(host) == part


NOW = 1_000_000.0


def conn(**kw: Any) -> dict[str, Any]:
    base = {
        "opened_at": NOW - 100,
        "last_used_at": NOW - 90,
        "conn_max_age": None,
        "wait_timeout": 100.0,
        "context_opened": "background",
        "health_checks": False,
        "thread_alive": True,
        "opening_request": None,
    }
    return {**base, **kw}


@pytest.mark.parametrize(
    ("fields", "flags"),
    [
        ({}, ["near_timeout"]),  # idle 90 of 100, background: nothing recycles it
        ({"last_used_at": NOW - 10}, []),
        ({"context_opened": "request"}, ["near_timeout"]),  # persistent: reused as is
        ({"context_opened": "request", "health_checks": True}, []),
        ({"context_opened": "request", "conn_max_age": 60}, []),  # recycled at next request
        ({"conn_max_age": 60}, ["near_timeout", "past_max_age"]),
        ({"conn_max_age": 600, "last_used_at": NOW - 10}, []),
        (
            {"conn_max_age": 0, "opening_request": {"finished": True}, "last_used_at": NOW},
            ["past_max_age"],
        ),
        ({"conn_max_age": 0, "opening_request": {"finished": False}, "last_used_at": NOW}, []),
        (  # a leak: opened by a request, outside Django's cycle, so nothing recycles it
            {"context_opened": "request", "conn_max_age": 0, "opening_request": {"finished": True}},
            ["near_timeout", "past_max_age"],
        ),
        ({"thread_alive": False, "last_used_at": NOW}, ["abandoned"]),
        ({"wait_timeout": None}, []),
    ],
)
def test_flag_rules(fields: dict[str, Any], flags: list[str]) -> None:
    """The documented rules: near_timeout only when nothing recycles it first, past_max_age
    for connections no request recycles, abandoned when the opening thread has ended."""
    assert inspector.flags_of(conn(**fields), NOW) == flags


def test_publishing_off_still_lists_the_server(tmp_path: Path) -> None:
    """With INSPECTOR False the command still reads the directory and the server."""
    with override_settings(CONNDIAG={"INSPECTOR": False, "INSPECTOR_DIR": str(tmp_path)}):
        assert not any(isinstance(r, publish.Publisher) for r in runtime.get().recorders)
        report = inspector.inspect(["mysql"])
        own = [r for r in report["aliases"]["mysql"]["connections"] if r.get("inspector")]
        assert own and own[0]["flags"] == []
        assert report["publishing"] is False
