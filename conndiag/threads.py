"""Thread identity and the origin of work.

Every thread gets one :class:`ThreadInfo`, created lazily in a ``threading.local``: its
identity is the object itself, so it survives ``threading.get_ident()`` reuse. When
thread tracking is installed, a ``threading.Thread`` started on a request thread, and a task
submitted to a ``ThreadPoolExecutor`` from one, remember that request (their *origin*),
which is how a later query on them is known to be ``detached``.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

from .contain import guard

if TYPE_CHECKING:
    from .scope import RequestScope

_T = TypeVar("_T")

_local = threading.local()

#: the request scope of the current context: set by :mod:`conndiag.scope` (which owns it),
#: defined here so hand-offs can read it without importing that module
request_var: ContextVar[RequestScope | None] = ContextVar("conndiag_request", default=None)


class AsyncBlock:
    """An ``async with background_db_work()`` block, in its task's context: it covers the
    queries of thread ``info`` (where its ORM work runs) while the context holds it."""

    __slots__ = ("depth", "info", "kept", "token")

    def __init__(self, info: ThreadInfo, kept: list[Any]) -> None:
        self.info = info
        #: connections the block found open on entry (it leaves them open)
        self.kept = kept
        #: nested blocks entered in the same context
        self.depth = 0
        self.token: Any = None


#: the async escape hatch of the current context, if any (see conndiag/background.py)
hatch_var: ContextVar[AsyncBlock | None] = ContextVar("conndiag_hatch", default=None)


def allowed(info: ThreadInfo) -> bool:
    """Whether a query on thread ``info`` runs inside :func:`conndiag.background_db_work`."""
    if info.allow_depth:
        return True
    block = hatch_var.get()
    return block is not None and block.info is info


class ThreadInfo:
    """What conndiag knows about one thread. One object per thread, for its whole life."""

    __slots__ = (
        "__weakref__",
        "allow_depth",
        "allow_kept",
        "ident",
        "in_submit",
        "native_id",
        "origin",
        "scope",
        "task_origin",
        "thread",
    )

    def __init__(self) -> None:
        thread = threading.current_thread()
        self.thread = thread
        self.ident = threading.get_ident()
        self.native_id = threading.get_native_id()
        #: the request that started this thread (set by the ``Thread.start`` hook).
        self.origin: RequestScope | None = getattr(thread, "_conndiag_origin", None)
        #: the request that submitted the executor task running now, if any.
        self.task_origin: RequestScope | None = None
        #: the live request whose ``request_started`` fired on this thread.
        self.scope: RequestScope | None = None
        #: depth of :func:`conndiag.background_db_work` blocks on this thread.
        self.allow_depth = 0
        #: connections the outermost such block found open (it leaves them open)
        self.allow_kept: list[Any] = []
        self.in_submit = 0

    @property
    def name(self) -> str:
        return self.thread.name

    def handed_off_origin(self) -> RequestScope | None:
        """The request that work handed off from this thread now would belong to."""
        # Not covered by an escape hatch entered here: the hatch manages this thread's
        # connections only (one rule for threads, pools and to_thread; see background.py).
        # The context knows which request is running when several share this thread
        # (Django 3.2's ASGI handler runs every request's sync code on one thread).
        rs = request_var.get()
        if rs is not None and rs.thread is self and rs.finished is None:
            return rs
        return self.scope or self.task_origin or self.origin

    def describe(self) -> str:
        return f"{self.name!r} (ident {self.ident}, native id {self.native_id})"


def current() -> ThreadInfo:
    """The :class:`ThreadInfo` of the calling thread."""
    try:
        return _local.info  # type: ignore[no-any-return]
    except AttributeError:
        info = _local.info = ThreadInfo()
        return info


# --- thread and executor tracking ---------------------------------------------------------

#: what ``Thread.start`` / ``submit`` were when conndiag hooked them (its hooks call these)
_wrapped_start: Callable[[threading.Thread], None] = threading.Thread.start
_wrapped_submit: Callable[..., Any] = ThreadPoolExecutor.submit
_hooked = False
#: whether the hooks record origins; off, they only pass the call on
_tracking = False


def _start(self: threading.Thread) -> None:
    if _tracking:
        _mark_origin(self)
    _wrapped_start(self)


@guard("threads.start")
def _mark_origin(thread: threading.Thread) -> None:
    """Before ``Thread.start``: remember the request the new thread's work comes from."""
    info = current()
    if not info.in_submit:
        origin = info.handed_off_origin()
        if origin is None:
            # A thread started from async code: the request lives in the context.
            origin = request_var.get()
        if origin is not None:
            thread._conndiag_origin = origin  # type: ignore[attr-defined]


