"""Queries on a connection inherited across ``fork()`` (context ``forked``).

A process that forked with a connection to a server open (uWSGI without ``lazy-apps``,
gunicorn ``--preload``, ``multiprocessing``, ``os.fork()``) shares that connection's socket
with its parent: whoever reads first gets the other's result rows, and a close from either
side breaks it for both. By the time a query gets here the child's copy of the socket is
already pointed at /dev/null (:func:`conndiag.lifecycle.after_fork`), so nothing can cross.

The policy says what to do with the query:

- ``replace`` (the default): drop the inherited connection without closing it, open this
  process's own, and run the query on it, the way SQLAlchemy's pool recipe does after a
  fork. No request breaks. Reported loudly: an error-level ``conndiag.query.flagged`` event
  naming the opening process, the cause and the fix, and ``conndiag_queries_total{context=
  "forked", action="replaced"}`` (which the ``ConnDiagForkedConnection`` alert watches).
  Inside an atomic block the query is refused instead: a new connection would silently
  lose the transaction's earlier work.
- ``raise``: refuse the query, and drop the connection, so the next query works.
- ``log`` / ``ignore``: run it on the inherited connection (you asked for it).

Django also talks to a connection outside any query: beginning a transaction (``atomic()``,
``ATOMIC_REQUESTS``: ``set_autocommit(False)``) and a health check (``CONN_HEALTH_CHECKS``:
a ping). Hooks on those paths (:func:`before_use`) apply the same policy first, so a
request that starts with ``atomic()`` gets its fresh connection before its transaction
begins, and loses nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

from . import process, runtime, threads
from .classify import FORKED, classify
from .contain import internal_error
from .exceptions import ConnDiagError
from .lifecycle import discard_inherited, reopen
from .policy import IN_TRANSACTION_FORKED
from .policy import refuse as refusal_of
from .records import Query
from .stale import can_replace
from .state import STATE_ATTR

if TYPE_CHECKING:
    from collections.abc import Callable

    from django.db.backends.base.base import BaseDatabaseWrapper

    from .runtime import Runtime
    from .state import ConnState


def refuse(db: BaseDatabaseWrapper, q: Query, rt: Runtime, note: str = "") -> NoReturn:
    """Record and raise the refusal of ``q``; the inherited connection is dropped first."""
    q.action = "raise"
    error = refusal_of(q, note)
    rt.record_query(q)
    discard_inherited(db)
    raise error


def check_replaceable(db: BaseDatabaseWrapper, q: Query, rt: Runtime) -> None:
    """Before a replacement: inside a transaction, refuse instead (nothing is lost silently)."""
    if not can_replace(db):
        refuse(db, q, rt, IN_TRANSACTION_FORKED)


def replace(db: BaseDatabaseWrapper, q: Query, cursor: Any) -> ConnState:
    """Drop the inherited connection and run ``q`` on a new one; returns the new state."""
    q.inherited = q.state
    discard_inherited(db)
    return reopen(db, q, cursor)


def before_use(db: BaseDatabaseWrapper, what: str) -> None:
    """Before Django uses ``db``'s connection outside a query (``what``): if it was inherited
    across fork, replace it now (drop it; the use connects anew) or refuse, per the policy.

    Recorded as a query of context ``forked`` that did not run on it (``sql`` is ``what``).
    conndiag's own failures are contained; a refusal is raised.
    """
    try:
        state: ConnState | None = db.__dict__.get(STATE_ATTR)
        if state is None or db.connection is None or state.pid == process.pid():
            return
        rt = runtime.get()
        info = threads.current()
        context, rs = classify(state, info)
        action = rt.policy[context]
        if context != FORKED or action not in ("replace", "raise"):
            return
        q = Query(db, state, info, context, rs, action, what, None, False, state.idle())
        if action == "raise":
            refuse(db, q, rt)
        check_replaceable(db, q, rt)
        q.inherited = state
        discard_inherited(db)
        rt.record_query(q)
    except ConnDiagError:
        raise
    except Exception as exc:
        internal_error("forked.before_use", exc)


def set_autocommit_hook(
    db: BaseDatabaseWrapper, original: Callable[[bool], None], autocommit: bool
) -> None:
    """Instance hook on ``_set_autocommit`` (a transaction begins or ends): see
    :func:`before_use`. After a replacement Django's own call connects anew."""
    before_use(db, "(set autocommit)")
    if db.connection is None:
        db.ensure_connection()  # connect() sets autocommit itself, as the settings say
        if db.get_autocommit() == autocommit:
            return
    original(autocommit)
