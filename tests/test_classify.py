"""Every row of the core issue's two lists, through real request handling.

No false alarms: sync views under WSGI (threaded or not), async views with the async ORM
under ASGI, management commands, the test runner, a worker that serves no requests. True
alarms: a ``threading.Thread`` started from a view, ``ThreadPoolExecutor.submit`` from a
view, a thread that keeps running after its response. (Forks: ``tests/test_fork.py``.)
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from asgiref.sync import async_to_sync
from django.core.management import call_command
from django.db import connections
from django.test import Client

import conndiag
from conndiag import classify, threads
from tests.conftest import of
from tests.handlers import asgi_get, http_json, threaded_wsgi_server, wsgi_get, wsgi_json
from tests.testapp.models import Item

ALIASES = ["default", "mysql"]
pytestmark = pytest.mark.django_db(transaction=True, databases=ALIASES)


def contexts(events: list[dict], name: str = "conndiag.query") -> set[str]:
    return {e["context"] for e in of(events, name)}


@pytest.fixture(params=ALIASES)
def alias(request: pytest.FixtureRequest) -> str:
    if request.param == "mysql":
        request.applymarker(pytest.mark.mysql)
    return str(request.param)


def test_sync_view_under_wsgi_is_request(alias, events):
    """A sync view's queries through the WSGI handler are ``request``, never refused."""
    assert wsgi_json("/sync/", f"db={alias}")["count"] == 1
    assert contexts(events) == {"request"}
    assert not of(events, "conndiag.query.refused")
    assert not of(events, "conndiag.query.flagged")


def test_sync_view_under_threaded_wsgi_server_is_request(alias, events):
    """Under a real threaded WSGI server (a thread per request) queries are ``request``."""
    with threaded_wsgi_server() as base:
        for _ in range(3):
            http_json(f"{base}/sync/?db={alias}")
    assert contexts(events) == {"request"}
    views = {e["view"] for e in of(events, "conndiag.query")}
    assert views == {"sync"}


def test_thread_started_from_view_is_refused(alias, events):
    """A ``threading.Thread`` started from a view is ``detached``: its query raises first."""
    assert wsgi_json("/thread/", f"db={alias}") == {"thread": "refused:detached"}
    refused = of(events, "conndiag.query.refused")
    assert len(refused) == 1
    assert refused[0]["request_path"] == "/thread/"
    assert refused[0]["view"] == "thread"
    assert "wait_timeout" in refused[0]["message"]
    assert Item.objects.using(alias).count() == 0  # the query never reached the database


def test_executor_task_submitted_from_view_is_refused(alias, events):
    """``ThreadPoolExecutor.submit`` from a view is ``detached`` and names the request."""
    assert wsgi_json("/executor/", f"db={alias}") == {"task": "refused:detached"}
    (refused,) = of(events, "conndiag.query.refused")
    assert refused["request_path"] == "/executor/"
    assert refused["context"] == "detached"


def test_pool_worker_started_by_a_request_serves_background_tasks_later(events):
    """A pool worker thread created by a view's submit does not taint later tasks."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        wsgi_get("/nothing/")
        # the first submit happens from a background thread: the worker is not detached.
        assert pool.submit(lambda: Item.objects.count()).result() == 0
    finally:
        pool.shutdown()
    assert contexts(events) == {"background"}


def test_escape_hatch_in_a_thread_started_from_a_view(alias, events):
    """Inside ``background_db_work()`` a view's thread runs its queries, logged as allowed."""
    assert wsgi_json("/hatch/", f"db={alias}") == {"thread": "ok"}
    queries = [e for e in of(events, "conndiag.query") if e["thread_name"] != "MainThread"]
    assert queries
    assert all(e["context"] == "background" and e["allowed"] for e in queries)
    if alias == "mysql":  # Django never closes an in-memory SQLite database
        closed = of(events, "conndiag.connection.closed")
        reasons = [e["reason"] for e in closed if e["connection_thread"] != "MainThread"]
        # Django 6.0 may first open and close a temporary connection (server version): that
        # close is Django's own ("explicit"); the hatch closes the connection it still holds.
        assert reasons[-1] == "background_work"
        assert set(reasons) <= {"explicit", "background_work"}


