"""PostgreSQL: the same observation, classification and server facts as on MySQL.

Vendor-specific parts: the server-side id is the backend pid (psycopg gives it without a
round trip), and the server facts are ``idle_session_timeout`` (the idle timeout that
drops a connection, 0 = off) and ``max_connections``.
"""

from __future__ import annotations

import threading

import pytest
from django.db import connections

from conndiag.lifecycle import report_abandoned
from conndiag.state import state_of
from tests.conftest import of
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


def test_server_facts_are_learned_on_connect(events):
    """The connect probe reads max_connections (and the idle timeouts) once per connection."""
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
    import gc

    def work() -> None:
        Item.objects.using("postgres").count()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    del t
    gc.collect()
    report_abandoned()
    closed = [e for e in of(events, "conndiag.connection.closed") if e["vendor"] == "postgresql"]
    assert [e["reason"] for e in closed] == ["abandoned"]
