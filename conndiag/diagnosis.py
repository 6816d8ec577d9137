"""Classify database errors by driver code and compute their most likely cause.

Codes are matched, never messages (messages differ between client libraries). The code
label is drawn from :data:`KNOWN_CODES` so metric labels stay bounded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import threads
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


def likely_cause(
    error_class: str,
    state: ConnState | None,
    info: ThreadInfo | None,
    context: str | None,
    rs: RequestScope | None,
    idle: float | None,
) -> str:
    """The most likely cause, in plain words, from what conndiag knows."""
    if state is not None and state.pid != threads.pid():
        return (
            f"connection opened by process {state.pid}, used by {threads.pid()} "
            "(inherited across fork)"
        )
    if error_class in CONNECTION_BROKEN and state is not None:
        wait_timeout = state.wait_timeout
        if wait_timeout is not None and idle is not None and idle >= wait_timeout:
            return f"idle {idle:.0f} s > wait_timeout {wait_timeout:.0f} s"
        if context == "detached" and rs is not None:
            ago = rs.returned_ago()
            when = "still running" if ago is None else f"{ago:.0f} s ago"
            return (
                f"thread started by request {rs.method} {rs.path} ({when}), which never "
                "recycles its connection"
            )
        if state.conn_max_age is None and not state.health_checks:
            return "CONN_MAX_AGE=None and health checks off: a dropped connection is reused"
        if idle is not None and wait_timeout is None:
            return (
                f"the server dropped the connection (idle {idle:.0f} s; wait_timeout not "
                "known), or restarted or killed it"
            )
        return "server restarted or killed the connection"
    if error_class == "refused":
        return "the server is not reachable (down, wrong host/port, or a firewall)"
    if error_class == "too_many_connections":
        return "the server's max_connections (or the user's limit) is reached"
    if error_class == "access_denied":
        return "wrong credentials or missing grants"
    return "not a connection problem conndiag recognises"


def diagnose(
    exc: BaseException,
    state: ConnState | None,
    info: ThreadInfo | None = None,
    context: str | None = None,
    rs: RequestScope | None = None,
    idle: float | None = None,
) -> Diagnosis:
    error_class, code = classify_error(exc)
    return Diagnosis(error_class, code, likely_cause(error_class, state, info, context, rs, idle))
