"""conndiag.testing: the watch behind the pytest plugin, Django's runner and
``assert_no_unsafe_queries()``, in this process (the pytest plugin is off for this suite;
see ``tests/test_pytest_plugin.py`` for it and for the runner under ``--parallel``).
"""

from __future__ import annotations

import os
import pickle
import threading
import time
import unittest
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection
from django.test import Client

from conndiag import runtime, scope
from conndiag.exceptions import ConnDiagError, UnsafeQueriesFound
from conndiag.testing import (
    ALL_CONTEXTS,
    Event,
    allow_unsafe_queries,
    allowed_for,
    assert_no_unsafe_queries,
    check_contexts,
    get_watch,
)

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_refusal_in_a_view_s_thread_fails_the_block_with_its_full_message():
    """The view's thread is refused and the view catches it; the block still fails, saying
    which thread, which request, why it breaks and the fix."""
    with pytest.raises(UnsafeQueriesFound) as info:
        with assert_no_unsafe_queries():
            response = Client().get("/thread/")
            assert response.json() == {"thread": "refused:detached"}
    message = str(info.value)
    assert "refused 1 query during the assert_no_unsafe_queries() block" in message
    assert "GET /thread/" in message
    assert "Django closes and recycles database connections only on the request thread" in message
    assert "Fix: run the work synchronously in the view" in message
    assert "assert_no_unsafe_queries(allow=['detached'])" in message
    [event] = info.value.events
    assert (event.name, event.context, event.outcome) == (
        "conndiag.query.refused",
        "detached",
        "refused",
    )
    assert isinstance(info.value, AssertionError)
    assert isinstance(info.value, ConnDiagError)


def test_safe_work_passes_and_the_events_are_there():
    """A view that queries on its own thread passes; the block's events show its queries."""
    with assert_no_unsafe_queries() as events:
        assert Client().get("/sync/").status_code == 200
    assert {e.context for e in events.queries} == {"request"}
    assert not events.refused


def test_allowed_context_passes():
    """``allow=`` names the contexts that do not fail the block; they are still recorded."""
    with assert_no_unsafe_queries(allow=["detached"]) as events:
        Client().get("/executor/")
    assert [e.context for e in events.refused] == ["detached"]
    assert events.refused[0].allowed


def test_unknown_context_is_refused_at_once():
    """A typo in a context name is an error naming what is allowed, not a silent pass."""
    with pytest.raises(ValueError, match="unknown context 'detatched'; expected some of"):
        assert_no_unsafe_queries(allow=["detatched"])


def test_flagged_query_fails_too():
    """A context whose policy is ``log`` (the query runs) fails the block as "flagged"."""
    from django.test import override_settings

    with override_settings(CONNDIAG={"POLICY": {"detached": "log"}}):
        with pytest.raises(UnsafeQueriesFound, match="flagged 1 query") as info:
            with assert_no_unsafe_queries():
                assert Client().get("/thread/").json() == {"thread": "ok"}
    assert info.value.events[0].outcome == "flagged"


def test_work_still_running_at_the_end_of_the_block_is_awaited_and_attributed():
    """The block waits for the threads started inside it: a thread that queries after the
    view returned (and after the block's body ended) still fails the block."""

    def later() -> None:
        time.sleep(0.3)
        try:
            connection.cursor().execute("SELECT 1")
        except Exception:
            pass
        finally:
            connection.close()

    def view_like() -> None:
        from conndiag import scope, threads

        # a request on this thread, which starts a thread and "returns"
        scope.on_request_started(None)
        try:
            threading.Thread(target=later, name="late-worker").start()
        finally:
            scope.on_request_finished(None)
        assert threads.current().scope is None

    with pytest.raises(UnsafeQueriesFound, match="'late-worker'"):
        with assert_no_unsafe_queries(wait=5):
            view_like()


def test_a_pool_task_belongs_to_the_block_that_submitted_it_not_the_one_that_started_the_pool():
    """Executor threads started in one block serve the next: each task is its submitter's."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        with assert_no_unsafe_queries() as first:
            pool.submit(lambda: None).result()  # starts the pool's thread in this block
        with pytest.raises(UnsafeQueriesFound) as info:
            with assert_no_unsafe_queries():
                Client().get("/executor/")
        assert not first.refused
        assert info.value.events[0].owner == "the assert_no_unsafe_queries() block"
    finally:
        pool.shutdown()


def test_decorator_form():
    """It decorates a function too (a fresh watch per call)."""

    @assert_no_unsafe_queries()
    def scenario() -> None:
        Client().get("/thread/")

    with pytest.raises(UnsafeQueriesFound):
        scenario()


def test_the_listener_is_there_only_while_watching():
    """Nothing is added to the runtime (or to Thread.start) outside a watch: the hot path
    is as without it."""
    watch = get_watch()
    original_start = threading.Thread.start
    assert watch.listener not in runtime.get().recorders
    with assert_no_unsafe_queries():
        assert watch.listener in runtime.get().recorders
        assert threading.Thread.start is not original_start
        runtime.reset()  # a settings change rebuilds the runtime: the listener stays
        assert watch.listener in runtime.get().recorders
    assert watch.listener not in runtime.get().recorders
    assert threading.Thread.start is original_start
    assert watch.directory is None


def test_the_error_pickles_with_its_events():
    """Django's --parallel workers send it to the parent: it must survive pickling."""
    event = Event(
        name="conndiag.query.refused",
        owner="t",
        context="detached",
        action="raise",
        alias="default",
        vendor="sqlite",
        thread_name="x",
        pid=1,
        message="m",
    )
    exc = pickle.loads(pickle.dumps(UnsafeQueriesFound("msg", [event])))
    assert str(exc) == "msg"
    assert exc.events == (event,)
    assert Event.from_json(event.to_json()) == event


