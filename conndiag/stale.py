"""Stale connections: idle longer than the server's ``wait_timeout``, so certain to fail.

Before such a query the wrapper calls :func:`report`: it emits a ``stale`` event and
metric, and, with ``REPLACE_STALE`` on and outside any transaction, replaces the connection
(logged and counted as a close with reason ``replaced_stale``), which turns a certain
``(2006, 'MySQL server has gone away')`` into a reconnect. Inside an atomic block the
connection is never replaced: the transaction's earlier work would be silently lost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .contain import internal_error
from .lifecycle import close_with_reason, reopen

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

    from .records import Query
    from .runtime import Runtime
    from .state import ConnState


def can_replace(db: BaseDatabaseWrapper) -> bool:
    """Whether replacing the connection now loses nothing (no transaction is open)."""
    return not db.in_atomic_block and bool(db.autocommit)


def report(db: BaseDatabaseWrapper, q: Query, rt: Runtime) -> bool:
    """Report a stale connection; whether to replace it before the query (:func:`replace`)."""
    wait_timeout = q.state.wait_timeout
    if wait_timeout is None:
        return False
    replace_it = rt.config.replace_stale and can_replace(db)
    rt.emit("stale", q, wait_timeout, replace_it)
    return replace_it


def replace(db: BaseDatabaseWrapper, q: Query, cursor: Any) -> ConnState:
    """Replace the stale connection; returns the state of the new one to run on.

    ``cursor`` is the Django cursor wrapper the query runs on: it is pointed at a raw cursor
    of the new connection. If reconnecting fails, that error propagates to the application
    (the old connection was certain to fail anyway); the connect failure is reported
    (``conndiag.connection.failed``) with its own diagnosis.
    """
    state = q.state
    try:
        close_with_reason(db, "replaced_stale")
    except Exception as exc:
        internal_error("stale.replace", exc)
    if db.connection is not None:  # pragma: no cover - Django drops it even when close fails
        return state
    return reopen(db, q, cursor)
