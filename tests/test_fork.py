"""Connections across real forks: Python's ``os.fork()``, a fork from C (uWSGI's way, with and
without ``py-call-osafterfork``), and a fork from inside a view.

Each test opens connections in this process, forks, lets the child work and report through a
pipe, and checks the parent afterwards: an inherited server connection is never used nor
closed by the child (the default replaces it; ``raise`` refuses and drops it; inside an
atomic block it is refused), the parent's connections, *every thread's*, keep working, and
in-memory SQLite is the child's own copy (no alarm).
"""

from __future__ import annotations

import gc
import json
import os
import threading
import warnings
from typing import Any

import pytest
from django.db import connections, transaction

import conndiag
from conndiag import process
from conndiag.state import state_of
from tests.conftest import of
from tests.forking import (
    c_fork,
    c_fork_osafterfork,
    fork_quietly,
    in_child,
    python_fork,
    read_all,
    wait_child,
)
from tests.handlers import wsgi_get
from tests.testapp import views
from tests.testapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "mysql", "postgres"])

SERVERS = [
    pytest.param("mysql", marks=pytest.mark.mysql),
    pytest.param("postgres", marks=pytest.mark.postgres),
]


FORKS = {"os.fork": python_fork, "C fork": c_fork, "C fork + PyOS_AfterFork": c_fork_osafterfork}


def server_id(alias: str) -> int | None:
    state = state_of(connections[alias])
    return None if state is None else state.server_id


def echo(alias: str, value: str) -> str:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT %s", [value])
        return str(cursor.fetchone()[0])


@pytest.fixture
def persistent(request: pytest.FixtureRequest) -> Any:
    """The server aliases keep their connections (CONN_MAX_AGE=None), as the issue's sites."""
    saved = {a: connections[a].settings_dict.get("CONN_MAX_AGE", 0) for a in ("mysql", "postgres")}
    for alias in saved:
        connections[alias].settings_dict["CONN_MAX_AGE"] = None
    yield
    for alias, value in saved.items():
        connections[alias].settings_dict["CONN_MAX_AGE"] = value
        connections[alias].close()


@pytest.mark.parametrize("fork", list(FORKS), ids=list(FORKS))
@pytest.mark.parametrize("alias", SERVERS)
def test_default_replaces_the_inherited_connection(alias, fork, persistent, events):
    """Default policy: the child's query runs on a connection of its own (another server
    session), reported once at error level with the child's pid and the opener's; the
    parent's connection is untouched and keeps working."""
    assert echo(alias, "parent") == "parent"
    parent_session = server_id(alias)
    parent = os.getpid()

    def child() -> dict[str, Any]:
        first, second = echo(alias, "child-1"), echo(alias, "child-2")
        flagged = of(events, "conndiag.query.flagged")
        return {
            "echoed": [first, second],
            "session": server_id(alias),
            "pid": os.getpid(),
            "flagged": [
                {k: e[k] for k in ("context", "action", "pid", "connection_pid", "log_level")}
                for e in flagged
            ],
            "message": flagged[0]["message"] if flagged else "",
            "closed": [
                (e["reason"], e["connection_pid"]) for e in of(events, "conndiag.connection.closed")
            ],
        }

    result = in_child(child, FORKS[fork])
    assert "crash" not in result, result
    assert result["echoed"] == ["child-1", "child-2"]
    assert result["session"] not in (None, parent_session)
    child_pid = result["pid"]
    assert result["flagged"] == [
        {
            "context": "forked",
            "action": "replaced",
            "pid": child_pid,
            "connection_pid": child_pid,
            "log_level": "error",
        }
    ]
    assert f"that process {parent} opened" in result["message"]
    assert "lazy-apps" in result["message"] and "--preload" in result["message"]
    assert result["closed"] == [["forked", parent]]
    assert echo(alias, "parent-again") == "parent-again"
    assert server_id(alias) == parent_session


