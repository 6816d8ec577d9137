"""Thread identity survives ident reuse; origins follow threads and executor tasks."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from conndiag import threads
from conndiag.scope import RequestScope


def test_identity_survives_ident_reuse():
    """Threads run one after another reuse idents (CPython recycles them), never a ThreadInfo."""
    infos: list[threads.ThreadInfo] = []
    for _ in range(50):
        t = threading.Thread(target=lambda: infos.append(threads.current()))
        t.start()
        t.join()
    assert len({i.ident for i in infos}) < len(infos)  # idents were recycled ...
    assert len({id(i) for i in infos}) == len(infos)  # ... thread identities were not


def test_thread_started_on_a_request_thread_remembers_the_request():
    """Thread.start on a thread serving a request records that request as the origin."""
    me = threads.current()
    rs = RequestScope(me)
    me.scope = rs
    seen: list[object] = []
    try:
        t = threading.Thread(target=lambda: seen.append(threads.current().origin))
        t.start()
        t.join()
    finally:
        me.scope = None
    assert seen == [rs]


def test_executor_task_carries_origin_but_worker_does_not():
    """A task submitted from a request runs with its origin; the worker thread itself has none."""
    me = threads.current()
    rs = RequestScope(me)
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        me.scope = rs
        in_task = pool.submit(lambda: (threads.current().task_origin, threads.current().origin))
        me.scope = None
        assert in_task.result() == (rs, None)
        assert pool.submit(lambda: threads.current().task_origin).result() is None
    finally:
        me.scope = None
        pool.shutdown()


def test_escape_hatch_still_hands_off_the_origin():
    """Threads and tasks started inside background_db_work() keep their request origin: the
    hatch covers (and manages the connections of) its own thread only."""
    me = threads.current()
    rs = me.scope = RequestScope(me)
    me.allow_depth = 1
    try:
        assert me.handed_off_origin() is rs
    finally:
        me.scope = None
        me.allow_depth = 0


def _origin_of_a_thread_started_now() -> object:
    seen: list[object] = []
    t = threading.Thread(target=lambda: seen.append(threads.current().origin))
    t.start()
    t.join()
    return seen[0]


def _task_origin_of_a_task_submitted_now() -> object:
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: threads.current().task_origin).result()


def test_uninstall_keeps_patches_installed_after_ours():
    """A library that patches Thread.start / submit after conndiag (sentry-sdk's and
    OpenTelemetry's threading integrations do) keeps its patch when tracking is turned off;
    conndiag's hook stays in the chain but inert, and turning tracking on again revives it."""
    threads.install_tracking()
    ours_start, ours_submit = threading.Thread.start, ThreadPoolExecutor.submit
    calls: list[str] = []

    def later_start(self: threading.Thread) -> None:
        calls.append("start")
        ours_start(self)

    def later_submit(self: ThreadPoolExecutor, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append("submit")
        return ours_submit(self, fn, *args, **kwargs)

    threading.Thread.start = later_start  # type: ignore[method-assign]
    ThreadPoolExecutor.submit = later_submit  # type: ignore[method-assign]
    me = threads.current()
    rs = RequestScope(me)
    try:
        threads.uninstall_tracking()
        assert threading.Thread.start is later_start
        assert ThreadPoolExecutor.submit is later_submit
        me.scope = rs
        assert _origin_of_a_thread_started_now() is None  # inert: no origin recorded
        assert _task_origin_of_a_task_submitted_now() is None
        assert calls.count("start") >= 1 and calls.count("submit") == 1
        threads.install_tracking()
        assert threading.Thread.start is later_start  # not wrapped a second time
        assert _origin_of_a_thread_started_now() is rs
        assert _task_origin_of_a_task_submitted_now() is rs
    finally:
        me.scope = None
        threading.Thread.start = ours_start  # type: ignore[method-assign]
        ThreadPoolExecutor.submit = ours_submit  # type: ignore[method-assign]
        threads.install_tracking()


def test_hand_off_names_the_request_of_the_context_on_a_shared_thread():
    """Two live requests on one thread (Django 3.2's ASGI sync thread): work handed off while
    request A's code runs belongs to A (the context's request), not to B, the last started."""
    from conndiag import scope

    me = threads.current()
    a, b = RequestScope(me), RequestScope(me)
    me.scope = b
    token = scope.enter(a)
    try:
        assert me.handed_off_origin() is a
        a.finish()
        assert me.handed_off_origin() is b  # a finished request is never handed on
    finally:
        scope.leave(token)
        me.scope = None
