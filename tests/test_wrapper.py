"""The execute wrapper: refuses before the database, times and records, never breaks queries."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import OperationalError, connections
from django.test import override_settings

import conndiag
from conndiag import runtime
from conndiag.state import state_of
from tests.conftest import of
from tests.testapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "mysql"])


def test_query_updates_connection_state():
    """Each query increments the count and the last-used time of its connection."""
    Item.objects.using("mysql").count()
    state = state_of(connections["mysql"])
    before = state.queries
    Item.objects.using("mysql").count()
    assert state.queries == before + 1
    assert state.idle() < 1


def test_refusal_happens_before_the_database(events):
    """A refused query never reaches the server (nothing written), and is reported."""
    from conndiag.scope import RequestScope
    from conndiag.threads import current

    info = current()
    rs = RequestScope(info)
    rs.method, rs.path = "POST", "/ops/trigger-job"
    rs.finish()
    info.origin = rs
    try:
        with pytest.raises(conndiag.DetachedQueryError) as caught:
            Item.objects.using("mysql").create(name="never")
    finally:
        info.origin = None
    exc = caught.value
    assert exc.alias == "mysql"
    assert exc.request_path == "/ops/trigger-job"
    assert exc.request_returned_ago is not None
    assert "POST /ops/trigger-job" in str(exc)
    assert "conndiag.background_db_work()" in str(exc)
    assert Item.objects.using("mysql").count() == 0
    (refused,) = of(events, "conndiag.query.refused")
    assert refused["outcome"] == "refused"
    assert refused["duration_s"] is None


def test_the_refusal_event_and_the_exception_say_the_same(events):
    """The refusal's words are computed once: when the originating request returns while
    the refusal is being recorded (another thread finishing it), the event's ``message`` and
    the exception still agree (both "still running" here), instead of one saying "still
    running" and the other "which returned 0.0 s ago"."""
    from conndiag.records import Recorder
    from conndiag.scope import RequestScope
    from conndiag.threads import current

    info = current()
    rs = RequestScope(info)
    rs.method, rs.path = "POST", "/ops/trigger-job"
    info.origin = rs

    class FinishesTheRequest(Recorder):
        def query(self, q):
            rs.finish()  # the request returns between the event and the raise

    listener = FinishesTheRequest()
    runtime.add_listener(listener)
    try:
        with pytest.raises(conndiag.DetachedQueryError) as caught:
            Item.objects.using("mysql").create(name="never")
    finally:
        info.origin = None
        runtime.remove_listener(listener)
    (refused,) = of(events, "conndiag.query.refused")
    assert "still running" in refused["message"]
    words = str(caught.value).removeprefix("conndiag refused ")
    assert refused["message"].endswith(words)  # the stdlib backend prefixes the event name


def test_log_policy_runs_the_query_and_warns(events):
    """With POLICY detached='log' the query runs and a flagged warning is emitted."""
    from conndiag.scope import RequestScope
    from conndiag.threads import current

    info = current()
    rs = RequestScope(info)
    rs.finish()
    info.origin = rs
    try:
        with override_settings(CONNDIAG={"POLICY": {"detached": "log"}}):
            Item.objects.using("mysql").create(name="allowed")
    finally:
        info.origin = None
    assert Item.objects.using("mysql").count() == 1
    assert {e["context"] for e in of(events, "conndiag.query.flagged")} == {"detached"}


def test_real_gone_away_is_diagnosed(events):
    """An idle connection past ``wait_timeout`` fails with 2006, diagnosed with its cause."""
    db = connections["mysql"]
    with db.cursor() as cursor:
        cursor.execute("SET SESSION wait_timeout=1")
    state_of(db).wait_timeout = 1.0
    time.sleep(2.2)
    with pytest.raises(OperationalError) as caught:
        Item.objects.using("mysql").count()
    assert caught.value.args[0] in (2006, 2013, 4031)
    db.close()
    (failed,) = of(events, "conndiag.query.failed")
    assert failed["error_class"] in ("gone_away", "lost", "server_timeout")
    assert "wait_timeout 1" in failed["cause"]


def test_executemany_generator_is_not_consumed():
    """executemany with a generator of params still inserts every row."""
    with connections["mysql"].cursor() as cursor:
        cursor.executemany(
            "INSERT INTO testapp_item (name) VALUES (%s)", ((f"g{i}",) for i in range(5))
        )
    assert Item.objects.using("mysql").count() == 5


def test_recorder_failure_never_breaks_the_query(events):
    """A recorder that raises is contained: the query returns, the failure is reported once."""

    class Broken:
        def query(self, q):
            raise RuntimeError("boom")

        def internal_error(self, component, error, first):
            seen.append((component, first))

    seen: list[tuple[str, bool]] = []
    rt = runtime.Runtime(runtime.get().config, [Broken()])
    runtime._runtime = rt
    assert Item.objects.using("default").count() == 0
    assert Item.objects.using("default").count() == 0
    assert rt.internal_errors == 2
    assert seen == [("Broken.query", True), ("Broken.query", False)]


def test_queries_from_many_threads_do_not_share_state():
    """Concurrent threads each get their own connection state."""
    states: list[object] = []
    lock = threading.Lock()

    def work() -> None:
        Item.objects.using("mysql").count()
        with lock:
            states.append(state_of(connections["mysql"]))
        connections["mysql"].close()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(s) for s in states}) == 4