@pytest.mark.parametrize("alias", SERVERS)
def test_raise_refuses_and_drops_so_the_next_query_works(alias, persistent, settings):
    """POLICY forked='raise': the child's first query is refused (ForkedConnectionError,
    naming the opener), the connection is dropped unclosed, and the next query works on a
    new connection; the parent's is untouched."""
    settings.CONNDIAG = {"POLICY": {"forked": "raise"}}
    echo(alias, "parent")
    parent_session = server_id(alias)

    def child() -> dict[str, Any]:
        try:
            echo(alias, "refused")
        except conndiag.ForkedConnectionError as exc:
            refused = {"opener": exc.connection_opened_by_pid, "message": str(exc)}
        else:
            refused = None
        return {"refused": refused, "next": echo(alias, "next"), "session": server_id(alias)}

    result = in_child(child)
    assert "crash" not in result, result
    assert result["refused"]["opener"] == os.getpid()
    assert "dropped it without closing it" in result["refused"]["message"]
    assert result["next"] == "next"
    assert result["session"] not in (None, parent_session)
    assert echo(alias, "parent-again") == "parent-again"
    assert server_id(alias) == parent_session


@pytest.mark.parametrize("alias", SERVERS)
def test_a_transaction_begun_in_the_child_gets_the_new_connection(alias, persistent, events):
    """``atomic()`` in the child (what ATOMIC_REQUESTS does first): the inherited connection
    is replaced before the transaction begins (nothing to lose yet), reported once, and the
    block's work commits on the child's own connection."""
    echo(alias, "parent")
    parent_session = server_id(alias)

    def child() -> dict[str, Any]:
        with transaction.atomic(using=alias):
            Item.objects.using(alias).create(name="child")
            session = server_id(alias)
        return {
            "names": list(Item.objects.using(alias).values_list("name", flat=True)),
            "session": session,
            "flagged": [(e["context"], e["action"]) for e in of(events, "conndiag.query.flagged")],
        }

    result = in_child(child)
    assert "crash" not in result, result
    assert result["names"] == ["child"]
    assert result["session"] not in (None, parent_session)
    assert result["flagged"] == [["forked", "replaced"]]
    assert echo(alias, "parent-again") == "parent-again"
    assert server_id(alias) == parent_session


class _LeaveBlock(Exception):
    """Raised in the child only, to leave the parent's atomic block the way code would."""


@pytest.mark.parametrize("alias", SERVERS)
def test_a_fork_inside_a_transaction_refuses_the_childs_queries(alias, persistent):
    """Forked inside an atomic block: the transaction is the parent's, a new connection would
    silently lose it, so the child's query is refused and the rest of its block fails as a
    broken transaction; once the child leaves the block, its next query works on a
    connection of its own. The parent's transaction commits untouched."""
    from django.db.transaction import TransactionManagementError

    read, write = os.pipe()
    pid = -1
    try:
        with transaction.atomic(using=alias):
            Item.objects.using(alias).create(name="parent")
            parent_session = server_id(alias)
            pid = fork_quietly(python_fork)
            if pid == 0:
                result: dict[str, Any] = {}
                try:
                    try:
                        echo(alias, "in-parents-transaction")
                    except conndiag.ForkedConnectionError as exc:
                        result["refused"] = str(exc)
                    try:
                        echo(alias, "again")
                    except TransactionManagementError:
                        result["then"] = "broken transaction"
                except BaseException as exc:
                    result["crash"] = repr(exc)
                    os.write(write, json.dumps(result).encode())
                    os._exit(0)
                result["_"] = 0
                os.environ["CONNDIAG_TEST_CHILD_RESULT"] = json.dumps(result)
                raise _LeaveBlock
    except _LeaveBlock:
        try:  # the child, out of the block
            result = json.loads(os.environ["CONNDIAG_TEST_CHILD_RESULT"])
            result["after"] = echo(alias, "after")
            result["session"] = server_id(alias)
        except BaseException as exc:
            result = {"crash": repr(exc)}
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    answer = read_all(read, pid)
    wait_child(pid)
    result = json.loads(answer)
    assert "crash" not in result, result
    assert "inside a transaction (atomic block)" in result["refused"]
    assert result["then"] == "broken transaction"
    assert result["after"] == "after"
    assert result["session"] not in (None, parent_session)
    assert list(Item.objects.using(alias).values_list("name", flat=True)) == ["parent"]
    assert server_id(alias) == parent_session


