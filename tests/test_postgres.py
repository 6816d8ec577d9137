"""PostgreSQL: the same observation, classification and server facts as on MySQL.

Vendor-specific parts: the server-side id is the backend pid (psycopg gives it without a
round trip), and the server facts are ``idle_session_timeout`` (the idle timeout that
drops a connection, 0 = off) and ``max_connections``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import DatabaseError, connections, transaction

from conndiag import serverfacts
from conndiag.state import state_of
from tests.conftest import in_ended_threads, of
from tests.handlers import wsgi_json
from tests.testapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "postgres"])


def test_request_queries_are_request_and_threads_are_refused(events):
    """Through the WSGI handler: view queries are ``request``; a view's thread is refused."""
    assert wsgi_json("/sync/", "db=postgres")["count"] == 1
    assert wsgi_json("/thread/", "db=postgres") == {"thread": "refused:detached"}
    contexts = {e["context"] for e in of(events, "conndiag.query") if e["vendor"] == "postgresql"}
    assert contexts == {"request"}
    (refused,) = of(events, "conndiag.query.refused")
    assert refused["vendor"] == "postgresql"
    assert refused["request_path"] == "/thread/"


def test_server_id_is_the_backend_pid(events):
    """The connection id in the state and events is ``pg_backend_pid()``."""
    db = connections["postgres"]
    db.close()
    with db.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    assert state_of(db).server_id == pid
    (opened,) = of(events, "conndiag.connection.opened")
    assert opened["connection_id"] == pid


def test_server_facts_are_learned_on_connect(events, settings):
    """The connect probe reads max_connections (and the idle timeouts) once per connection."""
    settings.CONNDIAG = {"SERVER_FACTS": "connect"}
    db = connections["postgres"]
    db.close()
    Item.objects.using("postgres").count()
    facts = [e for e in of(events, "conndiag.server.facts") if e["vendor"] == "postgresql"]
    assert len(facts) == 1
    assert facts[0]["max_connections"] > 0
    queries = [e for e in of(events, "conndiag.query") if e["vendor"] == "postgresql"]
    assert len(queries) == 1  # the probe is not an application query


def test_abandoned_connection_is_reported(events):
    """A thread's PostgreSQL connection never closed is reported ``abandoned`` after gc."""

    def work() -> None:
        Item.objects.using("postgres").count()

    in_ended_threads(work)
    closed = [e for e in of(events, "conndiag.connection.closed") if e["vendor"] == "postgresql"]
    assert [e["reason"] for e in closed] == ["abandoned"]


# --- errors: SQLSTATE (psycopg 3 ``sqlstate``, psycopg2 ``pgcode``) -------------------------


@pytest.fixture
def pg_settings() -> Iterator[dict[str, Any]]:
    """The ``postgres`` alias's settings dict (shared by every thread), restored afterwards."""
    db = connections["postgres"]
    sd = db.settings_dict
    saved = {key: sd.get(key) for key in ("OPTIONS", "USER", "PORT")}
    db.close()
    serverfacts.clear_cache()
    yield sd
    connections["postgres"].close()
    sd.update(saved)
    serverfacts.clear_cache()


def _psycopg3() -> bool:
    return connections["postgres"].Database.__name__ == "psycopg"


def _raw_postgres() -> Any:
    """A driver connection of the test's own, outside Django and conndiag (autocommit)."""
    db = connections["postgres"]
    raw = db.Database.connect(
        host=db.settings_dict["HOST"],
        port=int(db.settings_dict["PORT"]),
        user="postgres",
        dbname=db.settings_dict["NAME"],
    )
    raw.autocommit = True
    return raw


def _on_server(sql: str, *params: Any) -> None:
    raw = _raw_postgres()
    try:
        raw.cursor().execute(sql, params or None)
    finally:
        raw.close()


def _pg_failed(events: list[dict[str, Any]], name: str = "conndiag.query.failed") -> dict[str, Any]:
    failed = [e for e in of(events, name) if e["vendor"] == "postgresql"]
    assert failed, [e["event"] for e in events]
    return failed[0]


def test_terminated_connection_is_lost(events, pg_settings):
    """``pg_terminate_backend`` from another session: the next query fails, classified
    ``lost`` by its SQLSTATE (57P01 admin_shutdown under psycopg 3; psycopg2 reports no
    SQLSTATE for it, only that the server closed the connection: 08006)."""
    Item.objects.using("postgres").count()
    _on_server("SELECT pg_terminate_backend(%s)", state_of(connections["postgres"]).server_id)
    time.sleep(0.3)
    with pytest.raises(DatabaseError):
        Item.objects.using("postgres").count()
    failed = _pg_failed(events)
    assert failed["error_class"] == "lost"
    if _psycopg3():
        assert failed["error_code"] == "57P01"
        assert "terminated the connection" in failed["cause"]
    else:
        assert failed["error_code"] == "08006"


