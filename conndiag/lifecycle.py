"""Connection lifecycle: install conndiag on every DatabaseWrapper, in every thread.

Each wrapper gets, once: the execute wrapper at index 0 of ``execute_wrappers`` (inserted,
never appended, so a user's ``with connection.execute_wrapper(...)`` block cannot pop it),
and instance-level hooks on ``connect`` (opens and failed connects, which happen before any
execute wrapper), ``_close`` (every real close) and Django's two recycling methods, which
attribute a reason to the close they cause. A raw connection garbage-collected without a
close is reported as ``abandoned``.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, NoReturn

from . import process, runtime, serverfacts, threads
from .classify import classify
from .contain import guard
from .diagnosis import diagnose
from .policy import refusal
from .records import Query
from .state import STATE_ATTR, ConnState

if TYPE_CHECKING:
    from collections.abc import Callable

    from django.db.backends.base.base import BaseDatabaseWrapper

    from .scope import RequestScope

_INSTALLED_ATTR = "_conndiag_installed"
_REASON_ATTR = "_conndiag_close_reason"
_FINALIZER_ATTR = "_conndiag_finalizer"

#: every close reason (the metrics' ``reason`` label)
CLOSE_REASONS = (
    "max_age",  # CONN_MAX_AGE > 0 passed, closed by Django around a request
    "request_end",  # CONN_MAX_AGE = 0, closed by Django around a request
    "unusable",  # errors occurred and the connection was no longer usable, or autocommit changed
    "health_check_failed",  # CONN_HEALTH_CHECKS found it dead (Django 4.1+)
    "explicit",  # connection.close() / connections.close_all() by the application
    "background_work",  # closed by conndiag.background_db_work() on exit
    "replaced_stale",  # replaced by conndiag before a query (REPLACE_STALE)
    "abandoned",  # garbage-collected without being closed (its thread ended, or leaked)
)


def install(db: BaseDatabaseWrapper) -> None:
    """Install conndiag on one DatabaseWrapper (idempotent)."""
    from .wrapper import EXECUTE_WRAPPER

    if EXECUTE_WRAPPER not in db.execute_wrappers:
        db.execute_wrappers.insert(0, EXECUTE_WRAPPER)
    if db.__dict__.get(_INSTALLED_ATTR):
        return
    db.__dict__[_INSTALLED_ATTR] = True
    _hook(db, "connect", _connect)
    _hook(db, "_close", _close)
    _hook(db, "close_if_unusable_or_obsolete", _close_if_unusable_or_obsolete)
    if hasattr(db, "close_if_health_check_failed"):  # Django 4.1+
        _hook(db, "close_if_health_check_failed", _close_if_health_check_failed)


def _hook(db: BaseDatabaseWrapper, name: str, hook: Callable[..., Any]) -> None:
    original = getattr(db, name)

    def hooked(*args: Any, **kwargs: Any) -> Any:
        return hook(db, original, *args, **kwargs)

    hooked.__name__ = name
    hooked.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(db, name, hooked)


def _connect(db: BaseDatabaseWrapper, original: Callable[[], None]) -> None:
    # The previous connection's state is over; until _opening() says otherwise (it may
    # fail, contained), queries on this wrapper are not attributed to any state.
    db.__dict__[STATE_ATTR] = None
    opening = _opening(db)
    try:
        original()
    except Exception as exc:
        if opening is not None:
            _connect_failed(db, opening, exc)
        raise
    if opening is not None:
        _opened(db, opening)
        serverfacts_on_connect(db, opening[0], opening[3])


_Opening = tuple[ConnState, threads.ThreadInfo, str, "runtime.Runtime"]


@guard("lifecycle.connect")
def _opening(db: BaseDatabaseWrapper) -> _Opening | None:
    """Before a connect: classify it, and refuse it when the context's policy is ``raise``."""
    process.check()
    if pending_abandoned:
        report_abandoned()
    rt = runtime.get()
    info = threads.current()
    context, rs = classify(None, info)
    state = ConnState(db, info, context)
    if rt.policy[context] == "raise":
        # Refuse before even opening a connection: a detached thread would never close it.
        _refuse_connect(db, state, info, context, rs, rt)
    db.__dict__[STATE_ATTR] = state
    return state, info, context, rt