@pytest.mark.parametrize("fork", list(FORKS), ids=list(FORKS))
@pytest.mark.parametrize("alias", SERVERS)
def test_another_threads_connection_survives_the_childs_life(alias, fork, persistent):
    """A fork in one thread while another thread holds a connection: in the child that
    thread is gone (Python frees its thread-locals, and the connection with them), the child
    collects garbage, closes everything and exits; the other thread's connection, in the
    parent, keeps working (no COM_QUIT / Terminate reached its socket)."""
    opened, go, done = threading.Event(), threading.Event(), threading.Event()
    answers: list[str] = []

    def holder() -> None:
        answers.append(echo(alias, "before"))
        answers.append(str(server_id(alias)))
        opened.set()
        go.wait(30)
        try:
            answers.append(echo(alias, "after"))
            answers.append(str(server_id(alias)))
        except Exception as exc:
            answers.append(f"{type(exc).__name__}: {exc}")
        finally:
            connections[alias].close()
            done.set()

    t = threading.Thread(target=holder)
    t.start()
    assert opened.wait(30)

    def child() -> dict[str, Any]:
        gc.collect()
        connections.close_all()
        gc.collect()
        return {"ok": True}

    try:
        result = in_child(child, FORKS[fork])
    finally:
        go.set()
        assert done.wait(30)
        t.join()
    assert result == {"ok": True}
    assert answers[0] == "before"
    assert answers[2:] == ["after", answers[1]]


FORK_AND_EXIT = """
import os, sys
sys.path.insert(0, os.getcwd())
os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
from django.conf import settings
if sys.argv[3] == "without":
    from tests import settings as test_settings
    test_settings.INSTALLED_APPS.remove("conndiag")
import django
django.setup()
from django.db import connections
db = connections[sys.argv[1]]
db.settings_dict["NAME"] = sys.argv[2]
db.settings_dict["CONN_MAX_AGE"] = None
with db.cursor() as c:
    c.execute("SELECT 1")
if os.fork() == 0:
    del db
    sys.exit(0)  # the interpreter's teardown, in the child
os.wait()
with connections[sys.argv[1]].cursor() as c:
    c.execute("SELECT 2")
    print("parent:", c.fetchone()[0])
"""


@pytest.mark.parametrize("alias", SERVERS)
def test_a_child_that_exits_normally_never_closes_the_parents_connection(alias, tmp_path):
    """A child that returns through the interpreter's normal exit (module teardown frees the
    inherited connection objects, and mysqlclient says goodbye on the socket) breaks the
    parent's MySQL connection without conndiag; with conndiag the parent's session survives."""
    import subprocess
    import sys

    script = tmp_path / "fork_and_exit.py"
    script.write_text(FORK_AND_EXIT)
    name = str(connections[alias].settings_dict["NAME"])

    def run(conndiag: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-W",
                "ignore::DeprecationWarning",
                str(script),
                alias,
                name,
                conndiag,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=os.getcwd(),
        )

    if alias == "mysql":  # psycopg 3 itself skips PQfinish in a dealloc after fork
        without = run("without")
        assert without.returncode != 0 and "parent: 2" not in without.stdout  # the test is real
    with_it = run("with")
    assert with_it.returncode == 0, with_it.stderr[-2000:]
    assert with_it.stdout.splitlines()[-1] == "parent: 2"


@pytest.mark.parametrize("fork", list(FORKS), ids=list(FORKS))
def test_in_memory_sqlite_is_the_childs_own(fork, events):
    """In-memory SQLite is memory the fork copied: the child keeps using it (it sees the
    parent's rows, writes its own copy), classified as usual, with no alarm."""
    Item.objects.create(name="parent")

    def child() -> dict[str, Any]:
        Item.objects.create(name="child")
        return {
            "names": sorted(Item.objects.values_list("name", flat=True)),
            "contexts": sorted({e["context"] for e in of(events, "conndiag.query")}),
            "alarms": [
                e["event"]
                for e in events
                if e["event"] in ("conndiag.query.flagged", "conndiag.query.refused")
                or e.get("reason") == "forked"
            ],
        }

    result = in_child(child, FORKS[fork])
    assert result == {"names": ["child", "parent"], "contexts": ["background"], "alarms": []}
    assert list(Item.objects.values_list("name", flat=True)) == ["parent"]


def test_a_process_forked_from_a_view_is_detached(events):
    """A view that forks before any connection exists: the child's ORM work originated in
    the request but nothing recycles its connections, so it is ``detached`` (refused by
    default, before connecting), not ``request``."""
    connections["default"].close()
    seen: list[Any] = []

    def fork_in_view() -> None:
        def child() -> dict[str, Any]:
            try:
                Item.objects.count()
            except conndiag.DetachedQueryError as exc:
                return {"refused": exc.context, "path": exc.request_path}
            return {"refused": None}

        seen.append(in_child(child))

    views.START_HOOK = fork_in_view
    try:
        wsgi_get("/nothing/")
    finally:
        views.START_HOOK = None
    assert seen == [{"refused": "detached", "path": "/nothing/"}]


