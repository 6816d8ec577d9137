"""Error diagnosis on a real MariaDB: each cause of "server has gone away" reproduced for real.

Every test makes the failure happen (a session ``wait_timeout`` of 1 s and an idle
connection, a ``KILL`` from another connection, a connection inherited across ``fork()``, a
refused port, a wrong password, an account's connection limit) and asserts the error class,
the code and the cause conndiag attaches to its ``conndiag.query.failed`` or
``conndiag.connection.failed`` event.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import MySQLdb
import pytest
from django.db import OperationalError, connections
from django.db.backends.mysql.base import DatabaseWrapper
from django.http import HttpRequest, HttpResponse
from django.urls import path

from conndiag import lifecycle, process, serverfacts
from conndiag.diagnosis import (
    ERROR_CLASSES,
    KNOWN_CODES,
    classify_error,
    diagnose,
    error_code,
    likely_cause,
)
from conndiag.lifecycle import report_abandoned
from conndiag.state import state_of
from tests.conftest import of
from tests.handlers import wsgi_get

pytestmark = pytest.mark.django_db(databases=["default", "mysql"], transaction=True)

SLEEP_PAST_TIMEOUT = 2.2  # wait_timeout is 1 s; the server checks it about once a second


@pytest.fixture
def mysql_settings() -> Iterator[dict[str, Any]]:
    """The ``mysql`` alias's settings dict (shared by every thread), restored afterwards."""
    db = connections["mysql"]
    sd = db.settings_dict
    saved = {key: sd.get(key) for key in ("OPTIONS", "CONN_MAX_AGE", "CONN_HEALTH_CHECKS")}
    db.close()
    serverfacts.clear_cache()
    yield sd
    connections["mysql"].close()
    sd.update(saved)
    serverfacts.clear_cache()


@pytest.fixture
def short_timeout(mysql_settings: dict[str, Any]) -> dict[str, Any]:
    """Every new ``mysql`` connection gets ``wait_timeout = 1`` (its own session only)."""
    options = mysql_settings["OPTIONS"]
    mysql_settings["OPTIONS"] = {**options, "init_command": "SET SESSION wait_timeout=1"}
    return mysql_settings


def _select_one(alias: str = "mysql") -> Any:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1")
        return cursor.fetchone()


def _root_connection() -> Any:
    """A raw driver connection of the test's own, outside Django and conndiag."""
    sd = connections["mysql"].settings_dict
    return MySQLdb.connect(
        host=sd["HOST"], port=int(sd["PORT"]), user=sd["USER"], password=sd["PASSWORD"]
    )


def _failed(events: list[dict[str, Any]]) -> dict[str, Any]:
    (event,) = of(events, "conndiag.query.failed")
    return event


# --- classification ----------------------------------------------------------------------


def test_every_required_code_is_classified() -> None:
    """2006, 2013, 4031, 2002, 2003, 1040, 1045, 1927 map to their classes; others are ``other``."""
    expected = {
        2006: "gone_away",
        2013: "lost",
        4031: "server_timeout",
        2002: "refused",
        2003: "refused",
        1040: "too_many_connections",
        1045: "access_denied",
        1927: "lost",
    }
    for code, error_class in expected.items():
        assert classify_error(MySQLdb.OperationalError(code, "message")) == (error_class, str(code))
    assert classify_error(MySQLdb.OperationalError(1146, "no such table")) == ("other", "other")
    assert classify_error(ValueError("no code")) == ("other", "other")
    assert set(KNOWN_CODES.values()) <= set(ERROR_CLASSES)


def test_error_code_follows_the_cause_chain() -> None:
    """Django's wrapped error is classified by the driver error it wraps."""
    wrapped = OperationalError("wrapped")
    wrapped.__cause__ = MySQLdb.OperationalError(2013, "Lost connection")
    assert error_code(wrapped) == 2013
    assert error_code(MySQLdb.OperationalError(True, "a bool is not a code")) is None


def test_causes_of_failures_without_a_connection() -> None:
    """Connect-time classes get causes that name what to check."""
    assert "HOST/PORT" in likely_cause("refused", None, None, None, None, None)
    assert "max_connections=151" in likely_cause(
        "too_many_connections", None, None, None, None, None, {"max_connections": 151}, "1040"
    )
    assert "max_user_connections" in likely_cause(
        "too_many_connections", None, None, None, None, None, None, "1226"
    )
    assert "PASSWORD" in likely_cause("access_denied", None, None, None, None, None)
    assert likely_cause("other", None, None, None, None, None) == (
        "not a connection problem conndiag recognises"
    )