def test_idle_in_transaction_timeout_is_diagnosed_with_the_probed_value(events, pg_settings):
    """``idle_in_transaction_session_timeout`` (1 s for this session) ends a transaction left
    idle: classified (25P03 under psycopg 3), and the cause names the timeout the probe read."""
    pg_settings["OPTIONS"] = {
        **pg_settings["OPTIONS"],
        "options": "-c idle_in_transaction_session_timeout=1000",
    }
    with pytest.raises(DatabaseError), transaction.atomic(using="postgres"):
        Item.objects.using("postgres").count()
        time.sleep(2.2)
        Item.objects.using("postgres").count()
    facts = [e for e in of(events, "conndiag.server.facts") if e["vendor"] == "postgresql"]
    assert facts and facts[0]["idle_in_transaction_timeout_s"] == 1.0
    failed = _pg_failed(events)
    if _psycopg3():
        assert (failed["error_class"], failed["error_code"]) == ("server_timeout", "25P03")
    else:
        assert failed["error_class"] == "lost"
    assert "idle_in_transaction_session_timeout 1.0 s" in failed["cause"]


def test_statement_timeout_is_canceled_not_a_broken_connection(events, pg_settings):
    """A statement past ``statement_timeout`` is ``canceled`` (57014, both drivers); the
    connection stays usable and is not marked broken."""
    pg_settings["OPTIONS"] = {**pg_settings["OPTIONS"], "options": "-c statement_timeout=100"}
    db = connections["postgres"]
    with pytest.raises(DatabaseError), db.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(2)")
    failed = _pg_failed(events)
    assert (failed["error_class"], failed["error_code"]) == ("canceled", "57014")
    assert "statement_timeout" in failed["cause"]
    assert state_of(db).broken is None
    assert Item.objects.using("postgres").count() == 0


def test_connect_failures_are_classified(events, pg_settings):
    """Connect failures carry no SQLSTATE (libpq reports them as text): an unknown role is
    ``access_denied`` (28000), a role at its CONNECTION LIMIT ``too_many_connections``
    (53300), a closed port ``refused`` (08001)."""
    role = "conndiag_limited" + os.environ.get("CONNDIAG_TEST_DB_SUFFIX", "")
    _on_server(
        f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
        f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0; END IF; END$$"
    )
    db = connections["postgres"]
    cases = [("conndiag_no_such_role", None), (role, None), ("postgres", _free_port())]
    for user, port in cases:
        pg_settings["USER"] = user
        if port is not None:
            pg_settings["PORT"] = str(port)
        with pytest.raises(DatabaseError):
            db.ensure_connection()
    got = [
        (e["error_class"], e["error_code"])
        for e in of(events, "conndiag.connection.failed")
        if e["vendor"] == "postgresql"
    ]
    assert got == [
        ("access_denied", "28000"),
        ("too_many_connections", "53300"),
        ("refused", "08001"),
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sqlstate_table_uses_known_classes():
    """Every SQLSTATE maps to a documented error class, and every message fragment stands
    for a SQLSTATE of the table (so the ``code`` label stays bounded)."""
    from conndiag.diagnosis import ERROR_CLASSES, LIBPQ_MESSAGES, SQLSTATES

    assert set(SQLSTATES.values()) <= set(ERROR_CLASSES)
    assert {code for _, code in LIBPQ_MESSAGES} <= set(SQLSTATES)


# --- the cost of server facts: round trips counted by the server --------------------------


def _transactions_of_test_database() -> int:
    """``xact_commit`` of the test database, read from the maintenance database (so reading
    adds nothing), once the server's counters stopped moving (a backend flushes its counts
    when it exits, just after the client closed it)."""
    db = connections["postgres"]
    name = db.settings_dict["NAME"]
    raw = db.Database.connect(
        host=db.settings_dict["HOST"],
        port=int(db.settings_dict["PORT"]),
        user="postgres",
        dbname="postgres",
    )
    raw.autocommit = True
    try:
        cursor = raw.cursor()
        last, stable_since = -1, time.monotonic()
        while True:
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (name,))
            (value,) = cursor.fetchone()
            if value != last:
                last, stable_since = value, time.monotonic()
            elif time.monotonic() - stable_since > 1.2:
                return int(value)
            time.sleep(0.1)
    finally:
        raw.close()


def _round_trips_of_requests(n: int) -> int:
    """Statements the server ran for ``n`` requests of the ``sync`` view at CONN_MAX_AGE=0."""
    connections["postgres"].close()
    before = _transactions_of_test_database()
    for _ in range(n):
        wsgi_json("/sync/", "db=postgres")
    return _transactions_of_test_database() - before


def test_default_server_facts_cost_no_round_trip_per_request(settings, pg_settings):
    """At CONN_MAX_AGE=0 every request opens a connection. With the default SERVER_FACTS the
    server counts the same statements as with facts off, but for the first connect of the
    process (one probe per alias and process, refreshed after SERVER_FACTS_TTL); with
    SERVER_FACTS='connect' it counts one more per request."""
    assert pg_settings.get("CONN_MAX_AGE", 0) == 0
    n = 10
    settings.CONNDIAG = {"SERVER_FACTS": "off"}
    off = _round_trips_of_requests(n)
    settings.CONNDIAG = {"SERVER_FACTS": "connect"}
    per_connect = _round_trips_of_requests(n)
    settings.CONNDIAG = {}
    serverfacts.clear_cache()
    default = _round_trips_of_requests(n)
    assert per_connect - off == n  # one probe per request
    assert default - off == 1  # one probe for the whole process
