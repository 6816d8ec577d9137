"""Classify database errors by driver code and compute their most likely cause.

Codes are matched, never messages (messages differ between client libraries). The code
label is drawn from :data:`KNOWN_CODES` so metric labels stay bounded.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import process
from .records import Diagnosis

if TYPE_CHECKING:
    from .scope import RequestScope
    from .state import ConnState
    from .threads import ThreadInfo

#: MySQL/MariaDB client and server error codes -> error class
KNOWN_CODES: dict[int, str] = {
    2006: "gone_away",  # CR_SERVER_GONE_ERROR
    2013: "lost",  # CR_SERVER_LOST
    2055: "lost",  # CR_SERVER_LOST_EXTENDED
    1927: "lost",  # ER_CONNECTION_KILLED (MariaDB)
    1053: "lost",  # ER_SERVER_SHUTDOWN
    4031: "server_timeout",  # ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8.0.24+)
    2002: "refused",  # CR_CONNECTION_ERROR (socket)
    2003: "refused",  # CR_CONN_HOST_ERROR
    2005: "refused",  # CR_UNKNOWN_HOST
    1040: "too_many_connections",  # ER_CON_COUNT_ERROR
    1203: "too_many_connections",  # ER_TOO_MANY_USER_CONNECTIONS
    1226: "too_many_connections",  # ER_USER_LIMIT_REACHED (max_user_connections)
    1045: "access_denied",  # ER_ACCESS_DENIED_ERROR
    1044: "access_denied",  # ER_DBACCESS_DENIED_ERROR
}
#: every error class, for bounded labels and documentation
ERROR_CLASSES = (
    "gone_away",
    "lost",
    "server_timeout",
    "refused",
    "too_many_connections",
    "access_denied",
    "other",
)
#: error classes meaning the connection itself is broken
CONNECTION_BROKEN = frozenset({"gone_away", "lost", "server_timeout"})


def error_code(exc: BaseException) -> int | None:
    """The driver error code of ``exc`` or of the driver error it wraps."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        args = getattr(current, "args", ())
        if args and isinstance(args[0], int) and not isinstance(args[0], bool):
            return args[0]
        current = current.__cause__ or current.__context__
    return None


def classify_error(exc: BaseException) -> tuple[str, str]:
    """``(error_class, code_label)`` for ``exc``."""
    code = error_code(exc)
    if code is None or code not in KNOWN_CODES:
        return "other", "other"
    return KNOWN_CODES[code], str(code)


def _s(seconds: float) -> str:
    """Seconds for a message: one decimal below 10 s, whole seconds above."""
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def _why_not_recycled(
    state: ConnState, info: ThreadInfo | None, context: str | None, rs: RequestScope | None
) -> str | None:
    """Why nothing closed this connection before it went stale, if conndiag can tell."""
    if context == "detached" and rs is not None:
        ago = rs.returned_ago()
        when = "still running" if ago is None else f"{_s(ago)} ago"
        return (
            f"thread started by request {rs.method or '?'} {rs.path or '?'} ({when}), which "
            "never recycles its connection"
        )
    if context in ("background", "cross_thread") and info is not None and info.scope is None:
        return (
            f"thread {info.name!r} is not a request thread, so Django never recycles its "
            "connection (close it, or use conndiag.background_db_work())"
        )
    if not state.health_checks:
        if state.conn_max_age is None:
            return "CONN_MAX_AGE=None and health checks off: a dropped connection is reused"
        if state.wait_timeout is not None and state.conn_max_age >= state.wait_timeout:
            return (
                f"CONN_MAX_AGE={state.conn_max_age:g} >= wait_timeout "
                f"{_s(state.wait_timeout)} and health checks off"
            )
    return None


def likely_cause(
    error_class: str,
    state: ConnState | None,
    info: ThreadInfo | None,
    context: str | None,
    rs: RequestScope | None,
    idle: float | None,
    facts: dict[str, Any] | None = None,
    code: str | None = None,
) -> str:
    """The most likely cause, in plain words, from what conndiag knows.

    ``state`` is None for a failed connect; ``facts`` are the server facts last learned
    for the alias (``max_connections``), if any.
    """
    if state is not None and state.pid != process.pid():
        return (
            f"connection opened by process {state.pid}, used by {process.pid()} "
            "(inherited across fork)"
        )
    if error_class in CONNECTION_BROKEN and state is not None:
        wait_timeout = state.wait_timeout
        why = _why_not_recycled(state, info, context, rs)
        if state.broken is not None:
            broken_code, broken_at = state.broken
            cause = (
                f"the connection already failed ({broken_code}) "
                f"{_s(time.perf_counter() - broken_at)} ago and was used again: Django "
                "discards a broken connection only around requests, on the request thread"
            )
            return cause if why is None else f"{cause}; {why}"
        if wait_timeout is not None and idle is not None and idle >= wait_timeout:
            cause = f"idle {_s(idle)} > wait_timeout {_s(wait_timeout)}"
            return cause if why is None else f"{cause}; {why}"
        if idle is not None and wait_timeout is None:
            cause = (
                f"the server dropped the connection (idle {_s(idle)}; wait_timeout not "
                "known), or restarted or killed it"
            )
            return cause if why is None else f"{cause}; {why}"
        if code == "1927":
            cause = "the connection was killed (KILL, or the server shutting down)"
        elif code == "1053":
            cause = "the server is shutting down (restart or failover)"
        else:
            cause = "server restarted or killed the connection"
        if idle is not None and wait_timeout is not None:
            cause += f" (idle {_s(idle)} < wait_timeout {_s(wait_timeout)})"
        if state.conn_max_age is None and not state.health_checks:
            cause += "; CONN_MAX_AGE=None and health checks off: a dropped connection is reused"
        return cause
    if error_class == "refused":
        return "the server is not reachable: down, restarting, wrong HOST/PORT, or a firewall"
    if error_class == "too_many_connections":
        why = (
            "too many workers x threads, or connections left open by threads that ended "
            "without closing them"
        )
        if code in ("1203", "1226"):
            return f"the account's connection limit (max_user_connections) is reached: {why}"
        limit = None if facts is None else facts.get("max_connections")
        reached = "the server's max_connections" if limit is None else f"max_connections={limit}"
        return f"{reached} is reached: {why}"
    if error_class == "access_denied":
        return "wrong USER/PASSWORD in DATABASES, or missing grants on the database"
    return "not a connection problem conndiag recognises"


def diagnose(
    exc: BaseException,
    state: ConnState | None,
    info: ThreadInfo | None = None,
    context: str | None = None,
    rs: RequestScope | None = None,
    idle: float | None = None,
) -> Diagnosis:
    """Classify ``exc`` and compute its most likely cause (never raises on odd input)."""
    error_class, code = classify_error(exc)
    facts = None
    if error_class == "too_many_connections":
        alias = None if state is None else state.alias
        facts = _facts_for(alias)
    return Diagnosis(
        error_class, code, likely_cause(error_class, state, info, context, rs, idle, facts, code)
    )


def _facts_for(alias: str | None) -> dict[str, Any] | None:
    """The server facts last learned for ``alias`` (or for the only alias known)."""
    from . import serverfacts

    if alias is not None:
        return serverfacts.cached_facts(alias)
    known = [facts for (_, pid), (_, facts) in serverfacts._cache.items() if pid == process.pid()]
    return known[0] if len(known) == 1 else None
