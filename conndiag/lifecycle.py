"""Connection lifecycle: hooks on every DatabaseWrapper, in every thread.

Each wrapper gets, once (from :func:`conndiag.wrapper.install`, which also inserts the
execute wrapper), instance-level hooks on ``connect`` (opens and failed connects, which
happen before any execute wrapper), ``_close`` (every real close; when one of Django's two
recycling methods makes it, its reason is read off the stack) and ``is_usable`` (a
connection inherited across fork is replaced before Django pings it). Nothing is hooked
on the paths Django runs for every request and every cursor. A raw connection
garbage-collected without a close is reported as ``abandoned`` (for SQLite, whose
connections cannot be weak-referenced, when its DatabaseWrapper is collected, with its
thread), and its state is released.

After a fork (see :mod:`conndiag.process`), every connection the parent had open, in every
thread, belongs to the parent. :func:`after_fork` finds them all through :data:`_open`
(maintained at connect and close) and makes sure the child never talks on their sockets:
it keeps each raw connection referenced for the life of the process (a driver's dealloc
sends ``COM_QUIT`` / Terminate, which would break the parent's session) and points the
child's copy of the socket descriptor at ``/dev/null``, so even a close, or the interpreter's
teardown at exit, reaches nobody. Forks made by Python also pin them *before* the fork
(:func:`_before_fork`): Python clears the other threads' thread-locals in the child before
any after-fork hook runs. In-memory SQLite is memory the fork copied, not a shared socket:
such connections are the child's own (:attr:`ConnState.private`).
"""

from __future__ import annotations

import os
import stat
import sys
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, NoReturn

from . import process, runtime, serverfacts, threads
from .classify import classify
from .conf import get_config
from .contain import guard, internal_error
from .diagnosis import diagnose
from .policy import refuse
from .records import Query
from .state import STATE_ATTR, ConnState

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

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
    "forked",  # inherited across fork(): dropped by the child without closing it
    "abandoned",  # garbage-collected without being closed (its thread ended, or leaked)
)


def install(db: BaseDatabaseWrapper) -> bool:
    """Install the lifecycle hooks on one DatabaseWrapper; False if they were already there.

    :func:`conndiag.wrapper.install` adds the execute wrapper and the fork hooks too: use
    that one.
    """
    if db.__dict__.get(_INSTALLED_ATTR):
        return False
    db.__dict__[_INSTALLED_ATTR] = True
    hook(db, "connect", _connect)
    hook(db, "_close", _close)
    hook(db, "is_usable", _is_usable)
    return True


def hook(db: BaseDatabaseWrapper, name: str, fn: Callable[..., Any]) -> None:
    """Replace ``db.<name>`` with ``fn(db, original, *args, **kwargs)``."""
    original = getattr(db, name)

    def hooked(*args: Any, **kwargs: Any) -> Any:
        return fn(db, original, *args, **kwargs)

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
    _open[state] = weakref.ref(db)
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
    q = Query(db, state, info, context, rs, "raise", "", None, False, 0.0)
    error = refuse(q)
    rt.record_query(q)
    raise error


def mark_closed(db: BaseDatabaseWrapper, state: ConnState, reason: str) -> None:
    """Record that ``state``'s connection was closed for ``reason`` (once)."""
    if pending_abandoned:
        report_abandoned()
    if state.closed:
        return
    state.closed = True
    state.close_reason = reason
    _open.pop(state, None)
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
    reason = db.__dict__.pop(_REASON_ATTR, None) or _recycler_reason() or "explicit"
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

#: Django's recycling methods, by the name of their code, and the close reason each gives
_RECYCLERS = {
    "close_if_unusable_or_obsolete": _OBSOLETE,
    "close_if_health_check_failed": "health_check_failed",
}
#: how many frames above ``_closing`` a recycling method may be (the guard, our hook,
#: ``close()`` and its ``async_unsafe`` wrapper, a subclass or an instrumenting wrapper)
_RECYCLER_DEPTH = 12


def _recycler_reason() -> str | None:
    """The reason of a close made by one of Django's recycling methods, from the stack.

    Found only when Django actually closes: the recycling methods run twice per request
    per alias and once per cursor, and hooking them would cost every request and every
    query a call. A close is rare; reading a dozen frames then is cheap.
    """
    frame: FrameType | None = sys._getframe(2)
    for _ in range(_RECYCLER_DEPTH):
        if frame is None:
            return None
        reason = _RECYCLERS.get(frame.f_code.co_name)
        if reason is not None:
            return reason
        frame = frame.f_back
    return None


def _is_usable(db: BaseDatabaseWrapper, original: Callable[[], bool]) -> bool:
    # Django pings only to decide whether to close (a health check, or after errors): a
    # connection inherited across fork is replaced first, never pinged on the parent's
    # socket; dropped, it is not usable (Django's close() then has nothing to close).
    if before_health_check is not None and db.connection is not None:
        before_health_check(db, "(health check)")
        if db.connection is None:
            return False
    return original()


#: called before a health check pings the connection; ``conndiag/install.py`` sets it to
#: :func:`conndiag.forked.before_use`, which first replaces a connection inherited across
#: fork (``forked`` sits above this module, so it is handed in rather than imported)
before_health_check: Callable[[BaseDatabaseWrapper, str], None] | None = None


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
        _open.pop(state, None)
        if state.closed or state.pid != process._pid:
            continue  # closed already, or the parent's (collected here after a fork)
        state.closed = True
        state.close_reason = "abandoned"
        runtime.get().emit("connection_closed", state, "abandoned")