@guard("lifecycle.connect_failed")
def _connect_failed(db: BaseDatabaseWrapper, opening: _Opening, exc: Exception) -> None:
    state, info, context, rt = opening
    state.connecting = False
    state.closed = True
    state.close_reason = "connect_failed"
    duration = time.perf_counter() - state.opened
    diagnosis = diagnose(exc, None, info, context)
    rt.emit("connect_failed", db.alias, db.vendor, info, context, duration, diagnosis)


@guard("lifecycle.connect")
def _opened(db: BaseDatabaseWrapper, opening: _Opening) -> None:
    """After a connect: the connection's state, its finalizer, the ``opened`` records."""
    state, info, _, rt = opening
    state.connecting = False  # first: whatever fails below, its queries are seen
    state.connected(db)
    db.__dict__[_FINALIZER_ATTR] = _watch(db, state)
    rt.emit("connection_opened", state, info)


serverfacts_on_connect = guard("serverfacts.on_connect")(serverfacts.on_connect)


def _watch(db: BaseDatabaseWrapper, state: ConnState) -> weakref.finalize[Any, Any]:
    """Report ``state`` as ``abandoned`` if its connection dies without a close.

    The raw driver connection is watched where the driver allows weak references
    (mysqlclient, psycopg); otherwise (``sqlite3.Connection``) the DatabaseWrapper, which
    dies with its thread's connections (at the next garbage collection: it sits in reference
    cycles) and takes the raw connection with it. Either way the state, and the thread and
    request it references, are released then, whatever the driver.
    """
    try:
        finalizer = weakref.finalize(db.connection, _collected, state)
    except TypeError:  # sqlite3.Connection: no weak references
        finalizer = weakref.finalize(db, _collected, state)
    finalizer.atexit = False
    return finalizer


def _refuse_connect(
    db: BaseDatabaseWrapper,
    state: ConnState,
    info: threads.ThreadInfo,
    context: str,
    rs: RequestScope | None,
    rt: runtime.Runtime,
) -> NoReturn:
    """Report and raise the refusal of work whose context's policy is ``raise``."""
    state.connecting = False
    state.closed = True
    state.close_reason = "refused"
    rt.record_query(Query(db, state, info, context, rs, "raise", "", None, False, 0.0))
    raise refusal(context, db.alias, db.vendor, None, info, rs)


def mark_closed(db: BaseDatabaseWrapper, state: ConnState, reason: str) -> None:
    """Record that ``state``'s connection was closed for ``reason`` (once)."""
    if pending_abandoned:
        report_abandoned()
    if state.closed:
        return
    state.closed = True
    state.close_reason = reason
    finalizer = db.__dict__.pop(_FINALIZER_ATTR, None)
    if finalizer is not None:
        finalizer.detach()
    runtime.get().emit("connection_closed", state, reason)


#: :func:`_closing`'s answer for a connection inherited across fork: dropped, not closed
_DISCARDED = "discarded"


def _close(db: BaseDatabaseWrapper, original: Callable[[], None]) -> None:
    closing = _closing(db)
    if closing is _DISCARDED:
        return
    try:
        original()
    finally:
        if closing is not None:
            _closed(db, *closing)


@guard("lifecycle.close")
def _closing(db: BaseDatabaseWrapper) -> tuple[ConnState, str] | str | None:
    """Before a close: why it happens; :data:`_DISCARDED` if it must not happen at all."""
    state: ConnState | None = db.__dict__.get(STATE_ATTR)
    reason = db.__dict__.pop(_REASON_ATTR, None) or "explicit"
    if reason is _OBSOLETE:
        # Closing from close_if_unusable_or_obsolete: the state still says why.
        try:
            reason = _obsolete_reason(db)
        except Exception:
            reason = "unusable"
    if state is not None and state.pid != process.pid():
        # Inherited across fork(): closing would send COM_QUIT on the socket the parent
        # still uses, breaking its connection. Drop it here instead, without closing.
        discard_inherited(db)
        return _DISCARDED
    return None if state is None else (state, reason)


