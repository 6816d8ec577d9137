"""Connection lifecycle: installed everywhere, every open and close reported with a reason."""

from __future__ import annotations

import gc
import threading

import pytest
from django.db import connections

from conndiag.lifecycle import CLOSE_REASONS, report_abandoned
from conndiag.state import state_of
from conndiag.wrapper import EXECUTE_WRAPPER
from tests.conftest import in_ended_threads, kill_mysql_connection, of
from tests.handlers import wsgi_get
from tests.testapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "mysql"])


def test_wrapper_is_on_connections_of_new_threads():
    """A thread's connection wrapper, created after start-up, has conndiag's wrapper first."""
    seen: list[list[object]] = []

    def work() -> None:
        seen.append(list(connections["mysql"].execute_wrappers))

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen[0][:1] == [EXECUTE_WRAPPER]


def test_user_execute_wrapper_blocks_keep_working():
    """A user's ``execute_wrapper`` block around a first connect keeps ours and theirs."""
    db = connections["mysql"]
    db.close()
    calls: list[str] = []

    def mine(execute, sql, params, many, context):
        calls.append(sql)
        return execute(sql, params, many, context)

    with db.execute_wrapper(mine):
        Item.objects.using("mysql").count()
        assert db.execute_wrappers == [EXECUTE_WRAPPER, mine]
    assert db.execute_wrappers == [EXECUTE_WRAPPER]
    assert calls
    Item.objects.using("mysql").count()
    assert state_of(db).queries >= 1


def test_state_records_opener_and_server_id(events):
    """A MySQL connection's state knows its opener, its server id and its settings."""
    db = connections["mysql"]
    db.close()
    Item.objects.using("mysql").count()
    state = state_of(db)
    with db.cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()")
        (server_id,) = cursor.fetchone()
    assert state.server_id == server_id
    assert state.opened_by.name == threading.current_thread().name
    assert state.conn_max_age_state == "per_request"
    (opened,) = of(events, "conndiag.connection.opened")
    assert opened["connection_id"] == server_id
    assert opened["open_duration_s"] > 0


def test_explicit_close_is_reported(events):
    """connection.close() is a close with reason ``explicit``."""
    db = connections["mysql"]
    Item.objects.using("mysql").count()
    db.close()
    assert [e["reason"] for e in of(events, "conndiag.connection.closed")] == ["explicit"]


def test_request_end_close_with_conn_max_age_zero(events):
    """CONN_MAX_AGE=0: Django closes at request end, reported as ``request_end``."""
    connections["mysql"].close()  # start from no connection (test set-up opened one)
    before = len(of(events, "conndiag.connection.closed"))
    wsgi_get("/sync/", "db=mysql")
    reasons = [e["reason"] for e in of(events, "conndiag.connection.closed")[before:]]
    assert reasons == ["request_end"]


def test_max_age_close(events):
    """CONN_MAX_AGE>0 past its age: closed around the next request as ``max_age``."""
    db = connections["mysql"]
    db.settings_dict["CONN_MAX_AGE"] = 60
    try:
        db.close()
        wsgi_get("/sync/", "db=mysql")
        assert db.connection is not None
        db.close_at = 0  # pretend a minute passed
        wsgi_get("/sync/", "db=mysql")
    finally:
        db.settings_dict["CONN_MAX_AGE"] = 0
    reasons = [e["reason"] for e in of(events, "conndiag.connection.closed")]
    assert reasons[0] == "max_age"


def test_unusable_close_after_a_killed_connection(events):
    """A connection killed by the server is closed as ``unusable`` at the next request."""
    db = connections["mysql"]
    db.settings_dict["CONN_MAX_AGE"] = None
    try:
        wsgi_get("/sync/", "db=mysql")
        victim = state_of(db).server_id
        kill_mysql_connection(victim)
        status, _ = wsgi_get("/sync/", "db=mysql")
        assert status.startswith("500")
        wsgi_get("/sync/", "db=mysql")
    finally:
        db.settings_dict["CONN_MAX_AGE"] = 0
        db.close()
    reasons = [e["reason"] for e in of(events, "conndiag.connection.closed")]
    assert "unusable" in reasons
    failed = of(events, "conndiag.query.failed")
    assert failed and failed[0]["error_class"] in ("lost", "gone_away")


def test_thread_that_ends_without_closing_is_abandoned(events):
    """A thread's connection never closed is reported ``abandoned`` when it is collected."""

    def work() -> None:
        Item.objects.using("mysql").count()

    gc.collect()  # connections earlier tests abandoned are reported now, not below
    report_abandoned()  # the next safe point reports what gc found
    before = len(of(events, "conndiag.connection.closed"))
    in_ended_threads(work)
    closed = of(events, "conndiag.connection.closed")[before:]
    assert [e["reason"] for e in closed] == ["abandoned"]
    assert closed[0]["connection_thread"].startswith("Thread-")


