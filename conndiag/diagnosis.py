"""Classify database errors by driver code and compute their most likely cause.

Codes are matched, never messages (messages differ between client libraries). The code
label is drawn from :data:`KNOWN_CODES` so metric labels stay bounded.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import process, serverfacts
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
#: PostgreSQL SQLSTATEs -> error class. psycopg 3 carries the SQLSTATE in ``sqlstate``,
#: psycopg2 in ``pgcode`` (never in ``args[0]``).
SQLSTATES: dict[str, str] = {
    "57P01": "lost",  # admin_shutdown: pg_terminate_backend, or a fast/smart shutdown
    "57P02": "lost",  # crash_shutdown
    "08000": "lost",  # connection_exception
    "08006": "lost",  # connection_failure
    "08003": "gone_away",  # connection_does_not_exist
    "25P03": "server_timeout",  # idle_in_transaction_session_timeout
    "57P05": "server_timeout",  # idle_session_timeout (PostgreSQL 14+)
    "57P03": "refused",  # cannot_connect_now: starting up, shutting down, in recovery
    "08001": "refused",  # sqlclient_unable_to_establish_sqlconnection
    "08004": "refused",  # sqlserver_rejected_establishment_of_sqlconnection
    "53300": "too_many_connections",  # too_many_connections (server or role limit)
    "28000": "access_denied",  # invalid_authorization_specification (unknown role, pg_hba)
    "28P01": "access_denied",  # invalid_password
    "3D000": "access_denied",  # invalid_catalog_name: the database does not exist
    "57014": "canceled",  # query_canceled: statement_timeout, pg_cancel_backend
}
#: libpq reports connection-level failures (a failed connect, a connection the server closed
#: under psycopg2) as text without a SQLSTATE: these fragments of libpq's and the server's
#: (English) messages stand for the SQLSTATE they mean. Only for psycopg errors without one.
LIBPQ_MESSAGES: tuple[tuple[str, str], ...] = (
    ("too many connections for role", "53300"),
    ("too many clients already", "53300"),
    ("remaining connection slots are reserved", "53300"),
    ("password authentication failed", "28P01"),
    ("no pg_hba.conf entry", "28000"),
    ('role "', "28000"),  # role "x" does not exist
    ('database "', "3D000"),  # database "x" does not exist
    ("the database system is", "57P03"),  # ... starting up / shutting down
    ("Connection refused", "08001"),
    ("could not connect to server", "08001"),
    ("could not translate host name", "08001"),
    ("timeout expired", "08001"),
    ("terminating connection due to administrator command", "57P01"),
    ("server closed the connection unexpectedly", "08006"),
    ("connection already closed", "08003"),  # psycopg2
    ("the connection is closed", "08003"),  # psycopg 3
)
#: every error class, for bounded labels and documentation
ERROR_CLASSES = (
    "gone_away",
    "lost",
    "server_timeout",
    "refused",
    "too_many_connections",
    "access_denied",
    "canceled",
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


def sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE of ``exc`` or of the psycopg error it wraps (psycopg 3
    ``sqlstate``, psycopg2 ``pgcode``; for libpq's connection-level errors, which have none,
    the SQLSTATE their message stands for: see :data:`LIBPQ_MESSAGES`)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if isinstance(code, str) and code:
            return code
        if type(current).__module__.startswith("psycopg"):
            text = str(current)
            for fragment, meant in LIBPQ_MESSAGES:
                if fragment in text:
                    return meant
            return None
        current = current.__cause__ or current.__context__
    return None


def classify_error(exc: BaseException) -> tuple[str, str]:
    """``(error_class, code_label)`` for ``exc``: a MySQL error code or a PostgreSQL
    SQLSTATE from the fixed tables, else ``other``."""
    code = error_code(exc)
    if code is not None and code in KNOWN_CODES:
        return KNOWN_CODES[code], str(code)
    state = sqlstate(exc)
    if state is not None and state in SQLSTATES:
        return SQLSTATES[state], state
    return "other", "other"


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
    in_transaction: bool = False,
) -> str:
    """The most likely cause, in plain words, from what conndiag knows.

    ``state`` is None for a failed connect; ``facts`` are the server facts last learned
    for the alias (``max_connections``, PostgreSQL's ``idle_in_transaction_timeout_s``), if
    any; ``in_transaction``: the query ran inside a transaction (an atomic block).
    """
    if state is not None and state.pid != process.pid():
        return (
            f"connection opened by process {state.pid}, used by {process.pid()} "
            "(inherited across fork)"
        )
    if error_class == "canceled":
        return (
            "the statement was canceled: it ran past statement_timeout, or pg_cancel_backend "
            "/ a client cancel stopped it (the connection itself is still usable)"
        )
    if error_class in CONNECTION_BROKEN and state is not None:
        idle_tx = _idle_in_transaction_cause(code, idle, facts, in_transaction)
        if idle_tx is not None:
            return idle_tx
        wait_timeout = state.wait_timeout
        why = _why_not_recycled(state, info, context, rs)
        known = _KNOWN_CAUSES.get(code or "")
        if known is not None and state.broken is None:
            return known if why is None else f"{known}; {why}"
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
        if code == "53300":
            limit = None if facts is None else facts.get("max_connections")
            shown = "max_connections" if limit is None else f"max_connections={limit}"
            return f"the server's {shown} or the role's CONNECTION LIMIT is reached: {why}"
        limit = None if facts is None else facts.get("max_connections")
        reached = "the server's max_connections" if limit is None else f"max_connections={limit}"
        return f"{reached} is reached: {why}"
    if error_class == "access_denied":
        if code == "3D000":
            return "the database NAME in DATABASES does not exist on the server"
        return "wrong USER/PASSWORD in DATABASES, or missing grants on the database"
    return "not a connection problem conndiag recognises"


#: codes that say for certain why the connection broke
_KNOWN_CAUSES = {
    "1927": "the connection was killed (KILL, or the server shutting down)",
    "1053": "the server is shutting down (restart or failover)",
    "57P01": (
        "the server terminated the connection (pg_terminate_backend, or the server shutting down)"
    ),
    "57P02": "the server crashed or another backend did, and it reset every connection",
}


def _idle_in_transaction_cause(
    code: str | None, idle: float | None, facts: dict[str, Any] | None, in_transaction: bool
) -> str | None:
    """PostgreSQL ended a session left idle inside a transaction, if that is what happened:
    certain with SQLSTATE 25P03 (psycopg 3), likely when the connection was lost inside a
    transaction after idling past the probed ``idle_in_transaction_session_timeout``
    (psycopg2 reports only that the server closed the connection)."""
    limit = None if facts is None else facts.get("idle_in_transaction_timeout_s")
    shown = "" if limit is None else f" {_s(limit)}"
    waited = "" if idle is None else f"idle {_s(idle)} in a transaction > "
    cause = (
        f"{waited}idle_in_transaction_session_timeout{shown}: the server ended the session "
        "because a transaction stayed open without a query (an atomic block waiting on slow "
        "work, or a thread that never committed); keep transactions short"
    )
    if code == "25P03":
        return cause
    if in_transaction and limit is not None and idle is not None and idle >= limit:
        return cause
    return None


def diagnose(
    exc: BaseException,
    state: ConnState | None,
    info: ThreadInfo | None = None,
    context: str | None = None,
    rs: RequestScope | None = None,
    idle: float | None = None,
    in_transaction: bool = False,
) -> Diagnosis:
    """Classify ``exc`` and compute its most likely cause (never raises on odd input)."""
    error_class, code = classify_error(exc)
    facts = None
    if error_class == "too_many_connections" or (
        state is not None and state.vendor == "postgresql" and error_class in CONNECTION_BROKEN
    ):
        alias = None if state is None else state.alias
        facts = _facts_for(alias)
    cause = likely_cause(
        error_class, state, info, context, rs, idle, facts, code, in_transaction=in_transaction
    )
    return Diagnosis(error_class, code, cause)


def _facts_for(alias: str | None) -> dict[str, Any] | None:
    """The server facts last learned for ``alias`` (or for the only alias known)."""
    if alias is not None:
        return serverfacts.cached_facts(alias)
    known = [facts for (_, pid), (_, facts) in serverfacts._cache.items() if pid == process.pid()]
    return known[0] if len(known) == 1 else None
