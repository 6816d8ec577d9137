"""Server facts: the session's idle timeout (``wait_timeout``) and ``max_connections``.

Learned on the connecting thread right after a connect, never per query and never from
``AppConfig.ready()`` (Django 5+ warns about queries there, and under a pre-forking server
it would open the very connection the workers then share). ``SERVER_FACTS = "cached"`` (the
default) probes once per alias and process and reuses the answer for ``SERVER_FACTS_TTL``
seconds: every connection of an alias gets the same ``init_command`` / ``OPTIONS``, so its
session value is the same, and a site at ``CONN_MAX_AGE = 0`` (a connection per request)
pays no round trip per request. ``"connect"`` probes every new connection (one round trip
per connect: exact even for a session that changes its timeout later with ``SET``);
``"off"`` never probes (no stale detection).

The probe runs on the raw driver cursor, so it bypasses the execute wrappers and is never
counted as an application query; its SQL carries the :data:`PROBE_MARK` comment so it is
recognisable in the server's process list and general log.

MySQL and MariaDB are probed for ``@@session.wait_timeout`` and ``@@global.max_connections``;
PostgreSQL for ``idle_session_timeout`` (14+), ``idle_in_transaction_session_timeout`` and
``max_connections`` (``0`` means "no timeout": reported as None). SQLite has no server and
no idle timeout; other vendors are not probed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import process

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

    from .runtime import Runtime
    from .state import ConnState

#: marks conndiag's own queries in the server's process list and logs
PROBE_MARK = "/* conndiag:probe */"
MYSQL_PROBE = f"{PROBE_MARK} SELECT @@session.wait_timeout, @@global.max_connections"
POSTGRES_PROBE = (
    f"{PROBE_MARK} SELECT current_setting('idle_session_timeout', true), "
    "current_setting('idle_in_transaction_session_timeout', true), "
    "current_setting('max_connections', true)"
)
#: vendors conndiag knows how to probe
PROBED_VENDORS = frozenset({"mysql", "postgresql"})

#: (alias, pid) -> (learned at, facts)
_cache: dict[tuple[str, int], tuple[float, dict[str, Any]]] = {}


def _pg_seconds(value: object) -> float | None:
    """A PostgreSQL duration setting (milliseconds, ``0`` = off) in seconds."""
    if value in (None, ""):
        return None
    text = str(value).strip()
    units = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
    number, factor = text, 0.001
    for unit, unit_factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            number, factor = text[: -len(unit)], unit_factor
            break
    try:
        seconds = float(number) * factor
    except ValueError:
        return None
    return seconds or None


def probe_raw(vendor: str, raw: Any) -> dict[str, Any] | None:
    """Ask the server for its facts on a raw driver connection (one round trip).

    Facts: ``wait_timeout_s`` (the idle timeout of this session, None when there is none),
    ``max_connections``, and for PostgreSQL ``idle_in_transaction_timeout_s``.
    """
    if vendor not in PROBED_VENDORS or raw is None:
        return None
    cursor = raw.cursor()
    try:
        cursor.execute(MYSQL_PROBE if vendor == "mysql" else POSTGRES_PROBE)
        row = cursor.fetchone()
    finally:
        cursor.close()
    if row is None:
        return None
    if vendor == "mysql":
        return {"wait_timeout_s": float(row[0]), "max_connections": int(row[1])}
    return {
        "wait_timeout_s": _pg_seconds(row[0]),
        "idle_in_transaction_timeout_s": _pg_seconds(row[1]),
        "max_connections": None if row[2] in (None, "") else int(row[2]),
    }


def probe(db: BaseDatabaseWrapper) -> dict[str, Any] | None:
    """:func:`probe_raw` on ``db``'s open raw connection."""
    return probe_raw(db.vendor, db.connection)


def read_facts(db: BaseDatabaseWrapper) -> dict[str, Any] | None:
    """The server facts for ``db``'s settings, read on a connection of conndiag's own.

    For system checks and the doctor: the connection is opened with the alias's own
    connection parameters (so ``init_command`` applies), used for the probe only, and closed
    before returning. It never touches the thread's Django connection, sends no
    ``connection_created`` signal and is not reported as an application connection.
    Connection errors propagate (the caller diagnoses them).
    """
    if db.vendor not in PROBED_VENDORS:
        return None
    raw = db.get_new_connection(db.get_connection_params())
    try:
        return probe_raw(db.vendor, raw)
    finally:
        raw.close()


def on_connect(db: BaseDatabaseWrapper, state: ConnState, rt: Runtime) -> None:
    """Learn the server facts for a connection that was just opened."""
    mode = rt.config.server_facts
    if mode == "off" or db.vendor not in PROBED_VENDORS:
        return
    key = (db.alias, process.pid())
    if mode == "cached":
        hit = _cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < rt.config.server_facts_ttl:
            state.wait_timeout = hit[1]["wait_timeout_s"]
            return
    facts = probe(db)
    if facts is None:
        return
    _cache[key] = (time.monotonic(), facts)
    state.wait_timeout = facts["wait_timeout_s"]
    rt.emit("server_facts", state, facts)


def cached_facts(alias: str) -> dict[str, Any] | None:
    """The last facts learned for ``alias`` in this process, if any."""
    hit = _cache.get((alias, process.pid()))
    return None if hit is None else hit[1]


def clear_cache() -> None:
    """Forget every cached fact (tests; a process that knows the server changed)."""
    _cache.clear()
