"""The execute wrapper: on every query's path, it only connects the other modules.

classify (``classify``) -> policy (``runtime.policy``; maybe raise, before the database) ->
stale check (``stale``) -> run the query, timed -> record (``runtime.record_query``: log
events and metrics). conndiag's own failures are contained (``conndiag/contain.py``): the
query always runs unless the policy says ``raise``.
"""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING, Any

from . import forked, process, runtime, stale, threads
from .classify import FORKED, classify
from .contain import internal_error
from .diagnosis import CONNECTION_BROKEN, diagnose
from .exceptions import ConnDiagError
from .lifecycle import hook, pending_abandoned, report_abandoned
from .lifecycle import install as install_hooks
from .policy import refuse
from .records import Query
from .state import STATE_ATTR

if TYPE_CHECKING:
    from collections.abc import Callable

    from django.db.backends.base.base import BaseDatabaseWrapper

_current_thread = threads.current


class ExecuteWrapper:
    """``execute_wrappers`` callable installed at index 0 of every connection."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<conndiag.ExecuteWrapper>"

    def __call__(
        self,
        execute: Callable[..., Any],
        sql: Any,
        params: Any,
        many: bool,
        context: dict[str, Any],
    ) -> Any:
        db = context["connection"]
        state = db.__dict__.get(STATE_ATTR)
        if state is None or state.connecting:
            # Not a connection conndiag saw open, or init_connection_state() queries.
            return execute(sql, params, many, context)
        replace = False
        inherited = False
        # Contained (see conndiag/contain.py): a failure here is reported and the query runs
        # as it would without conndiag. Inline, not a guard: a ``try`` is free, a call is not.
        try:
            if not process._page[0]:
                process.check()  # first entry point in a new process: run the on_fork callbacks
            if pending_abandoned:
                report_abandoned()
            rt = runtime._runtime or runtime.get()
            info = _current_thread()
            ctx, rs = classify(state, info)
            action = rt.policy[ctx]
            start = perf_counter()
            last = state.last_used
            q = Query(
                db,
                state,
                info,
                ctx,
                rs,
                action,
                sql,
                params,
                many,
                start - (state.opened if last is None else last),
            )
            if action == "raise":
                if ctx == FORKED:
                    forked.refuse(db, q, rt)  # and drop the connection: the next query works
                error = refuse(q)
                rt.record_query(q)
                raise error
            if action == "replace":  # forked only (conf allows it nowhere else)
                forked.check_replaceable(db, q, rt)  # refuses inside a transaction
                inherited = True
            elif (
                state.wait_timeout is not None
                and q.idle >= state.wait_timeout - rt.config.stale_margin
            ):
                replace = stale.report(db, q, rt)
        except ConnDiagError:
            raise  # the policy's refusal, not a failure
        except Exception as internal:
            internal_error("wrapper", internal)
            return execute(sql, params, many, context)
        if inherited:
            # Outside the containment, like a stale replacement: a failed reconnect is the
            # application's database error (the inherited connection cannot be used).
            state = forked.replace(db, q, context["cursor"])
            start = perf_counter()
        elif replace:
            # Outside the containment: a failed reconnect is the application's database
            # error (the stale connection was certain to fail anyway).
            state = stale.replace(db, q, context["cursor"])
            start = perf_counter()
        try:
            result = execute(sql, params, many, context)
        except Exception as exc:
            try:
                end = perf_counter()
                q.duration = end - start
                state.queries += 1
                state.last_used = end
                q.error = exc
                try:
                    q.diagnosis = diagnosis = diagnose(
                        exc, state, info, ctx, rs, q.idle, in_transaction=db.in_atomic_block
                    )
                    if state.broken is None and diagnosis.error_class in CONNECTION_BROKEN:
                        state.broken = (diagnosis.code, end)
                except Exception as internal:
                    internal_error("wrapper.diagnose", internal)
                rt.record_query(q)
            except Exception as internal:
                internal_error("wrapper", internal)
            raise
        try:
            end = perf_counter()
            q.duration = end - start
            state.queries += 1
            state.last_used = end
            rt.record_query(q)
        except Exception as internal:
            internal_error("wrapper", internal)
        return result


EXECUTE_WRAPPER = ExecuteWrapper()


def install(db: BaseDatabaseWrapper) -> None:
    """Install conndiag on one DatabaseWrapper (idempotent): the execute wrapper at index 0
    of ``execute_wrappers`` (inserted, never appended, so a user's ``with
    connection.execute_wrapper(...)`` block cannot pop it) and the lifecycle hooks."""
    if EXECUTE_WRAPPER not in db.execute_wrappers:
        db.execute_wrappers.insert(0, EXECUTE_WRAPPER)
    if install_hooks(db):
        # Beginning a transaction talks to the connection outside any query.
        hook(db, "_set_autocommit", forked.set_autocommit_hook)
