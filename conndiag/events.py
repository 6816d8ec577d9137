"""Log events: one per query, and one per connection opened, closed, stale or failing.

Event names and field names are a stable, documented schema (README, "Log events";
docs/logging.md): alerts and dashboards are built on them. The events go to structlog when
the application configured it, otherwise to the stdlib loggers ``conndiag.query``,
``conndiag.connection``, ``conndiag.server`` and ``conndiag.internal`` (see
:mod:`conndiag.logbackend`); conndiag configures neither.

Routine per-query events (``conndiag.query``) are emitted at ``QUERY_LOG_LEVEL`` and can be
switched off (``LOG_QUERIES``), sampled (``QUERY_LOG_SAMPLE_RATE``) or filtered by level; a
filtered event costs a level check. Anomalies (flagged and refused queries, errors, stale
connections, failed connects) are always emitted, at warning or error.
"""

from __future__ import annotations

import logging
import random
from time import perf_counter
from typing import TYPE_CHECKING, Any

from . import process
from .logbackend import (
    CONNECTION_FAMILY,
    INTERNAL_FAMILY,
    LEVELS,
    QUERY_FAMILY,
    SERVER_FAMILY,
    Backend,
    structlog_level_enabled,
)
from .policy import REPLACED_FORKED, explain
from .records import ACTION_LABELS

if TYPE_CHECKING:
    from .conf import Config
    from .records import Diagnosis, Query
    from .scope import RequestScope
    from .state import ConnState
    from .threads import ThreadInfo

QUERY = "conndiag.query"
QUERY_FLAGGED = "conndiag.query.flagged"
QUERY_REFUSED = "conndiag.query.refused"
QUERY_FAILED = "conndiag.query.failed"
CONNECTION_OPENED = "conndiag.connection.opened"
CONNECTION_CLOSED = "conndiag.connection.closed"
CONNECTION_STALE = "conndiag.connection.stale"
CONNECTION_FAILED = "conndiag.connection.failed"
SERVER_FACTS = "conndiag.server.facts"
INTERNAL_ERROR = "conndiag.internal_error"

#: every event name conndiag emits
EVENTS = (
    QUERY,
    QUERY_FLAGGED,
    QUERY_REFUSED,
    QUERY_FAILED,
    CONNECTION_OPENED,
    CONNECTION_CLOSED,
    CONNECTION_STALE,
    CONNECTION_FAILED,
    SERVER_FACTS,
    INTERNAL_ERROR,
)

#: close reasons logged at warning level (the others are routine, at info)
#: (``forked``, a connection inherited across fork dropped unclosed, is routine: the child
#: closing what it inherited is what Django's parallel runner, Celery and uWSGI postfork
#: hooks do; a *use* of one is what is loud: ``conndiag.query.flagged`` / ``.refused``.)
WARN_CLOSE_REASONS = frozenset({"abandoned", "unusable", "health_check_failed", "replaced_stale"})

DEBUG, INFO, WARNING, ERROR = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR

#: Whether structlog, as the application configured it, would emit at a level (kept for
#: callers of 0.1).
level_enabled = structlog_level_enabled


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def thread_fields(info: ThreadInfo) -> dict[str, Any]:
    return {
        "thread_name": info.name,
        "thread_ident": info.ident,
        "thread_native_id": info.native_id,
        "pid": process.pid(),
    }


def request_fields(rs: RequestScope | None) -> dict[str, Any]:
    if rs is None:
        return {
            "request_id": None,
            "request_method": None,
            "request_path": None,
            "view": None,
            "request_returned_s": None,
        }
    return {
        "request_id": rs.request_id,
        "request_method": rs.method,
        "request_path": rs.path,
        "view": rs.view_name(),
        "request_returned_s": _r(rs.returned_ago()),
    }


def connection_fields(state: ConnState, now: float | None = None) -> dict[str, Any]:
    now = perf_counter() if now is None else now
    return {
        "alias": state.alias,
        "vendor": state.vendor,
        "connection_id": state.server_id,
        "connection_age_s": _r(state.age(now)),
        "connection_queries": state.queries,
        "connection_pid": state.pid,
        "connection_thread": state.opened_by_name,
        "conn_max_age_state": state.conn_max_age_state,
        "conn_max_age_s": state.conn_max_age,
        "health_checks": state.health_checks,
        "wait_timeout_s": state.wait_timeout,
    }


