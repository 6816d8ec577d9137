"""Refusal messages say what happened, why it breaks and how to fix it."""

from __future__ import annotations

from conndiag import policy, threads
from conndiag.exceptions import (
    ConnDiagError,
    CrossThreadQueryError,
    DetachedQueryError,
    ForkedConnectionError,
    UnsafeQueryError,
)
from conndiag.scope import RequestScope


def _origin() -> RequestScope:
    rs = RequestScope(threads.ThreadInfo())
    rs.method, rs.path, rs.view = "POST", "/ops/trigger-job", "ops-trigger-job"
    rs.finish()
    return rs


def test_detached_refusal_names_request_thread_and_fix():
    """The detached error names the request, the thread, the cause and the three fixes."""
    exc = policy.refusal("detached", "default", "mysql", None, threads.current(), _origin())
    assert isinstance(exc, DetachedQueryError)
    assert isinstance(exc, UnsafeQueryError) and isinstance(exc, ConnDiagError)
    text = str(exc)
    for needle in (
        "POST /ops/trigger-job",
        "ops-trigger-job",
        "returned",
        "wait_timeout",
        "2006",
        "task queue",
        "conndiag.background_db_work()",
        "'log'",
    ):
        assert needle in text, needle
    assert exc.request_path == "/ops/trigger-job"
    assert exc.thread_name == threads.current().name


def test_forked_refusal_explains_fork():
    """The forked error explains inheritance across fork and the server settings to fix."""
    exc = policy.refusal("forked", "default", "mysql", None, threads.current(), None)
    assert isinstance(exc, ForkedConnectionError)
    assert "fork()" in str(exc) and "lazy-apps" in str(exc) and "--preload" in str(exc)


def test_cross_thread_refusal_points_at_thread_sensitive():
    """The cross_thread error points at sync_to_async(thread_sensitive=True)."""
    exc = policy.refusal("cross_thread", "default", "sqlite", None, threads.current(), _origin())
    assert isinstance(exc, CrossThreadQueryError)
    assert "thread_sensitive=True" in str(exc)
