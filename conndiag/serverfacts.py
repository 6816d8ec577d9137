"""Server facts: the session's idle timeout (``wait_timeout``) and ``max_connections``.

Learned on the connecting thread right after a connect, never per query and never from
``AppConfig.ready()``. ``SERVER_FACTS = "connect"`` probes every new connection (one round
trip per connect: exact, since ``init_command`` can change the session value);
``"cached"`` probes once per alias and process and reuses the answer for
``SERVER_FACTS_TTL`` seconds; ``"off"`` never probes. The probe runs on the raw driver
cursor, so it bypasses the execute wrappers and is not counted as an application query.
SQLite has no idle timeout; other vendors are not probed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import threads

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

    from .runtime import Runtime
    from .state import ConnState

MYSQL_PROBE = "SELECT @@session.wait_timeout, @@global.max_connections"

#: (alias, pid) -> (learned at, facts)
_cache: dict[tuple[str, int], tuple[float, dict[str, Any]]] = {}


def probe(db: BaseDatabaseWrapper) -> dict[str, Any] | None:
    """Ask the server for its facts on ``db``'s open raw connection (one round trip)."""
    if db.vendor != "mysql" or db.connection is None:
        return None
    cursor = db.connection.cursor()
    try:
        cursor.execute(MYSQL_PROBE)
        row = cursor.fetchone()
    finally:
        cursor.close()
    if row is None:
        return None
    return {"wait_timeout_s": float(row[0]), "max_connections": int(row[1])}


def on_connect(db: BaseDatabaseWrapper, state: ConnState, rt: Runtime) -> None:
    """Learn the server facts for a connection that was just opened."""
    mode = rt.config.server_facts
    if mode == "off" or db.vendor != "mysql":
        return
    key = (db.alias, threads.pid())
    facts: dict[str, Any] | None = None
    if mode == "cached":
        hit = _cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < rt.config.server_facts_ttl:
            facts = hit[1]
    if facts is not None:
        state.wait_timeout = facts["wait_timeout_s"]
        return
    facts = probe(db)
    if facts is None:
        return
    _cache[key] = (time.monotonic(), facts)
    state.wait_timeout = facts["wait_timeout_s"]
    rt.emit("server_facts", state, facts)


def cached_facts(alias: str) -> dict[str, Any] | None:
    """The last facts learned for ``alias`` in this process, if any."""
    hit = _cache.get((alias, threads.pid()))
    return None if hit is None else hit[1]