class EventLog:
    """The log-event recorder (structlog or stdlib logging: :mod:`conndiag.logbackend`)."""

    __slots__ = ("_backend", "_level_no", "config")

    def __init__(self, config: Config) -> None:
        self.config = config
        self._backend = Backend(config.logger_name)
        self._level_no = LEVELS[config.query_log_level]

    # -- helpers ---------------------------------------------------------------------------

    def _log(self, family: str, level_no: int, event: str, **fields: Any) -> None:
        self._backend.emit(family, level_no, event, fields)

    def query_events_enabled(self) -> bool:
        """Whether a routine query event would be emitted at all (a cheap level check)."""
        return self.config.log_queries and self._backend.enabled(QUERY_FAMILY, self._level_no)

    def _query_fields(self, q: Query) -> dict[str, Any]:
        # One dict literal, no helper calls: this runs for every logged query (see README,
        # "Performance": every query as a JSON line).
        state, info, rs = q.state, q.info, q.scope
        now = perf_counter()
        action = q.action
        if action == "raise":
            outcome = "refused"
        elif q.error is not None:
            outcome = "error"
        else:
            outcome = "ok"
        if rs is None:
            request_id = method = path = view = returned = None
        else:
            request_id, method, path, view = rs.request_id, rs.method, rs.path, rs.view_name()
            returned = rs.returned_ago()
            if returned is not None:
                returned = round(returned, 6)
        duration = q.duration
        recycle_in = state.recycle_in(q.db)
        fields: dict[str, Any] = {
            "alias": state.alias,
            "vendor": state.vendor,
            "context": q.context,
            "action": ACTION_LABELS[action],
            "allowed": q.allowed,
            "outcome": outcome,
            "duration_s": None if duration is None else round(duration, 6),
            "many": q.many,
            "thread_name": info.thread.name,
            "thread_ident": info.ident,
            "thread_native_id": info.native_id,
            "pid": process._pid,
            "request_id": request_id,
            "request_method": method,
            "request_path": path,
            "view": view,
            "request_returned_s": returned,
            "connection_id": state.server_id,
            "connection_age_s": round(now - state.opened, 6),
            "connection_idle_s": round(q.idle, 6),
            "connection_queries": state.queries,
            "connection_pid": state.pid,
            "connection_thread": state.opened_by_name,
            "conn_max_age_state": state.conn_max_age_state,
            "conn_max_age_s": state.conn_max_age,
            "recycle_in_s": None if recycle_in is None else round(recycle_in, 6),
            "health_checks": state.health_checks,
            "wait_timeout_s": state.wait_timeout,
        }
        config = self.config
        if config.log_sql:
            sql = q.sql if isinstance(q.sql, str) else repr(q.sql)
            limit = config.sql_max_length
            fields["sql"] = sql if len(sql) <= limit else sql[:limit] + "..."
            if config.log_sql_params and not q.many:
                fields["params"] = repr(q.params)[:limit]
        if q.diagnosis is not None:
            fields["error_class"] = q.diagnosis.error_class
            fields["error_code"] = q.diagnosis.code
            fields["cause"] = q.diagnosis.cause
        return fields

    # -- Recorder --------------------------------------------------------------------------

    def query(self, q: Query) -> None:
        emit = self._backend.emit
        if q.error is not None:
            emit(QUERY_FAMILY, ERROR, QUERY_FAILED, self._query_fields(q))
            return
        if q.action == "raise" or q.action == "log":
            fields = self._query_fields(q)
            fields["message"] = q.message or explain(
                q.context, q.state.alias, q.state.vendor, q.state, q.info, q.scope
            )
            if q.action == "raise":
                emit(QUERY_FAMILY, ERROR, QUERY_REFUSED, fields)
            else:
                emit(QUERY_FAMILY, WARNING, QUERY_FLAGGED, fields)
            return
        if q.action == "replace":  # a connection inherited across fork was replaced
            fields = self._query_fields(q)
            old = q.inherited or q.state
            fields["message"] = explain(
                q.context, old.alias, old.vendor, old, q.info, q.scope, REPLACED_FORKED
            )
            emit(QUERY_FAMILY, ERROR, QUERY_FLAGGED, fields)
            return
        if not self.query_events_enabled():
            return
        rate = self.config.query_log_sample_rate
        if rate < 1.0 and random.random() >= rate:
            return
        emit(QUERY_FAMILY, self._level_no, QUERY, self._query_fields(q))

    def connection_opened(self, state: ConnState, info: ThreadInfo) -> None:
        fields = connection_fields(state)
        fields.update(thread_fields(info))
        fields["context"] = state.context_opened
        fields["open_duration_s"] = _r(state.open_duration)
        self._backend.emit(CONNECTION_FAMILY, INFO, CONNECTION_OPENED, fields)

    def connection_closed(self, state: ConnState, reason: str) -> None:
        fields = connection_fields(state)
        fields["connection_idle_s"] = _r(state.idle())
        fields["reason"] = reason
        level = WARNING if reason in WARN_CLOSE_REASONS else INFO
        self._backend.emit(CONNECTION_FAMILY, level, CONNECTION_CLOSED, fields)

    def connect_failed(
        self,
        alias: str,
        vendor: str,
        info: ThreadInfo,
        context: str,
        duration: float,
        diagnosis: Diagnosis,
    ) -> None:
        self._log(
            CONNECTION_FAMILY,
            ERROR,
            CONNECTION_FAILED,
            alias=alias,
            vendor=vendor,
            context=context,
            duration_s=_r(duration),
            error_class=diagnosis.error_class,
            error_code=diagnosis.code,
            cause=diagnosis.cause,
            **thread_fields(info),
        )

    def stale(self, q: Query, wait_timeout: float, replaced: bool) -> None:
        fields = connection_fields(q.state)
        fields.update(thread_fields(q.info))
        fields.update(request_fields(q.scope))
        fields["context"] = q.context
        fields["connection_idle_s"] = _r(q.idle)
        fields["wait_timeout_s"] = wait_timeout
        fields["replaced"] = replaced
        self._backend.emit(CONNECTION_FAMILY, WARNING, CONNECTION_STALE, fields)

    def server_facts(self, state: ConnState, facts: dict[str, Any]) -> None:
        self._log(
            SERVER_FAMILY,
            INFO,
            SERVER_FACTS,
            alias=state.alias,
            vendor=state.vendor,
            connection_id=state.server_id,
            **facts,
        )

    def internal_error(self, component: str, error: BaseException, first: bool) -> None:
        if first:
            self._log(
                INTERNAL_FAMILY,
                ERROR,
                INTERNAL_ERROR,
                component=component,
                error=f"{type(error).__name__}: {error}",
            )
