"""Per-connection state, kept on conndiag's side.

One :class:`ConnState` per physical connection: a new one is made each time a Django
``DatabaseWrapper`` connects. Nothing here touches another thread's raw connection: the
server-side id is read once, on the thread that connected, right after connecting.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import process, threads

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

#: Attribute of the DatabaseWrapper that holds its current :class:`ConnState`.
STATE_ATTR = "_conndiag_state"


def conn_max_age_state(value: object) -> str:
    """``per_request`` (0), ``persistent`` (None) or ``timed`` (N seconds)."""
    if value is None:
        return "persistent"
    if not value:
        return "per_request"
    return "timed"


class ConnState:
    """The life of one physical database connection."""

    __slots__ = (
        "__weakref__",
        "alias",
        "broken",
        "close_reason",
        "closed",
        "conn_max_age",
        "connecting",
        "context_opened",
        "health_checks",
        "last_used",
        "open_duration",
        "opened",
        "opened_by",
        "opened_by_name",
        "opened_wall",
        "pid",
        "private",
        "queries",
        "server_id",
        "vendor",
        "wait_timeout",
    )

    def __init__(
        self, db: BaseDatabaseWrapper, opened_by: threads.ThreadInfo, context: str
    ) -> None:
        self.alias: str = db.alias
        self.vendor: str = db.vendor
        self.opened = time.perf_counter()
        self.opened_wall = time.time()
        self.opened_by = opened_by
        #: the opener's name then (a server renames its worker's thread after forking it)
        self.opened_by_name = opened_by.name
        self.pid = process.pid()
        #: the connection is memory of this process (in-memory SQLite), not a socket to a
        #: server: a fork copies it, so the child's copy is the child's own
        self.private = False
        self.context_opened = context
        self.conn_max_age: float | None = db.settings_dict.get("CONN_MAX_AGE", 0)
        self.health_checks = bool(db.settings_dict.get("CONN_HEALTH_CHECKS", False))
        self.server_id: int | None = None
        self.queries = 0
        self.last_used: float | None = None
        self.open_duration: float | None = None
        self.connecting = True
        self.closed = False
        self.close_reason: str | None = None
        #: the server's idle timeout for this session, in seconds, once known.
        self.wait_timeout: float | None = None
        #: (error code, perf_counter time) of the first query that found it broken
        self.broken: tuple[str, float] | None = None

    def connected(self, db: BaseDatabaseWrapper) -> None:
        """Called on the connecting thread right after ``connect()`` succeeded."""
        self.open_duration = time.perf_counter() - self.opened
        self.connecting = False
        self.server_id = server_connection_id(db.connection)
        is_in_memory = getattr(db, "is_in_memory_db", None)  # the SQLite backends
        self.private = bool(is_in_memory is not None and is_in_memory())

    def age(self, now: float | None = None) -> float:
        return (time.perf_counter() if now is None else now) - self.opened

    def idle(self, now: float | None = None) -> float:
        """Seconds since the last query finished (since connecting if none ran yet)."""
        last = self.opened if self.last_used is None else self.last_used
        return (time.perf_counter() if now is None else now) - last

    @property
    def conn_max_age_state(self) -> str:
        return conn_max_age_state(self.conn_max_age)

    def recycle_in(self, db: BaseDatabaseWrapper) -> float | None:
        """Seconds before Django's ``close_at`` passes, ``0.0`` once it has (Django closes it
        at the next request boundary on its thread).

        None: never (``CONN_MAX_AGE=None``), per request (``CONN_MAX_AGE=0``: Django's
        ``close_at`` is already past at connect, the connection is closed when the request
        ends, not after a time), or not known.
        """
        if not self.conn_max_age:
            return None
        close_at = getattr(db, "close_at", None)
        if close_at is None:
            return None
        return max(0.0, float(close_at - time.monotonic()))


def server_connection_id(raw: Any) -> int | None:
    """The server-side connection id, where the driver knows it without a round trip."""
    thread_id = getattr(raw, "thread_id", None)  # mysqlclient: equals CONNECTION_ID()
    if thread_id is not None:
        try:
            return int(thread_id())
        except Exception:
            return None
    pid = getattr(raw, "info", None)  # psycopg 3: ConnectionInfo.backend_pid
    backend_pid = getattr(pid, "backend_pid", None)
    if isinstance(backend_pid, int):
        return backend_pid
    get_pid = getattr(raw, "get_backend_pid", None)  # psycopg2
    if get_pid is not None:
        try:
            return int(get_pid())
        except Exception:
            return None
    return None


def state_of(db: BaseDatabaseWrapper) -> ConnState | None:
    return getattr(db, STATE_ATTR, None)