class _TaskWithOrigin:
    """An executor task that runs with the origin of the request that submitted it."""

    __slots__ = ("fn", "origin")

    def __init__(self, fn: Callable[..., Any], origin: RequestScope) -> None:
        self.fn = fn
        self.origin = origin

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        entered = _enter_task(self.origin)
        try:
            return self.fn(*args, **kwargs)
        finally:
            if entered is not None:
                entered[0].task_origin = entered[1]


@guard("threads.task")
def _enter_task(origin: RequestScope) -> tuple[ThreadInfo, RequestScope | None]:
    """In the worker, before the task: it runs with its request's origin."""
    info = current()
    previous = info.task_origin
    info.task_origin = origin
    return info, previous


def _submit(self: ThreadPoolExecutor, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Any:
    if not _tracking:
        return _wrapped_submit(self, fn, *args, **kwargs)
    submitting = _submitting(fn)
    if submitting is None:
        return _wrapped_submit(self, fn, *args, **kwargs)
    info, task = submitting
    info.in_submit += 1
    try:
        return _wrapped_submit(self, task, *args, **kwargs)
    finally:
        info.in_submit -= 1


@guard("threads.submit")
def _submitting(fn: Callable[..., Any]) -> tuple[ThreadInfo, Callable[..., Any]]:
    """Before ``submit``: the task to submit instead of ``fn`` (it carries the origin)."""
    info = current()
    # Work submitted from an event loop that carries a request in its context
    # (sync_to_async(thread_sensitive=False), asyncio.to_thread) is awaited by that request
    # and classified from the context (``cross_thread`` while it is live, ``detached`` once
    # it returned), not from this thread's origin. That includes the loop thread
    # async_to_sync starts for a sync view: its own task came from the request thread, but
    # what it hands to an executor the request awaits. Without a request in the context
    # (async_to_sync in a thread a view started) the thread's origin is handed on.
    if asyncio._get_running_loop() is not None and request_var.get() is not None:
        origin = None
    else:
        origin = info.handed_off_origin()
    return info, (fn if origin is None else _TaskWithOrigin(fn, origin))


def install_tracking() -> None:
    """Hook ``Thread.start`` and ``ThreadPoolExecutor.submit`` and turn tracking on
    (idempotent).

    The hooks are installed once and never removed: a library that patched these methods
    after conndiag (sentry-sdk, OpenTelemetry's threading instrumentation) wraps conndiag's
    hook, and restoring the methods captured earlier would wipe its patch.
    """
    global _hooked, _tracking, _wrapped_start, _wrapped_submit
    if not _hooked:
        _wrapped_start = threading.Thread.start
        _wrapped_submit = ThreadPoolExecutor.submit
        threading.Thread.start = functools.wraps(_wrapped_start)(_start)  # type: ignore[method-assign]
        ThreadPoolExecutor.submit = functools.wraps(_wrapped_submit)(_submit)  # type: ignore[method-assign,assignment,arg-type]
        _hooked = True
    _tracking = True


def uninstall_tracking() -> None:
    """Turn tracking off (``TRACK_THREADS = False``): the hooks stay in place, inert (they
    only call what they wrapped), so patches installed after conndiag's are kept."""
    global _tracking
    _tracking = False