# --- the server dropped an idle connection ------------------------------------------------


def test_idle_past_wait_timeout_is_diagnosed(
    short_timeout: dict[str, Any], events: list[dict[str, Any]]
) -> None:
    """SET SESSION wait_timeout=1, idle past it: 2006, cause "idle X s > wait_timeout 1.0 s"."""
    _select_one()
    time.sleep(SLEEP_PAST_TIMEOUT)
    with pytest.raises(OperationalError) as raised:
        _select_one()
    assert raised.value.args[0] == 2006
    failed = _failed(events)
    assert (failed["error_class"], failed["error_code"]) == ("gone_away", "2006")
    assert failed["cause"].startswith("idle 2.")
    assert "> wait_timeout 1.0 s" in failed["cause"]
    assert "'MainThread' is not a request thread" in failed["cause"]


def test_idle_without_server_facts_says_the_timeout_is_unknown(
    short_timeout: dict[str, Any], events: list[dict[str, Any]], settings: Any
) -> None:
    """With SERVER_FACTS off, the cause still names the idle time and the likely drop."""
    settings.CONNDIAG = {"SERVER_FACTS": "off"}
    _select_one()
    time.sleep(SLEEP_PAST_TIMEOUT)
    with pytest.raises(OperationalError):
        _select_one()
    cause = _failed(events)["cause"]
    assert cause.startswith("the server dropped the connection (idle 2.")
    assert "wait_timeout not known" in cause
    assert of(events, "conndiag.connection.stale") == []  # no facts, no stale detection


def test_killed_connection_is_diagnosed(
    mysql_settings: dict[str, Any], events: list[dict[str, Any]]
) -> None:
    """KILL from another connection: 2013 blamed on a kill or restart, then 2006 on reusing
    the connection that already failed."""
    _select_one()
    server_id = state_of(connections["mysql"]).server_id
    killer = _root_connection()
    try:
        killer.cursor().execute(f"KILL {int(server_id)}")
    finally:
        killer.close()
    for code in (2013, 2006):
        with pytest.raises(OperationalError) as raised:
            _select_one()
        assert raised.value.args[0] == code
    first, second = of(events, "conndiag.query.failed")
    assert (first["error_class"], first["error_code"]) == ("lost", "2013")
    assert (second["error_class"], second["error_code"]) == ("gone_away", "2006")
    assert first["cause"].startswith("server restarted or killed the connection (idle ")
    assert "< wait_timeout 28800 s" in first["cause"]
    assert second["cause"].startswith("the connection already failed (2013) ")
    assert "was used again" in second["cause"]


def test_connection_inherited_across_fork_is_diagnosed(
    mysql_settings: dict[str, Any], events: list[dict[str, Any]], settings: Any
) -> None:
    """POLICY forked='log': the child's query runs on the parent's connection; when the parent
    closes it, the child's failure is diagnosed as inherited across fork."""
    settings.CONNDIAG = {"POLICY": {"forked": "log"}}
    _select_one()
    parent = os.getpid()
    go_read, go_write = os.pipe()
    out_read, out_write = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12 warns about fork() in a process with threads; the child only queries.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: do the work, report through the pipe, never return to pytest
        result: dict[str, Any] = {}
        try:
            result["first"] = list(_select_one())  # runs, flagged as forked
            os.read(go_read, 1)  # wait until the parent closed the shared connection
            try:
                _select_one()
            except OperationalError as exc:
                result["code"] = exc.args[0]
            result["flagged"] = [e["context"] for e in of(events, "conndiag.query.flagged")]
            result["failed"] = [
                {k: e[k] for k in ("error_class", "cause")}
                for e in of(events, "conndiag.query.failed")
            ]
        except BaseException as exc:
            result["crash"] = repr(exc)
        os.write(out_write, json.dumps(result).encode())
        os._exit(0)
    os.close(out_write)
    os.close(go_read)
    time.sleep(0.5)  # let the child run its first query on the shared connection
    connections["mysql"].close()  # COM_QUIT on the socket the child shares
    os.write(go_write, b"x")
    os.close(go_write)
    chunks = []
    while chunk := os.read(out_read, 65536):
        chunks.append(chunk)
    os.close(out_read)
    os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks))
    assert "crash" not in result, result
    assert result["first"] == [1]
    assert "forked" in result["flagged"]
    assert result["code"] in (2006, 2013)
    (failed,) = result["failed"]
    assert failed["error_class"] in ("gone_away", "lost")
    assert failed["cause"] == (
        f"connection opened by process {parent}, used by {pid} (inherited across fork)"
    )