def test_thread_outliving_its_response_names_the_returned_request(alias, events):
    """A thread still running after its response is refused, saying how long ago it returned."""
    go = threading.Event()
    outcome: list[str] = []

    def work() -> None:
        go.wait(10)
        try:
            Item.objects.using(alias).create(name="late")
            outcome.append("ran")
        except conndiag.DetachedQueryError as exc:
            outcome.append(f"refused after {exc.request_returned_ago:.3f}")

    holder: list[threading.Thread] = []

    def start_thread() -> None:
        t = threading.Thread(target=work)
        t.start()
        holder.append(t)

    from tests.testapp import views

    views.START_HOOK = start_thread
    try:
        wsgi_get("/nothing/")
    finally:
        views.START_HOOK = None
    go.set()
    holder[0].join(10)
    assert outcome and outcome[0].startswith("refused after ")
    (refused,) = of(events, "conndiag.query.refused")
    assert refused["request_returned_s"] is not None
    assert refused["request_path"] == "/nothing/"


def test_async_view_under_asgi_is_request(alias, events):
    """Async views using ``acreate``/``aget`` under ASGI are ``request``: no false alarm."""
    status, body = async_to_sync(asgi_get)("/async/", f"db={alias}")
    assert status == 200, body
    assert contexts(events) == {"request"}
    assert {e["request_path"] for e in of(events, "conndiag.query")} == {"/async/"}


def test_asyncio_to_thread_is_cross_thread_and_only_logged(alias, events):
    """``asyncio.to_thread`` work during a live request is ``cross_thread``: logged, runs."""
    status, body = async_to_sync(asgi_get)("/async-to-thread/", f"db={alias}")
    assert status == 200, body
    assert body == b'{"thread": "ok"}'
    flagged = of(events, "conndiag.query.flagged")
    assert flagged and {e["context"] for e in flagged} == {"cross_thread"}


def test_sync_view_awaiting_to_thread_work_is_cross_thread_not_detached(alias, events):
    """A WSGI view awaiting ORM work through ``async_to_sync`` + ``asyncio.to_thread`` (or
    ``sync_to_async(thread_sensitive=False)``) runs it: the request waits for it, so it is
    ``cross_thread`` (logged), never refused as ``detached`` (HTTP 500 before)."""
    assert wsgi_json("/sync-awaits-to-thread/", f"db={alias}") == {"threads": ["ok", "ok"]}
    assert not of(events, "conndiag.query.refused")
    flagged = of(events, "conndiag.query.flagged")
    # Two writes, on two worker threads; Django 6.0+ may first read the server's version on
    # a temporary connection of the same thread: one more (cross_thread) query on each
    # thread whose connection has not read it yet (whether the executor's threads are new
    # depends on the tests before).
    assert 2 <= len(flagged) <= 4
    assert {e["context"] for e in flagged} == {"cross_thread"}
    assert {e["request_path"] for e in flagged} == {"/sync-awaits-to-thread/"}
    assert Item.objects.using(alias).count() == 2


def test_thread_started_from_async_to_sync_code_is_still_detached(alias, events):
    """A plain thread started by the async code of a WSGI view (nothing awaits it) is still
    ``detached``: only awaited executor work is let through."""
    from asgiref.sync import async_to_sync as a2s

    from tests.testapp import views

    outcome: list[str] = []

    async def start_thread() -> None:
        t = threading.Thread(target=lambda: outcome.append(views._write(alias)))
        t.start()
        t.join()

    views.START_HOOK = a2s(start_thread)
    try:
        wsgi_get("/nothing/")
    finally:
        views.START_HOOK = None
    assert outcome == ["refused:detached"]


def test_to_thread_work_of_a_thread_a_view_started_is_detached(alias, events):
    """``async_to_sync`` + ``asyncio.to_thread`` inside a thread a view started (nothing
    carries the request in the context there) hands the thread's origin on: ``detached``."""
    import asyncio

    from asgiref.sync import async_to_sync as a2s

    from tests.testapp import views

    outcome: list[str] = []

    async def work() -> str:
        return await asyncio.to_thread(views._write, alias)

    def start_thread() -> None:
        t = threading.Thread(target=lambda: outcome.append(a2s(work)()))
        t.start()
        t.join()

    views.START_HOOK = start_thread
    try:
        wsgi_get("/nothing/")
    finally:
        views.START_HOOK = None
    assert outcome == ["refused:detached"]