_closed = guard("lifecycle.close")(mark_closed)


def close_with_reason(db: BaseDatabaseWrapper, reason: str) -> None:
    """Close ``db``'s connection, attributing ``reason`` to the close."""
    db.__dict__[_REASON_ATTR] = reason
    try:
        db.close()
    finally:
        db.__dict__.pop(_REASON_ATTR, None)


def _obsolete_reason(db: BaseDatabaseWrapper) -> str:
    """Why ``close_if_unusable_or_obsolete`` is closing ``db`` (called while it closes).

    Django resets ``errors_occurred`` when the connection proved usable, so an error flag
    still set here means it was not.
    """
    if db.get_autocommit() != db.settings_dict["AUTOCOMMIT"] or db.errors_occurred:
        return "unusable"
    return "max_age" if db.settings_dict.get("CONN_MAX_AGE") else "request_end"


#: marker for "closing from close_if_unusable_or_obsolete" (the reason is found at close)
_OBSOLETE = "(obsolete)"


def _close_if_unusable_or_obsolete(db: BaseDatabaseWrapper, original: Callable[[], None]) -> None:
    # Runs twice per request per alias: only mark the call, work out the reason only if
    # Django actually closes (in _close).
    if db.connection is None:
        original()
        return
    db.__dict__[_REASON_ATTR] = _OBSOLETE
    try:
        original()
    finally:
        db.__dict__.pop(_REASON_ATTR, None)


def _close_if_health_check_failed(db: BaseDatabaseWrapper, original: Callable[[], None]) -> None:
    # Django calls this for every cursor: skip the bookkeeping when no check will run.
    if (
        db.connection is None
        or not getattr(db, "health_check_enabled", False)
        or getattr(db, "health_check_done", False)
    ):
        original()
        return
    db.__dict__[_REASON_ATTR] = "health_check_failed"
    try:
        original()
    finally:
        db.__dict__.pop(_REASON_ATTR, None)


def _collected(state: ConnState) -> None:
    """weakref.finalize callback: a raw connection died without ``close()``.

    It may run inside any allocation (cyclic garbage collection), even while this thread
    holds one of conndiag's locks, so it only queues the state; :func:`report_abandoned`
    reports it at the next safe point (a query, a connect or close, a metrics flush).
    """
    pending_abandoned.append(state)


@guard("lifecycle.report_abandoned")
def report_abandoned() -> None:
    """Report the connections garbage-collected without a close (reason ``abandoned``)."""
    while pending_abandoned:
        try:
            state = pending_abandoned.popleft()
        except IndexError:  # another thread took the last one
            return
        if state.closed:
            continue
        state.closed = True
        state.close_reason = "abandoned"
        runtime.get().emit("connection_closed", state, "abandoned")


def discard_inherited(db: BaseDatabaseWrapper) -> bool:
    """Drop a connection inherited across ``fork()`` without closing it.

    Closing (or garbage-collecting) it would send COM_QUIT on the socket the parent still
    uses, so the raw connection is kept referenced for the life of this process.
    """
    state: ConnState | None = db.__dict__.get(STATE_ATTR)
    if db.connection is None or state is None or state.pid == process.pid():
        return False
    _inherited.append(db.connection)
    finalizer = db.__dict__.pop(_FINALIZER_ATTR, None)
    if finalizer is not None:
        finalizer.detach()
    db.connection = None
    db.__dict__[STATE_ATTR] = None
    return True


_inherited: list[Any] = []
#: states of connections garbage-collected without a close, not reported yet
pending_abandoned: deque[ConnState] = deque()


def after_fork() -> None:
    """:func:`conndiag.process.on_fork` callback: the queue of abandoned connections is the
    parent's (it reports them); the child starts with an empty one."""
    pending_abandoned.clear()