def discard_inherited(db: BaseDatabaseWrapper) -> bool:
    """Drop a connection inherited across ``fork()`` without closing it; report it.

    Closing (or garbage-collecting) it would send COM_QUIT on the socket the parent still
    uses, so the raw connection stays referenced for the life of this process. Outside a
    transaction the wrapper forgets it (the next query connects); inside an atomic block it
    is marked the way Django marks a connection closed in a transaction (the block rolls
    back, and the wrapper forgets it when the outermost block exits). Returns whether it
    was inherited.
    """
    state: ConnState | None = db.__dict__.get(STATE_ATTR)
    raw = db.connection
    if raw is None or state is None or state.pid == process.pid():
        return False
    _keep(raw)
    _open.pop(state, None)
    finalizer = db.__dict__.pop(_FINALIZER_ATTR, None)
    if finalizer is not None:
        finalizer.detach()
    db.__dict__[STATE_ATTR] = None
    if db.in_atomic_block:
        db.closed_in_transaction = True
        db.needs_rollback = True
    else:
        db.connection = None
    if not state.closed:
        state.closed = True
        state.close_reason = "forked"
        _report_dropped(state)
    return True


def _report_dropped(state: ConnState) -> None:
    """A ``connection_closed`` record, reason ``forked``: dropped, not closed. Contained
    inline (not a ``guard``: it runs only in a child process, where the fault-injection
    suite cannot count it; ``tests/test_fork.py`` breaks it there)."""
    try:
        runtime.get().emit("connection_closed", state, "forked")
    except Exception as exc:
        internal_error("lifecycle.forked", exc)


def reopen(db: BaseDatabaseWrapper, q: Query, cursor: Any) -> ConnState:
    """Connect ``db`` again (its connection was just dropped or closed) for the query ``q``.

    ``cursor`` is the Django cursor wrapper the query runs on: it is pointed at a raw cursor
    of the new connection. Returns the state to count the query on (the new one). A failed
    reconnect propagates: it is the application's database error, already reported
    (``conndiag.connection.failed``) with its own diagnosis.
    """
    db.ensure_connection()
    with db.wrap_database_errors:
        cursor.cursor = db.create_cursor()
    new_state: ConnState | None = db.__dict__.get(STATE_ATTR)
    if new_state is None:  # conndiag's connect hook failed (contained): keep counting here
        return q.state
    q.state = new_state
    return new_state


def _keep(raw: Any) -> None:
    _inherited[id(raw)] = raw


def _neuter(raw: Any) -> None:
    """Point this process's descriptor of ``raw``'s socket at ``/dev/null``.

    The parent's descriptor (and the server session) are untouched; in this process a
    query on it fails at once (end of file: "lost connection") instead of reading the
    parent's results, and a close, or a dealloc at exit, sends its goodbye nowhere. Only a
    descriptor that is a socket is touched.
    """
    try:
        fd = raw.fileno()
    except Exception:  # closed, or a driver without fileno(): nothing to neuter
        return
    if not isinstance(fd, int) or fd < 0:
        return
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(devnull, fd, inheritable=False)
        finally:
            os.close(devnull)
    except OSError:
        return


def _before_fork() -> None:
    """``os.register_at_fork(before=...)``: hold every open connection while Python forks.

    In the child, Python clears the other threads' states (and their thread-locals, which
    hold their DatabaseWrappers) before any after-fork hook runs; these references keep
    their raw connections alive until :func:`after_fork` takes them over.
    """
    held = []
    for ref in list(_open.values()):
        db = ref()
        if db is not None and db.connection is not None:
            held.append(db.connection)
    _held_at_fork[:] = held


def _after_fork_in_parent() -> None:
    _held_at_fork.clear()


_fork_hooks_registered = False


def register_fork_hooks() -> None:
    """Register :func:`_before_fork` (idempotent; :mod:`conndiag.install` calls it)."""
    global _fork_hooks_registered
    if not _fork_hooks_registered:
        _fork_hooks_registered = True
        os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent)


def _neuter_inherited() -> bool:
    """Whether the policy lets no query run on an inherited connection (so none may)."""
    rt = runtime._runtime
    policy = rt.policy if rt is not None else get_config().policy
    return policy["forked"] in ("replace", "raise")


#: id -> raw connection inherited across fork, referenced for the life of this process
_inherited: dict[int, Any] = {}
#: raw connections held by :func:`_before_fork` while Python forks
_held_at_fork: list[Any] = []
#: every connection open in this process (weakly: a thread's end still abandons its own)
_open: dict[ConnState, weakref.ref[BaseDatabaseWrapper]] = {}
#: states of connections garbage-collected without a close, not reported yet
pending_abandoned: deque[ConnState] = deque()


def after_fork() -> None:
    """:func:`conndiag.process.on_fork` callback, in the child (plain state only, no locks).

    The abandoned-connection queue is the parent's (it reports them). Every connection the
    parent had open, whichever thread opened it, is kept referenced and, unless the policy
    lets queries use it, its socket descriptor is pointed at /dev/null; in-memory SQLite
    connections become this process's own.
    """
    pending_abandoned.clear()
    pid = os.getpid()
    neuter = _neuter_inherited()
    for state, ref in list(_open.copy().items()):
        db = ref()
        if state.private:
            if db is None:
                _open.pop(state, None)
            else:
                state.pid = pid  # the fork copied it: a private copy, not a shared socket
            continue
        _open.pop(state, None)
        raw = None if db is None else db.connection
        if raw is not None and db is not None and db.__dict__.get(STATE_ATTR) is state:
            _keep(raw)
            if neuter:
                _neuter(raw)
    for raw in _held_at_fork:
        _keep(raw)
        if neuter:
            _neuter(raw)
    _held_at_fork.clear()