def test_allow_unsafe_queries_on_a_method_or_a_class():
    """The unittest opt-out, by method or class; no argument allows every context."""

    @allow_unsafe_queries("cross_thread")
    class Case:
        def test_a(self) -> None: ...

        @allow_unsafe_queries()
        def test_b(self) -> None: ...

    assert allowed_for(Case(), "test_a") == {"cross_thread"}
    assert allowed_for(Case(), "test_b") == ALL_CONTEXTS
    assert allowed_for(object(), "test_c") == frozenset()
    with pytest.raises(ValueError, match="allow_unsafe_queries"):
        allow_unsafe_queries("nope")
    assert check_contexts(["forked"], "x") == {"forked"}


def test_a_forked_process_reports_its_refusals_to_the_block():
    """A process forked inside the block, whose view's thread is refused: the child writes the
    refusal to the watch's directory and the parent's block fails with it (child's pid)."""
    with pytest.raises(UnsafeQueriesFound) as info:
        with assert_no_unsafe_queries():
            with warnings.catch_warnings():
                # Python 3.12 warns about fork() with threads; the child only runs the request.
                warnings.simplefilter("ignore", DeprecationWarning)
                child = os.fork()
            if child == 0:
                code = 1
                try:
                    ok = Client().get("/thread/").json() == {"thread": "refused:detached"}
                    code = 0 if ok else 2
                finally:
                    os._exit(code)
            _, status = os.waitpid(child, 0)
            assert os.waitstatus_to_exitcode(status) == 0
    [event] = info.value.events
    assert event.pid == child
    assert "GET /thread/" in (event.message or "")


class _Cases(unittest.TestCase):
    """Run by DiscoverRunner below, not by pytest."""

    __test__ = False

    def test_a_leaves_a_thread(self) -> None:
        def late() -> None:
            time.sleep(0.4)
            try:
                connection.cursor().execute("SELECT 1")
            except Exception:
                pass
            finally:
                connection.close()

        scope.on_request_started(None)  # as a view would: start a thread, return
        try:
            threading.Thread(target=late, name="late-thread").start()
        finally:
            scope.on_request_finished(None)

    def test_b_innocent(self) -> None:
        time.sleep(0.8)

    def test_c_refused(self) -> None:
        assert Client().get("/thread/").json() == {"thread": "refused:detached"}

    @unittest.expectedFailure
    def test_d_expected(self) -> None:
        Client().get("/executor/")

    @allow_unsafe_queries("detached")
    def test_e_allowed(self) -> None:
        Client().get("/thread/")

    def test_f_safe(self) -> None:
        assert Client().get("/sync/").status_code == 200


def test_discover_runner_fails_refused_tests_and_reports_late_work_against_its_test():
    """Django's runner, in this process: the refused test fails with the message, an
    expectedFailure test counts as expected, allowed and safe tests pass, and the refusal in
    the thread test_a left running is an error of test_a (found when test_c started), not a
    failure of test_b, which ran while it happened."""
    from conndiag.testing import DiscoverRunner

    runner = DiscoverRunner(verbosity=0, conndiag_wait=0.2)
    names = [n for n in dir(_Cases) if n.startswith("test_")]
    suite = unittest.TestSuite(_Cases(n) for n in names)
    result = runner.run_suite(suite)
    assert result.testsRun == 6
    [(failed, text)] = result.failures
    assert failed.id().endswith("test_c_refused")
    assert "conndiag refused 1 query during" in text
    assert "@conndiag.testing.allow_unsafe_queries('detached')" in text
    assert len(result.expectedFailures) == 1
    [(late, late_text)] = result.errors
    assert late.id().endswith("test_a_leaves_a_thread")
    assert "still running when it ended (found while" in late_text
    assert "test_c_refused ran)" in late_text
    assert "'late-thread'" in late_text
    assert not result.unexpectedSuccesses
