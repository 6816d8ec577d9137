"""What to do about a query's context, and the words that explain it.

The action per context comes from ``CONNDIAG["POLICY"]``. A ``raise`` builds an
:class:`~conndiag.exceptions.UnsafeQueryError` whose message names the thread, the request
that started the work and how long ago it returned, the connection and its age, why this
breaks and how to fix it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import process
from .exceptions import ERRORS_BY_CONTEXT, UnsafeQueryError

if TYPE_CHECKING:
    from .records import Query
    from .scope import RequestScope
    from .state import ConnState
    from .threads import ThreadInfo

#: how every refusal's message begins
REFUSED = "conndiag refused "

WHY_DETACHED = (
    "Django closes and recycles database connections only on the request thread, around "
    "each request (close_old_connections on request_started/request_finished). A connection "
    "opened on any other thread is never recycled: it lingers until garbage collection, "
    "counting against the server's max_connections, and once it has been idle longer than "
    "MySQL's wait_timeout the next query fails with (2006, 'MySQL server has gone away'), "
    "after the response already reported success."
)
FIX_DETACHED = (
    "Fix: run the work synchronously in the view, or hand it to a task queue (Celery, RQ, "
    "Dramatiq, django-tasks). If this background work is deliberate, wrap it in "
    "conndiag.background_db_work(), which closes stale connections before and the "
    "connections it opened after. To log instead of raising, set "
    "CONNDIAG['POLICY']['{context}'] = 'log'."
)
WHY_FORKED = (
    "It was inherited across fork() (uWSGI without lazy-apps, gunicorn --preload, "
    "multiprocessing): processes sharing one connection read each other's results and "
    "break it for each other (errors 2013 and 2006); closing it in the child breaks it "
    "for the parent too."
)
FIX_FORKED = (
    "Fix: open no connection before the server forks (no queries at import time, in "
    "AppConfig.ready() or in the WSGI module), or set uWSGI lazy-apps = true / drop gunicorn "
    "--preload so each worker loads the application itself. Code that forks on purpose "
    "(multiprocessing, os.fork()) calls django.db.connections.close_all() in the parent "
    "before forking."
)
DROPPED_FORKED = (
    "conndiag dropped it without closing it (its socket is the parent's): the next query "
    "opens a connection of this process."
)
REPLACED_FORKED = (
    "conndiag replaced it: dropped it without closing it (its socket is the parent's) and "
    "ran the query on a new connection of this process, so nothing broke and no rows "
    "crossed, but the server configuration should still be fixed."
)
IN_TRANSACTION_FORKED = (
    "It is inside a transaction (atomic block): a new connection would silently lose the "
    "transaction's earlier work, so the query is refused; the block rolls back, and the "
    "first query after it opens a connection of this process."
)
WHY_CROSS_THREAD = (
    "It runs inside the request's context but not on the request thread "
    "(sync_to_async(thread_sensitive=False), asyncio.to_thread, or a thread that copied "
    "the context): the request cycle never recycles the connection of that thread."
)
FIX_CROSS_THREAD = (
    "Fix: use the async ORM or sync_to_async(thread_sensitive=True) so the work runs on the "
    "request thread."
)


def describe_connection(state: ConnState | None) -> str:
    """``on a connection (...)``, or ``before any connection was opened``."""
    if state is None or state.close_reason == "refused":
        return "before any connection was opened"
    sid = f"server id {state.server_id}, " if state.server_id is not None else ""
    return (
        f"on a connection ({sid}opened {state.age():.1f} s ago by process {state.pid}, "
        f"{state.queries} queries served)"
    )


def explain(
    context: str,
    alias: str,
    vendor: str,
    state: ConnState | None,
    info: ThreadInfo,
    rs: RequestScope | None,
    note: str = "",
) -> str:
    """The plain-words account of a query in ``context`` (used in errors and warnings).

    ``note`` says what conndiag did about it, when that is more than the policy's word.
    """
    where = (
        f"a query on database {alias!r} ({vendor}) from thread {info.describe()} "
        f"in process {process.pid()}"
    )
    origin = f"started by request {rs.describe()}" if rs is not None else "of unknown origin"
    conn = describe_connection(state)
    if context == "forked":
        opener = state.pid if state is not None else "another process"
        sid = f" (server id {state.server_id})" if state is not None and state.server_id else ""
        note = note or DROPPED_FORKED
        return (
            f"{where} uses a connection{sid} that process {opener} opened. {WHY_FORKED} "
            f"{note} {FIX_FORKED}"
        )
    if context == "detached":
        return (
            f"{where}: this work was {origin}, and runs outside that request's thread, "
            f"{conn}. {WHY_DETACHED} {FIX_DETACHED.format(context=context)}"
        )
    if context == "cross_thread":
        return f"{where}, {origin}, {conn}. {WHY_CROSS_THREAD} {FIX_CROSS_THREAD}"
    return f"{where} ({context}), {conn}."


def refusal(
    context: str,
    alias: str,
    vendor: str,
    state: ConnState | None,
    info: ThreadInfo,
    rs: RequestScope | None,
    note: str = "",
) -> UnsafeQueryError:
    """The exception to raise for a refused query, carrying the facts as attributes."""
    msg = REFUSED + explain(context, alias, vendor, state, info, rs, note)
    cls = ERRORS_BY_CONTEXT[context]
    return cls(
        msg,
        context=context,
        alias=alias,
        vendor=vendor,
        thread_name=info.name,
        thread_ident=info.ident,
        thread_native_id=info.native_id,
        pid=process.pid(),
        request_id=rs.request_id if rs is not None else None,
        request_method=rs.method if rs is not None else None,
        request_path=rs.path if rs is not None else None,
        view=rs.view_name() if rs is not None else None,
        request_returned_ago=rs.returned_ago() if rs is not None else None,
        connection_id=state.server_id if state is not None else None,
        connection_age=state.age() if state is not None else None,
        connection_opened_by_pid=state.pid if state is not None else None,
    )


def refuse(q: Query, note: str = "") -> UnsafeQueryError:
    """The exception refusing ``q``; its account is kept on ``q.message`` for the recorders.

    Recorders run before the exception is raised: computing the words once means the
    refusal event and the traceback never disagree (say, "still running" in one and "which
    returned 0.0 s ago" in the other, when the request returned in between).
    """
    state = q.state
    conn = None if state.close_reason == "refused" else state  # refused before connecting
    error = refusal(q.context, state.alias, state.vendor, conn, q.info, q.scope, note)
    q.message = str(error)[len(REFUSED) :]
    return error