def test_thread_pool_worker_reusing_its_connection_is_diagnosed(
    short_timeout: dict[str, Any], events: list[dict[str, Any]]
) -> None:
    """A long-lived pool worker's connection idles past wait_timeout: the cause says so and
    says that nothing recycles a worker thread's connection."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="diag-pool") as pool:
        try:
            assert pool.submit(_select_one).result() == (1,)
            time.sleep(SLEEP_PAST_TIMEOUT)
            with pytest.raises(OperationalError):
                pool.submit(_select_one).result()
        finally:
            pool.submit(connections.close_all).result()
    failed = _failed(events)
    assert failed["error_class"] == "gone_away"
    assert failed["thread_name"].startswith("diag-pool")
    assert failed["context"] == "background"
    assert "> wait_timeout 1.0 s" in failed["cause"]
    assert "'diag-pool_0' is not a request thread" in failed["cause"]


# --- through the real WSGI handler --------------------------------------------------------

_detached_started = threading.Event()
_detached_go = threading.Event()
_detached_threads: list[threading.Thread] = []


def _persistent_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse(str(_select_one()[0]))


def _detached_work() -> None:
    try:
        _select_one()
        _detached_started.set()
        _detached_go.wait(10)
        time.sleep(SLEEP_PAST_TIMEOUT)
        try:
            _select_one()
        except OperationalError:
            pass
    finally:
        connections.close_all()


def _detached_view(request: HttpRequest) -> HttpResponse:
    thread = threading.Thread(target=_detached_work, name="ops-job")
    _detached_threads.append(thread)
    thread.start()
    _detached_started.wait(10)
    return HttpResponse("started")


urlpatterns = [
    path("diag/persistent/", _persistent_view),
    path("ops/trigger-job/", _detached_view),
]


def test_persistent_request_connection_without_health_checks_is_diagnosed(
    short_timeout: dict[str, Any], events: list[dict[str, Any]], settings: Any
) -> None:
    """CONN_MAX_AGE=None, no health checks: close_old_connections keeps the dropped connection,
    the next request fails with 2006, and the cause names the setting; Django then closes it
    as unusable."""
    settings.ROOT_URLCONF = __name__
    short_timeout["CONN_MAX_AGE"] = None
    short_timeout["CONN_HEALTH_CHECKS"] = False
    status, body = wsgi_get("/diag/persistent/")
    assert (status[:3], body) == ("200", b"1")
    time.sleep(SLEEP_PAST_TIMEOUT)
    status, _ = wsgi_get("/diag/persistent/")
    assert status.startswith("500")
    failed = _failed(events)
    assert failed["context"] == "request"
    assert failed["request_path"] == "/diag/persistent/"
    assert "> wait_timeout 1.0 s" in failed["cause"]
    assert "CONN_MAX_AGE=None and health checks off" in failed["cause"]
    (stale,) = of(events, "conndiag.connection.stale")
    assert stale["conn_max_age_state"] == "persistent"
    assert [e["reason"] for e in of(events, "conndiag.connection.closed")] == ["unusable"]


def test_thread_started_by_a_request_is_diagnosed(
    short_timeout: dict[str, Any], events: list[dict[str, Any]], settings: Any
) -> None:
    """POLICY detached='log': a thread started by GET /ops/trigger-job/ outlives its response and
    reuses its connection after wait_timeout; the cause names the request and how long ago."""
    settings.ROOT_URLCONF = __name__
    settings.CONNDIAG = {"POLICY": {"detached": "log"}}
    _detached_started.clear()
    _detached_go.clear()
    status, _ = wsgi_get("/ops/trigger-job/")
    assert status.startswith("200")
    _detached_go.set()
    _detached_threads.pop().join(10)
    failed = _failed(events)
    assert failed["thread_name"] == "ops-job"
    assert failed["context"] == "detached"
    assert (
        "> wait_timeout 1.0 s; thread started by request GET /ops/trigger-job/ (2."
        in (failed["cause"])
    )
    assert failed["cause"].endswith("ago), which never recycles its connection")


# --- connect failures (before any execute wrapper) ----------------------------------------


def _unconnected(**overrides: Any) -> DatabaseWrapper:
    """A fresh, conndiag-installed wrapper for the ``mysql`` server with ``overrides``."""
    db = DatabaseWrapper({**connections["mysql"].settings_dict, **overrides}, alias="mysql")
    lifecycle.install(db)
    return db


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_refused_connect_is_diagnosed(events: list[dict[str, Any]]) -> None:
    """A port nobody listens on: the failed connect is reported as ``refused`` (2002/2003)."""
    db = _unconnected(HOST="127.0.0.1", PORT=str(_free_port()))
    with pytest.raises(OperationalError):
        db.ensure_connection()
    (failed,) = of(events, "conndiag.connection.failed")
    assert failed["error_class"] == "refused"
    assert failed["error_code"] in ("2002", "2003")
    assert "HOST/PORT" in failed["cause"]
    assert failed["thread_name"] == threading.current_thread().name


def test_wrong_password_is_diagnosed(events: list[dict[str, Any]]) -> None:
    """A wrong password: the failed connect is reported as ``access_denied`` (1045)."""
    db = _unconnected(PASSWORD="certainly-not-the-password")
    with pytest.raises(OperationalError) as raised:
        db.ensure_connection()
    assert raised.value.args[0] == 1045
    (failed,) = of(events, "conndiag.connection.failed")
    assert (failed["error_class"], failed["error_code"]) == ("access_denied", "1045")
    assert "PASSWORD" in failed["cause"]


def test_connection_limit_is_diagnosed(events: list[dict[str, Any]]) -> None:
    """An account limited to one connection: the second connect fails as too many connections."""
    user = f"conndiag_lim_{os.getpid()}"
    admin = _root_connection()
    cursor = admin.cursor()
    cursor.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw' WITH MAX_USER_CONNECTIONS 1")
    try:
        first = _unconnected(USER=user, PASSWORD="pw", NAME="")
        first.ensure_connection()
        second = _unconnected(USER=user, PASSWORD="pw", NAME="")
        with pytest.raises(OperationalError):
            second.ensure_connection()
        first.close()
    finally:
        cursor.execute(f"DROP USER '{user}'@'%'")
        admin.close()
    (failed,) = of(events, "conndiag.connection.failed")
    assert failed["error_class"] == "too_many_connections"
    assert failed["error_code"] in ("1203", "1226")
    assert "max_user_connections" in failed["cause"]


# --- every close has a reason -------------------------------------------------------------


def test_connection_abandoned_by_a_finished_thread_is_reported(
    mysql_settings: dict[str, Any], events: list[dict[str, Any]]
) -> None:
    """A thread that ends without closing its connection: after gc, a ``closed`` event with
    reason ``abandoned``, and the server no longer holds the connection."""
    ids: list[int] = []

    def work() -> None:
        _select_one()
        ids.append(state_of(connections["mysql"]).server_id)

    gc.collect()  # what earlier tests left behind is reported now, not below
    report_abandoned()
    before = len(of(events, "conndiag.connection.closed"))
    thread = threading.Thread(target=work, name="leaky")
    thread.start()
    thread.join()
    gc.collect()
    report_abandoned()  # the next safe point reports what gc found
    closed = [e for e in of(events, "conndiag.connection.closed")[before:] if e["alias"] == "mysql"]
    assert [(e["reason"], e["connection_id"], e["connection_thread"]) for e in closed] == [
        ("abandoned", ids[0], "leaky")
    ]


def test_diagnose_is_total() -> None:
    """``diagnose`` works with nothing known (no state, no thread) and bounds the code label."""
    diagnosis = diagnose(MySQLdb.OperationalError(9999, "?"), None)
    assert (diagnosis.error_class, diagnosis.code) == ("other", "other")
    assert process.pid() == os.getpid()
