"""The escape hatch: allowed, nests, closes stale connections before and its own after."""

from __future__ import annotations

import threading

import pytest
from django.db import connections

import conndiag
from conndiag import threads
from conndiag.state import state_of
from tests.conftest import of
from tests.testapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "mysql"])


def _detached_thread(target) -> None:
    """Run ``target`` in a thread whose origin is a finished request."""
    from conndiag.scope import RequestScope

    rs = RequestScope(threads.current())
    rs.finish()

    def run() -> None:
        threads.current().origin = rs
        target()

    t = threading.Thread(target=run)
    t.start()
    t.join()


def test_queries_inside_are_background_and_allowed(events):
    """In a detached thread, queries inside the hatch run and are logged as allowed."""
    results: list[int] = []
    _detached_thread(lambda: results.append(_count_in_hatch()))
    assert results == [0]
    queries = of(events, "conndiag.query")
    assert queries and all(q["context"] == "background" and q["allowed"] for q in queries)


def _count_in_hatch() -> int:
    with conndiag.background_db_work():
        return Item.objects.using("mysql").count()


def test_nesting_manages_connections_only_at_the_outermost_level(events):
    """Inner blocks do not close; the outermost closes what was opened inside."""
    db = connections["mysql"]
    db.close()
    with conndiag.background_db_work():
        with conndiag.background_db_work():
            Item.objects.using("mysql").count()
        assert db.connection is not None
        assert threads.current().allow_depth == 1
    assert db.connection is None
    assert threads.current().allow_depth == 0
    assert [e["reason"] for e in of(events, "conndiag.connection.closed")] == ["background_work"]


def test_connections_opened_before_are_kept_when_fresh(events):
    """A healthy connection opened before the block is not closed by it."""
    db = connections["mysql"]
    db.settings_dict["CONN_MAX_AGE"] = None
    try:
        Item.objects.using("mysql").count()
        before = state_of(db)
        with conndiag.background_db_work():
            Item.objects.using("mysql").count()
        assert state_of(db) is before
        assert db.connection is not None
    finally:
        db.settings_dict["CONN_MAX_AGE"] = 0
        db.close()


def test_stale_connection_is_closed_on_entry(events):
    """A connection idle past the server's wait_timeout is replaced on entry."""
    db = connections["mysql"]
    db.settings_dict["CONN_MAX_AGE"] = None
    try:
        Item.objects.using("mysql").count()
        stale = state_of(db)
        stale.wait_timeout = 0.0  # every connection is past a zero timeout
        with conndiag.background_db_work():
            assert db.connection is None
            Item.objects.using("mysql").count()
        assert stale.closed and stale.close_reason == "background_work"
    finally:
        db.settings_dict["CONN_MAX_AGE"] = 0
        db.close()


def test_decorator_form():
    """background_db_work() also works as a decorator."""

    @conndiag.background_db_work()
    def work() -> int:
        assert threads.current().allow_depth == 1
        return Item.objects.using("default").count()

    assert work() == 0
    assert threads.current().allow_depth == 0


def test_one_decorated_function_run_by_many_threads_at_once(events):
    """A decorated function run concurrently by pool threads: each block keeps its own
    thread's earlier connection open (the instance keeps no per-call state)."""
    from concurrent.futures import ThreadPoolExecutor

    barrier = threading.Barrier(4)

    @conndiag.background_db_work()
    def hatch() -> None:
        barrier.wait(10)  # all four blocks are open at once

    def task() -> bool:
        db = connections["mysql"]
        Item.objects.using("mysql").count()  # a connection of this thread, opened before
        before = state_of(db)
        hatch()
        kept = db.connection is not None and state_of(db) is before
        db.close()
        return kept

    db = connections["mysql"]
    db.settings_dict["CONN_MAX_AGE"] = None  # fresh connections are not recycled on entry
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = [f.result(20) for f in [pool.submit(task) for _ in range(4)]]
    finally:
        db.settings_dict["CONN_MAX_AGE"] = 0
    assert results == [True, True, True, True]
    reasons = [e["reason"] for e in of(events, "conndiag.connection.closed")]
    assert "background_work" not in reasons
