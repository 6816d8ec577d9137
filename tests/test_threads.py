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


def test_escape_hatch_hands_off_no_origin():
    """Threads started inside background_db_work() are not detached."""
    me = threads.current()
    me.scope = RequestScope(me)
    me.allow_depth = 1
    try:
        assert me.handed_off_origin() is None
    finally:
        me.scope = None
        me.allow_depth = 0


def test_tracking_can_be_removed_and_restored():
    """uninstall_tracking restores the stdlib methods; install_tracking hooks them again."""
    threads.uninstall_tracking()
    try:
        assert threading.Thread.start is threads._ORIGINAL_START
        assert ThreadPoolExecutor.submit is threads._ORIGINAL_SUBMIT
    finally:
        threads.install_tracking()
    assert threading.Thread.start is not threads._ORIGINAL_START