@pytest.mark.parametrize("alias", ["default", "mysql"])
def test_state_of_ended_threads_is_released_whatever_the_driver(alias, events):
    """Short-lived threads that query and end without closing: their connections are
    reported ``abandoned``, the open gauge comes back to where it was, and their states
    (with their ThreadInfo) are freed, on SQLite too, whose connections cannot be
    weak-referenced (conndiag then watches the DatabaseWrapper)."""
    import weakref

    from prometheus_client import REGISTRY

    vendor = connections[alias].vendor
    labels = {"alias": alias, "vendor": vendor}
    gc.collect()
    report_abandoned()
    open_before = REGISTRY.get_sample_value("conndiag_connections_open", labels) or 0.0
    states: list[weakref.ref[object]] = []

    def work() -> None:
        Item.objects.using(alias).count()
        states.append(weakref.ref(state_of(connections[alias])))

    in_ended_threads(work, 20)
    reasons = [e["reason"] for e in of(events, "conndiag.connection.closed")]
    assert reasons.count("abandoned") == 20
    assert REGISTRY.get_sample_value("conndiag_connections_open", labels) == open_before
    assert len(states) == 20
    assert [ref() for ref in states if ref() is not None] == []


def test_connect_failure_is_reported(events):
    """A refused connect (nothing listens on the port) emits ``conndiag.connection.failed``."""
    from django.db import OperationalError

    db = connections.create_connection("mysql")
    db.settings_dict = dict(db.settings_dict, PORT="1", HOST="127.0.0.1")
    from conndiag.lifecycle import install

    install(db)
    with pytest.raises(OperationalError):
        db.ensure_connection()
    (failed,) = of(events, "conndiag.connection.failed")
    assert failed["error_class"] == "refused"
    assert failed["error_code"] in ("2002", "2003")


def test_close_reasons_are_documented():
    """Every close reason is in the fixed list (the metrics' bounded ``reason`` label)."""
    assert set(CLOSE_REASONS) >= {
        "max_age",
        "request_end",
        "unusable",
        "health_check_failed",
        "explicit",
        "abandoned",
    }


def test_closing_an_inherited_connection_in_a_child_spares_the_parent():
    """A child process that closes a connection inherited across fork() does not send
    COM_QUIT on the parent's socket: the parent's connection keeps working."""
    import os

    db = connections["mysql"]
    db.settings_dict["CONN_MAX_AGE"] = None
    try:
        Item.objects.using("mysql").count()
        parent_state = state_of(db)
        pid = os.fork()
        if pid == 0:  # the child: close everything, as a forked worker's cleanup would
            code = 0
            try:
                connections.close_all()
                if db.connection is not None:
                    code = 3
            except BaseException:
                code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert Item.objects.using("mysql").count() == 0  # the parent's connection still works
        assert state_of(db) is parent_state
    finally:
        db.settings_dict["CONN_MAX_AGE"] = 0
        db.close()


def test_garbage_collection_during_a_runtime_build_does_not_deadlock(events):
    """A connection collected while conndiag holds its build lock (a finalizer runs inside
    any allocation) is queued, not reported under the lock: no deadlock, reported later.
    (Found by CI: a finalizer re-entered runtime.get() during the build and hung.)"""
    from conndiag import runtime

    def work() -> None:
        Item.objects.using("mysql").count()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    del t
    runtime.reset()
    done = threading.Event()

    def collect_under_the_lock() -> None:
        with runtime._build_lock:  # as during a build
            gc.collect()  # the abandoned connection's finalizer runs here
        done.set()

    worker = threading.Thread(target=collect_under_the_lock, daemon=True)
    worker.start()
    worker.join(10)
    assert done.is_set(), "the finalizer blocked on the build lock"
    report_abandoned()
    assert "abandoned" in [e["reason"] for e in of(events, "conndiag.connection.closed")]


def test_health_check_failure_is_a_close_reason(events):
    """Django 4.1+ with CONN_HEALTH_CHECKS: a killed persistent connection fails its health
    check at the next request and is closed as ``health_check_failed``; the request succeeds
    on a new connection. (Django < 4.1 has no health checks: nothing is hooked.)"""
    import django

    db = connections["mysql"]
    if django.VERSION < (4, 1):
        assert not hasattr(db, "close_if_health_check_failed")
        return
    db.settings_dict["CONN_MAX_AGE"] = None
    db.settings_dict["CONN_HEALTH_CHECKS"] = True
    try:
        db.close()
        wsgi_get("/sync/", "db=mysql")
        victim = state_of(db).server_id
        kill_mysql_connection(victim)
        status, _ = wsgi_get("/sync/", "db=mysql")
        assert status.startswith("200")
    finally:
        db.settings_dict["CONN_MAX_AGE"] = 0
        db.settings_dict["CONN_HEALTH_CHECKS"] = False
        db.close()
    reasons = [e["reason"] for e in of(events, "conndiag.connection.closed")]
    assert "health_check_failed" in reasons
    assert state_of(db).server_id != victim
