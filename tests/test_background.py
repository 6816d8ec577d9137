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


def test_async_function_decorated_runs_its_orm_work_inside_the_hatch(events):
    """``@background_db_work()`` on an ``async def`` covers the function's awaited ORM work
    (run by ``sync_to_async``): in a detached thread its queries run, ``background`` and
    allowed, and the connection it opened is closed when it returns."""
    from asgiref.sync import async_to_sync, sync_to_async

    @conndiag.background_db_work()
    async def work() -> int:
        return await sync_to_async(Item.objects.using("mysql").count)()

    results: list[int] = []
    _detached_thread(lambda: results.append(async_to_sync(work)()))
    assert results == [0]
    queries = of(events, "conndiag.query")
    assert queries and all(q["context"] == "background" and q["allowed"] for q in queries)
    assert not of(events, "conndiag.query.refused")
    assert [e["reason"] for e in of(events, "conndiag.connection.closed")] == ["background_work"]


def test_async_with_form(events):
    """``async with background_db_work():`` in async code works the same way, and nests."""
    from asgiref.sync import async_to_sync, sync_to_async

    async def work() -> int:
        async with conndiag.background_db_work():
            async with conndiag.background_db_work():
                count = await sync_to_async(Item.objects.using("mysql").count)()
            return count + await sync_to_async(Item.objects.using("mysql").count)()

    results: list[int] = []
    _detached_thread(lambda: results.append(async_to_sync(work)()))
    assert results == [0]
    assert not of(events, "conndiag.query.refused")
    assert [e["reason"] for e in of(events, "conndiag.connection.closed")] == ["background_work"]


def test_async_hatch_covers_only_its_own_thread_not_to_thread_work(events):
    """The async hatch covers the ORM work of its sync thread (where ``sync_to_async`` runs
    it), not work handed to other threads from inside it: one rule with threads and pools."""
    import asyncio

    from asgiref.sync import async_to_sync

    @conndiag.background_db_work()
    async def work() -> str:
        return await asyncio.to_thread(_write_or_refusal)

    results: list[str] = []
    _detached_thread(lambda: results.append(async_to_sync(work)()))
    assert results == ["refused:detached"]


def _write_or_refusal() -> str:
    try:
        Item.objects.using("mysql").count()
        return "ran"
    except conndiag.UnsafeQueryError as exc:
        return f"refused:{exc.context}"


def test_work_handed_off_inside_the_hatch_follows_one_rule(events):
    """Inside a hatch on a thread with a request origin, a ``Thread.start`` and a ``submit``
    are both ``detached`` (the hatch manages only its own thread's connections); a target
    wrapped in its own hatch runs as ``background``."""
    from concurrent.futures import ThreadPoolExecutor

    outcome: dict[str, str] = {}

    def run() -> None:
        with conndiag.background_db_work():
            t = threading.Thread(target=lambda: outcome.update(thread=_write_or_refusal()))
            t.start()
            t.join()
            with ThreadPoolExecutor(max_workers=1) as pool:
                outcome["submit"] = pool.submit(_write_or_refusal).result()
                wrapped = conndiag.background_db_work()(_write_or_refusal)
                outcome["wrapped"] = pool.submit(wrapped).result()

    _detached_thread(run)
    assert outcome == {"thread": "refused:detached", "submit": "refused:detached", "wrapped": "ran"}


def test_async_hatch_in_an_async_view_under_asgi(events):
    """Through the ASGI handler: an async view's ORM work inside ``async with
    background_db_work()`` is ``background`` and allowed, and the connection it opened is
    closed by the block (reason ``background_work``), not left to the request's end."""
    from asgiref.sync import async_to_sync

    from tests.handlers import asgi_get

    status, body = async_to_sync(asgi_get)("/async-hatch/", "db=mysql")
    assert (status, body) == (200, b'{"count": 0}')
    queries = of(events, "conndiag.query")
    assert queries and all(q["context"] == "background" and q["allowed"] for q in queries)
    # Django 3.2's shared sync thread may still hold an earlier test's connection, which
    # request_started closes (request_end) before the view runs.
    reasons = [e["reason"] for e in of(events, "conndiag.connection.closed")]
    assert reasons[-1] == "background_work"
    assert set(reasons) <= {"request_end", "background_work"}