async def _overlapping_asgi_requests(alias: str) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    """Request A starts, then B; A finishes while B is still in its view; then B writes
    through ``asyncio.to_thread``. Returns both responses."""
    import asyncio

    from tests.testapp import views

    views.GATES.update(a=asyncio.Event(), b=asyncio.Event())
    views.ENTERED.clear()

    async def entered(name: str) -> None:
        for _ in range(1000):
            if name in views.ENTERED:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"request {name} never reached its view")

    try:
        a = asyncio.ensure_future(asgi_get("/gate/", f"gate=a&db={alias}"))
        await entered("a")
        b = asyncio.ensure_future(asgi_get("/gate/", f"gate=b&write=1&db={alias}"))
        await entered("b")
        views.GATES["a"].set()
        first = await a  # A's request_finished has run: the communicator waited for the app
        views.GATES["b"].set()
        return first, await b
    finally:
        views.GATES.clear()


def test_overlapping_asgi_requests_finish_only_themselves(alias, events):
    """Concurrent ASGI requests (Django 3.2 runs every request's sync code, signals included,
    on one shared thread): a request finishing marks only itself finished, so a request that
    is still running keeps its ``to_thread`` work ``cross_thread``, never ``detached``."""
    first, second = async_to_sync(_overlapping_asgi_requests)(alias)
    assert first == (200, b'{"thread": "none"}')
    assert second == (200, b'{"thread": "ok"}')
    assert not of(events, "conndiag.query.refused")
    # B's one write; Django 6.0+ may first read the server's version on a temporary
    # connection of the same thread, one more query of B's.
    flagged = of(events, "conndiag.query.flagged")
    assert 1 <= len(flagged) <= 2
    assert {e["context"] for e in flagged} == {"cross_thread"}
    assert {e["request_returned_s"] for e in flagged} == {None}  # B was live when it wrote


def test_management_command_and_migrations_are_background(events):
    """Management commands (here ``migrate``, which queries) are ``background``."""
    call_command("migrate", verbosity=0, database="default")
    assert contexts(events) <= {"background"}
    assert not of(events, "conndiag.query.refused")


def test_test_client_then_test_code_is_background(alias, events):
    """Test code querying between test-client requests is ``background``, not detached."""
    client = Client()
    assert client.get(f"/sync/?db={alias}").status_code == 200
    Item.objects.using(alias).create(name="between")
    assert client.get(f"/sync/?db={alias}").status_code == 200
    by_view = {(e["context"], e["view"]) for e in of(events, "conndiag.query")}
    assert ("background", None) in by_view
    assert ("request", "sync") in by_view
    assert not of(events, "conndiag.query.refused")


def test_worker_process_threads_are_background(alias, events):
    """A worker that serves no requests may use threads and pools freely: ``background``."""
    results: list[int] = []
    t = threading.Thread(target=lambda: results.append(Item.objects.using(alias).count()))
    t.start()
    t.join()
    with ThreadPoolExecutor(max_workers=2) as pool:
        assert pool.submit(Item.objects.using(alias).count).result() == 0
    assert results == [0]
    assert contexts(events) == {"background"}
    connections.close_all()


def test_classify_directly_covers_each_context():
    """The classifier's table, checked on hand-made thread states."""
    from conndiag.scope import RequestScope, enter, leave

    info = threads.ThreadInfo()
    assert classify.classify(None, info) == ("background", None)
    rs = RequestScope(info)
    info.scope = rs
    assert classify.classify(None, info) == ("request", rs)
    other = threads.ThreadInfo()
    token = enter(rs)
    try:
        assert classify.classify(None, other) == ("cross_thread", rs)
        rs.finish()
        assert classify.classify(None, other) == ("detached", rs)
        other.allow_depth = 1
        assert classify.classify(None, other) == ("background", None)
    finally:
        leave(token)