def test_a_server_worker_starts_with_no_request(events):
    """A worker forked outside any request (what a server's master does) classifies its
    queries by their own origin: ``background`` here, never a leftover request."""

    def child() -> dict[str, Any]:
        Item.objects.count()
        return {"contexts": sorted({e["context"] for e in of(events, "conndiag.query")})}

    assert in_child(child, c_fork) == {"contexts": ["background"]}


def test_pid_in_events_is_the_childs_after_a_c_fork(events):
    """After a fork from C (no hook ran), the events of the child carry the child's pid."""

    def child() -> dict[str, Any]:
        Item.objects.count()
        return {"pids": sorted({e["pid"] for e in of(events, "conndiag.query")}), "me": os.getpid()}

    result = in_child(child, c_fork)
    assert result["pids"] == [result["me"]]
    assert process.pid() == os.getpid()


@pytest.mark.parametrize("alias", SERVERS)
def test_a_failing_recorder_costs_the_childs_replacement_nothing(alias, persistent, monkeypatch):
    """With the event log raising on every query and close record, the child's query is
    still replaced and answered on its own connection; the failures are counted."""
    from conndiag import runtime
    from conndiag.events import EventLog

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(EventLog, "query", broken)
    monkeypatch.setattr(EventLog, "connection_closed", broken)
    echo(alias, "parent")
    parent_session = server_id(alias)

    def child() -> dict[str, Any]:
        before = runtime.get().internal_errors
        return {
            "echoed": echo(alias, "child"),
            "session": server_id(alias),
            "errors": runtime.get().internal_errors - before,
        }

    result = in_child(child)
    assert result["echoed"] == "child"
    assert result["session"] not in (None, parent_session)
    assert result["errors"] >= 2
    assert echo(alias, "parent-again") == "parent-again"


NO_THREAD_AFTER_WORK = """
import os, sys, threading, warnings
sys.path.insert(0, os.getcwd())
os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
import django
django.setup()
from django.db import connections
from tests.handlers import wsgi_get
for alias in sys.argv[2:]:
    with connections[alias].cursor() as cursor:  # queries, connects, server facts, metrics
        cursor.execute("SELECT 1")
    wsgi_get("/sync/", f"db={alias}")  # a request: signals, middleware, metrics push
from conndiag.metrics import flush
flush()  # what a scrape does
if sys.argv[1] == "with-a-thread":  # the control: a thread makes fork() warn
    import time
    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pid = os.fork()
    if pid == 0:
        os._exit(0)
os.waitpid(pid, 0)
print("threads:", threading.active_count())
print("warnings:", [str(w.message)[:60] for w in caught if "multi-threaded" in str(w.message)])
"""


def test_conndiag_leaves_no_thread_that_makes_fork_warn(tmp_path):
    """A process that has queried (SQLite and MariaDB), served a request and a scrape, then
    forks: conndiag started no thread, so Python 3.12+ has nothing to warn about (a suite
    that turns warnings into errors forks fine)."""
    import subprocess
    import sys

    from tests.conftest import unavailable_reason

    aliases = ["default"] + ([] if unavailable_reason("mysql") else ["mysql"])
    script = tmp_path / "no_thread.py"
    script.write_text(NO_THREAD_AFTER_WORK)

    def run(control: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, str(script), control, *aliases],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=os.getcwd(),
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout.splitlines()[-2:]

    threads, warned = run("as-is")
    assert threads == "threads: 1"
    assert warned == "warnings: []"
    if sys.version_info >= (3, 12):
        threads, warned = run("with-a-thread")  # the control: the check can see a warning
        assert threads == "threads: 2" and "multi-threaded" in warned


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
@pytest.mark.parametrize("alias", SERVERS)
def test_multiprocessing_children_know_their_pid(alias, method, persistent):
    """A ``multiprocessing`` child of every start method (with a connection open in the
    parent): conndiag's pid, and the pid of the connection its query ran on, are the child's."""
    import multiprocessing

    from tests.forkwork import query_and_report

    echo(alias, "parent")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() in a threaded process
        with multiprocessing.get_context(method).Pool(1) as pool:
            result = pool.apply(query_and_report, (alias,))
    assert result["getpid"] != os.getpid()
    assert result["conndiag"] == result["connection_pid"] == result["getpid"]
    assert echo(alias, "parent-again") == "parent-again"
