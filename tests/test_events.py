"""Log events: stable names and fields, level filtering, sampling, no SQL by default.

The tests run with the backend a project gets when it configured no structlog (stdlib
logging); ``backend`` runs a test under structlog too.
"""

from __future__ import annotations

import logging

import pytest
import structlog
from django.db import connections
from django.test import override_settings

from conndiag import events as ev
from tests.conftest import of
from tests.testapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "mysql"])

QUERY_FIELDS = {
    "alias",
    "vendor",
    "context",
    "action",
    "allowed",
    "thread_name",
    "thread_ident",
    "thread_native_id",
    "pid",
    "request_id",
    "request_method",
    "request_path",
    "view",
    "request_returned_s",
    "connection_id",
    "connection_age_s",
    "connection_idle_s",
    "connection_queries",
    "connection_pid",
    "connection_thread",
    "conn_max_age_state",
    "conn_max_age_s",
    "recycle_in_s",
    "health_checks",
    "wait_timeout_s",
    "duration_s",
    "outcome",
    "many",
}


@pytest.fixture(params=["stdlib", "structlog"])
def backend(request):
    """The test runs once with stdlib logging and once with structlog configured (JSON)."""
    if request.param == "structlog":
        structlog.configure(
            processors=[structlog.processors.JSONRenderer()],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
            logger_factory=structlog.ReturnLoggerFactory(),
        )
    yield request.param
    structlog.reset_defaults()


def test_query_event_has_the_documented_fields(backend, events):
    """``conndiag.query`` carries every documented field, and no SQL by default, through
    either backend (structlog: keyword arguments; stdlib: record attributes)."""
    Item.objects.using("mysql").count()
    (query,) = of(events, ev.QUERY)
    # stdlib records also carry their readable message
    assert set(query) - {"event", "log_level", "message"} == QUERY_FIELDS
    assert query["vendor"] == "mysql"
    assert query["outcome"] == "ok"
    assert "sql" not in query and "params" not in query


def test_sql_is_logged_only_when_asked_and_params_only_when_asked_again(events):
    """LOG_SQL adds the SQL text; parameters need LOG_SQL_PARAMS too."""
    with override_settings(CONNDIAG={"LOG_SQL": True, "METRICS": False}):
        Item.objects.using("default").filter(name="secret-value").count()
        (query,) = of(events, ev.QUERY)
        assert "testapp_item" in query["sql"]
        assert "params" not in query
        assert "secret-value" not in repr(query)
    with override_settings(CONNDIAG={"LOG_SQL": True, "LOG_SQL_PARAMS": True, "METRICS": False}):
        Item.objects.using("default").filter(name="secret-value").count()
        assert "secret-value" in of(events, ev.QUERY)[-1]["params"]


def test_routine_events_can_be_switched_off(events):
    """LOG_QUERIES=False silences routine query events but not connection events."""
    with override_settings(CONNDIAG={"LOG_QUERIES": False, "METRICS": False}):
        connections["mysql"].close()
        Item.objects.using("mysql").count()
    assert not of(events, ev.QUERY)
    assert of(events, ev.CONNECTION_OPENED)


def test_sampling_drops_routine_events(events):
    """QUERY_LOG_SAMPLE_RATE=0 drops every routine event."""
    with override_settings(CONNDIAG={"QUERY_LOG_SAMPLE_RATE": 0.0, "METRICS": False}):
        for _ in range(5):
            Item.objects.using("default").count()
    assert not of(events, ev.QUERY)


def test_level_filtering_follows_structlog_configuration():
    """A filtering bound logger above the query level turns routine events off cheaply."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        assert ev.level_enabled("conndiag", logging.DEBUG) is False
        assert ev.level_enabled("conndiag", logging.INFO) is True
    finally:
        structlog.reset_defaults()


def test_stdlib_integration_uses_the_logger_level():
    """With structlog.stdlib, the stdlib logger's level decides."""
    structlog.configure(
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
    )
    logger = logging.getLogger("conndiag")
    old = logger.level
    logger.setLevel(logging.WARNING)
    try:
        assert ev.level_enabled("conndiag", logging.DEBUG) is False
        logger.setLevel(logging.DEBUG)
        assert ev.level_enabled("conndiag", logging.DEBUG) is True
    finally:
        logger.setLevel(old)
        structlog.reset_defaults()


def test_every_event_name_is_namespaced():
    """Event names are stable and all start with ``conndiag.``."""
    assert all(name.startswith("conndiag.") for name in ev.EVENTS)
    assert len(set(ev.EVENTS)) == len(ev.EVENTS)


def test_connection_thread_is_the_openers_name_when_it_connected(events):
    """A server renames its worker's thread after forking it (uWSGI's "uWSGIWorker1Core0"
    for the thread that was the master's): ``connection_thread`` keeps the name the opening
    thread had when it connected, while ``thread_name`` is the running thread's name now."""
    import threading

    def work() -> None:
        with connections["mysql"].cursor() as cursor:
            cursor.execute("SELECT 1")
            threading.current_thread().name = "renamed-later"
            cursor.execute("SELECT 2")
        connections["mysql"].close()

    t = threading.Thread(target=work, name="the-opener")
    t.start()
    t.join()
    queries = [e for e in of(events, "conndiag.query") if e["thread_name"] == "renamed-later"]
    assert queries
    assert {e["connection_thread"] for e in queries} == {"the-opener"}
