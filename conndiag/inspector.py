"""The live connection inspector: every connection of every process, joined with the server's.

:func:`inspect` reads what each live process of this host published
(:mod:`conndiag.publish`), asks each database server for its own list of connections
(MySQL/MariaDB ``information_schema.processlist``, PostgreSQL ``pg_stat_activity``) and joins
the two by server connection id. ``manage.py conndiag connections`` and the
``conndiag:connections`` page both show its result.

Flags (a row with any of them makes the command exit non-zero):

- ``orphan``: on the server, from this host, owned by no live process (a killed worker's
  connection, one leaked by code conndiag does not see, or another application's);
- ``shared``: one server connection claimed by two processes (inherited across ``fork()``
  and used by both);
- ``near_timeout``: idle for :data:`NEAR_TIMEOUT` of ``wait_timeout`` or more, and nothing
  recycles it before its next use (see :func:`flags_of`);
- ``past_max_age``: older than ``CONN_MAX_AGE`` and nothing will recycle it (it was not
  opened by a request thread), or, with ``CONN_MAX_AGE = 0``, still open after the request
  that opened it finished;
- ``abandoned``: the thread that opened it has ended without closing it;
- ``gone``: a live process holds it but the server no longer has it: its next query fails.

Connections from another host (the server's view of the client address differs from this
inspector's own) are marked ``another_host``, never ``orphan``: orphans are judged only
among this host's connections.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from .publish import SUFFIX, VERSION, database_target, directory, process_start_time
from .state import conn_max_age_state

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .conf import Config

#: share of wait_timeout from which an idle connection is ``near_timeout``
NEAR_TIMEOUT = 0.8
#: the flags that make a row (and the command) fail
FLAGS = ("orphan", "shared", "near_timeout", "past_max_age", "abandoned", "gone")
#: what each flag means (the page's legend, the docs)
FLAG_HELP = {
    "orphan": "on the server, from this host, owned by no live process: a killed worker's "
    "connection, one leaked by code conndiag does not see, or another application's",
    "shared": "claimed by two processes: inherited across fork() and used by both; their "
    "results can mix",
    "near_timeout": "idle for 80% of wait_timeout or more, and nothing recycles it before its "
    "next use: that use fails with 'server has gone away'",
    "past_max_age": "older than CONN_MAX_AGE on a thread no request recycles, or (CONN_MAX_AGE "
    "= 0) still open after the request that opened it",
    "abandoned": "the thread that opened it ended without closing it (closed at the next "
    "garbage collection)",
    "gone": "a live process holds it, the server no longer has it: its next query fails",
    "another host": "a client on another host: judged by the inspector of that host",
}
#: files bigger than this are not read (a publisher writes far less)
MAX_FILE_BYTES = 1 << 20

MYSQL_PROCESSLIST = (
    "SELECT ID, USER, HOST, DB, COMMAND, TIME, STATE, CONNECTION_ID(), @@session.wait_timeout "
    "FROM information_schema.processlist WHERE DB = %s OR ID = CONNECTION_ID()"
)
POSTGRES_ACTIVITY = (
    "SELECT pid, usename, host(client_addr), client_port, state, "
    "EXTRACT(EPOCH FROM (now() - state_change)), "
    "EXTRACT(EPOCH FROM (now() - backend_start)), application_name "
    "FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'"
)


# -- what the processes published -----------------------------------------------------------


def process_alive(pid: int, start_time: object) -> bool:
    """Whether the process that wrote a file still runs (and is the same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    except OSError:
        return False
    if isinstance(start_time, int):
        now = process_start_time(pid)
        if now is not None and now != start_time:
            return False  # the pid was reused by another process
    return True


def read_published(path: str, clean: bool = True) -> list[dict[str, Any]]:
    """The documents of the live processes in ``path``; dead processes' files are removed."""
    host = socket.gethostname()
    documents = []
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return []
    for name in names:
        full = os.path.join(path, name)
        if name.startswith(".") and name.endswith(".tmp"):
            pid_text = name[1:-4]
            if clean and pid_text.isdigit() and not process_alive(int(pid_text), None):
                _remove(full)
            continue
        if not name.endswith(SUFFIX) or not name[: -len(SUFFIX)].isdigit():
            continue
        document = _load(full)
        if document is None:
            continue
        pid = document.get("pid")
        if document.get("host") != host or not isinstance(pid, int):
            continue  # another host's file (a shared directory): its liveness is unknowable
        if not process_alive(pid, document.get("start_time")):
            if clean:
                _remove(full)
            continue
        documents.append(document)
    return documents


def _load(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_FILE_BYTES:
        return None
    try:
        document = json.loads(data)
    except ValueError:
        return None
    if not isinstance(document, dict) or document.get("version") != VERSION:
        return None
    if not isinstance(document.get("connections"), list):
        return None
    return document


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def valid(conn: object) -> bool:
    """Whether a published entry has what the join needs (files are read defensively)."""
    return (
        isinstance(conn, dict)
        and isinstance(conn.get("opened_at"), int | float)
        and isinstance(conn.get("target"), str)
    )


def owned(documents: Iterable[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """(target, server id) -> the published connections claiming it, with their ``pid``."""
    claims: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for document in documents:
        for conn in document["connections"]:
            if not valid(conn):
                continue
            server_id = conn.get("server_id")
            target = conn.get("target")
            if not isinstance(server_id, int) or not isinstance(target, str):
                continue
            claims.setdefault((target, server_id), []).append({**conn, "pid": document["pid"]})
    return claims


# -- what the servers say ----------------------------------------------------------------------


def _host_part(address: str | None) -> str:
    """The address part of a processlist HOST: ``10.0.0.5:51234``, ``[::1]:5``, ``localhost``."""
    if not address:
        return ""
    if address.startswith("["):
        return address[1 : address.find("]")] if "]" in address else address
    if address.count(":") == 1:
        return address.rsplit(":", 1)[0]
    return address


_LOOPBACK = {"", "localhost", "127.0.0.1", "::1", "local"}


def same_host(client: str, own: str) -> bool:
    """Whether a server-side client address is this host (the inspector's own address)."""
    if client == own:
        return True
    return client in _LOOPBACK and own in _LOOPBACK


def server_view(alias: str) -> dict[str, Any]:
    """The server's connections to ``alias``'s database, or why they could not be read."""
    from django.db import connections

    db = connections[alias]
    try:
        if db.vendor == "mysql":
            return _mysql_view(db)
        if db.vendor == "postgresql":
            return _postgres_view(db)
    except Exception as exc:
        return {"available": False, "error": f"{type(exc).__name__}: {exc}", "connections": []}
    return {"available": False, "error": None, "connections": []}


def _mysql_view(db: Any) -> dict[str, Any]:
    with db.cursor() as cursor:
        cursor.execute(MYSQL_PROCESSLIST, [db.settings_dict["NAME"]])
        rows = cursor.fetchall()
    own_id = rows[0][7] if rows else None
    own_wait = float(rows[0][8]) if rows and rows[0][8] is not None else None
    own_host = ""
    conns = []
    for row in rows:
        sid, user, host, dbname, command, seconds, state = row[:7]
        if sid == own_id:
            own_host = _host_part(host)
        if dbname != db.settings_dict["NAME"]:
            continue
        idle = float(seconds) if command == "Sleep" and seconds is not None else None
        conns.append(
            {
                "server_id": int(sid),
                "user": user,
                "client": host,
                "client_host": _host_part(host),
                "state": command if not state else f"{command}: {state}",
                "idle": idle,
                "age": None,
            }
        )
    return {
        "available": True,
        "error": None,
        "own_id": own_id,
        "own_host": own_host,
        "wait_timeout": own_wait,
        "connections": conns,
    }


def _postgres_view(db: Any) -> dict[str, Any]:
    from .serverfacts import cached_facts

    with db.cursor() as cursor:
        cursor.execute(POSTGRES_ACTIVITY, [db.settings_dict["NAME"]])
        rows = cursor.fetchall()
        cursor.execute("SELECT pg_backend_pid(), host(inet_client_addr())")
        own_id, own_addr = cursor.fetchone()
    conns = []
    for pid, user, addr, port, state, since_change, age, app in rows:
        idle = float(since_change) if state == "idle" and since_change is not None else None
        conns.append(
            {
                "server_id": int(pid),
                "user": user,
                "client": "local socket" if addr is None else f"{addr}:{port}",
                "client_host": addr or "",
                "state": f"{state or '?'}" + (f" ({app})" if app else ""),
                "idle": idle,
                "age": None if age is None else float(age),
            }
        )
    facts = cached_facts(db.alias) or {}
    return {
        "available": True,
        "error": None,
        "own_id": own_id,
        "own_host": own_addr or "",
        "wait_timeout": facts.get("wait_timeout_s"),
        "connections": conns,
    }


# -- the join ------------------------------------------------------------------------------------


def flags_of(conn: dict[str, Any], now: float) -> list[str]:
    """The flags a published connection earns by itself (see the module doc).

    A connection opened by a request thread is recycled by Django before its next use there
    (``close_old_connections`` at request start, ``CONN_MAX_AGE``, health checks), so it is
    ``near_timeout`` only when that recycling comes too late (persistent, or ``CONN_MAX_AGE``
    past the server's drop time, without health checks), and never ``past_max_age`` for
    ``CONN_MAX_AGE > 0``.
    """
    flags: list[str] = []
    opened = float(conn["opened_at"])
    last = conn.get("last_used_at")
    last = opened if last is None else float(last)
    idle = conn.get("idle")
    idle = now - last if idle is None else float(idle)
    age = now - opened
    max_age = conn.get("conn_max_age")
    wait = conn.get("wait_timeout")
    opening = conn.get("opening_request")
    # CONN_MAX_AGE = 0 and still open after its request: Django's cycle never saw it.
    outlived = max_age == 0 and isinstance(opening, dict) and bool(opening.get("finished"))
    by_request = conn.get("context_opened") == "request" and not outlived
    if isinstance(wait, int | float) and wait > 0 and idle >= NEAR_TIMEOUT * wait:
        recycled_first = by_request and (
            conn.get("health_checks") or (max_age is not None and opened + max_age <= last + wait)
        )
        if not recycled_first:
            flags.append("near_timeout")
    if max_age is not None and ((max_age > 0 and age > max_age and not by_request) or outlived):
        flags.append("past_max_age")
    if conn.get("thread_alive") is False:
        flags.append("abandoned")
    return flags


def _owner(conn: dict[str, Any], now: float) -> dict[str, Any]:
    opened = float(conn["opened_at"])
    last = conn.get("last_used_at")
    return {
        "pid": conn["pid"],
        "opened_pid": conn.get("opened_pid"),
        "inherited": bool(conn.get("inherited")),
        "thread": conn.get("thread"),
        "thread_alive": conn.get("thread_alive"),
        "context_opened": conn.get("context_opened"),
        "opened_at": opened,
        "age": round(now - opened, 3),
        "idle": round(now - (opened if last is None else float(last)), 3),
        "queries": conn.get("queries"),
        "request": conn.get("request"),
        "opening_request": conn.get("opening_request"),
        "broken": conn.get("broken"),
    }


def _row(
    alias: str,
    vendor: str,
    server_id: int | None,
    claims: list[dict[str, Any]],
    server: dict[str, Any] | None,
    default_wait: float | None,
    now: float,
) -> dict[str, Any]:
    first = claims[0] if claims else {}
    wait = first.get("wait_timeout")
    if wait is None:
        wait = default_wait
    owners = [_owner(c, now) for c in claims]
    idle = server.get("idle") if server else None
    if idle is None and owners:
        idle = min(o["idle"] for o in owners)
    age = server.get("age") if server else None
    if age is None and owners:
        age = max(o["age"] for o in owners)
    flags: list[str] = []
    for claim in claims:
        for flag in flags_of({**claim, "wait_timeout": wait, "idle": idle}, now):
            if flag not in flags:
                flags.append(flag)
    return {
        "alias": alias,
        "vendor": vendor,
        "server_id": server_id,
        "owners": owners,
        "server": server,
        "host": "this",
        "age": None if age is None else round(age, 3),
        "idle": None if idle is None else round(idle, 3),
        "wait_timeout": wait,
        "conn_max_age": first.get("conn_max_age") if claims else None,
        "conn_max_age_state": conn_max_age_state(first.get("conn_max_age")) if claims else None,
        "flags": flags,
    }


def inspect_alias(
    alias: str,
    before: dict[tuple[str, int], list[dict[str, Any]]],
    read_again: Any,
    unjoined: list[dict[str, Any]],
) -> dict[str, Any]:
    """One alias: the server's connections joined with the published ones."""
    from django.db import connections

    db = connections[alias]
    target = database_target(db.vendor, db.settings_dict)
    view = server_view(alias)
    after = owned(read_again())
    now = time.time()
    rows: list[dict[str, Any]] = []
    default_wait = view.get("wait_timeout")
    if not view["available"]:
        # No server list (SQLite, or it failed): what the processes published.
        for key, claims in sorted(after.items()):
            if key[0] == target:
                rows.append(_row(alias, db.vendor, key[1], claims, None, default_wait, now))
    else:
        seen = set()
        own_host = view["own_host"]
        for server in view["connections"]:
            sid = server["server_id"]
            seen.add(sid)
            claims = after.get((target, sid)) or before.get((target, sid)) or []
            row = _row(alias, db.vendor, sid, claims, server, default_wait, now)
            pids = {c["pid"] for c in claims}
            if len(pids) > 1:
                row["flags"].insert(0, "shared")
            if sid == view["own_id"]:
                row["inspector"] = True
            elif not same_host(server["client_host"], own_host):
                row["host"] = "another"
                row["flags"] = []  # another host's process: this host cannot judge it
            elif not claims:
                row["flags"].insert(0, "orphan")
            rows.append(row)
        for key, claims in sorted(after.items()):
            # Published before and after the server was read, yet not on the server: dropped.
            if key[0] == target and key[1] not in seen and key in before:
                row = _row(alias, db.vendor, key[1], claims, None, default_wait, now)
                row["flags"].insert(0, "gone")
                rows.append(row)
    for conn in unjoined:
        if conn.get("target") == target:
            rows.append(_row(alias, db.vendor, None, [conn], None, default_wait, now))
    return {
        "vendor": db.vendor,
        "target": target,
        "server": {k: view.get(k) for k in ("available", "error", "own_id", "wait_timeout")},
        "connections": rows,
    }


def inspect(
    aliases: list[str] | None = None, config: Config | None = None, clean: bool = True
) -> dict[str, Any]:
    """Every connection of every live process of this host, joined with each server's view."""
    from django.db import connections

    from .conf import get_config

    config = config or get_config()
    path = directory(config)
    aliases = list(connections) if aliases is None else aliases
    documents = read_published(path, clean=clean)
    before = owned(documents)
    unjoined = [
        {**c, "pid": d["pid"]}
        for d in documents
        for c in d["connections"]
        if valid(c) and not isinstance(c.get("server_id"), int)
    ]
    result: dict[str, Any] = {}
    latest: list[list[dict[str, Any]]] = [documents]

    def read_again() -> list[dict[str, Any]]:
        latest[0] = read_published(path, clean=clean)
        return latest[0]

    for alias in aliases:
        result[alias] = inspect_alias(alias, before, read_again, unjoined)
    counts = dict.fromkeys(FLAGS, 0)
    for report in result.values():
        for row in report["connections"]:
            for flag in row["flags"]:
                counts[flag] = counts.get(flag, 0) + 1
    flagged = sum(1 for r in result.values() for row in r["connections"] if row["flags"])
    return {
        "host": socket.gethostname(),
        "directory": path,
        "publishing": config.inspector,
        "generated_at": time.time(),
        "processes": [
            {
                "pid": d["pid"],
                "written_at": d.get("written_at"),
                "connections": len(d["connections"]),
                "truncated": d.get("truncated", 0),
            }
            for d in latest[0]
        ],
        "aliases": result,
        "flag_counts": {k: v for k, v in counts.items() if v},
        "flagged": flagged,
    }


# -- presentation (the command's table and the page share it) -----------------------------------


def seconds(value: float | None) -> str:
    """``42 s``, ``7 min``, ``3.5 h``; ``-`` when unknown."""
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def _ratio(value: float | None, limit: float | None) -> float | None:
    if value is None or limit is None or limit <= 0:
        return None
    return max(0.0, min(1.0, value / limit))


def _request_text(request: dict[str, Any]) -> str:
    return f"{request['method'] or '?'} {request['path'] or '?'} {request['id']}"


def _requests(opening: dict[str, Any] | None, serving: dict[str, Any] | None) -> str:
    """The request that opened the connection, and the one its thread served last."""
    parts = []
    if opening is not None:
        done = " (finished)" if opening["finished"] else ""
        parts.append(f"opened in {_request_text(opening)}{done}")
    if serving is not None and (opening is None or serving["id"] != opening["id"]):
        parts.append(f"serving {_request_text(serving)}")
    return "; ".join(parts) or "-"


def _max_age(state: str | None, max_age: float | None) -> str:
    if state is None:
        return "-"
    if max_age is None:
        return "persistent"
    return "0 (per request)" if not max_age else f"{max_age:g} s"


def display_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat, printable row per connection, in the order the report lists them."""
    rows = []
    for alias, alias_report in report["aliases"].items():
        for row in alias_report["connections"]:
            owners = row["owners"]
            if owners:
                owner = ", ".join(
                    f"{o['pid']}/{o['thread']}"
                    + (" (inherited)" if o["inherited"] else "")
                    + ("" if o["thread_alive"] is not False else " (ended)")
                    for o in owners
                )
            elif row.get("inspector"):
                owner = "(this inspector)"
            elif row["host"] == "another":
                owner = "(another host)"
            else:
                owner = "(no live process)"
            opening = next((o["opening_request"] for o in owners if o["opening_request"]), None)
            serving = next((o["request"] for o in owners if o["request"]), None)
            server = row["server"] or {}
            max_age = row["conn_max_age"]
            state = row["conn_max_age_state"]
            rows.append(
                {
                    "alias": alias,
                    "server_id": "-" if row["server_id"] is None else str(row["server_id"]),
                    "client": server.get("client") or "-",
                    "user": server.get("user") or "-",
                    "host": row["host"],
                    "owner": owner,
                    "age": seconds(row["age"]),
                    "idle": seconds(row["idle"]),
                    "wait_timeout": seconds(row["wait_timeout"]),
                    "conn_max_age": _max_age(state, max_age),
                    "queries": str(sum(o["queries"] or 0 for o in owners)) if owners else "-",
                    "request": _requests(opening, serving),
                    "state": server.get("state")
                    or (
                        "not on the server"
                        if row["server"] is None and report["aliases"][alias]["server"]["available"]
                        else "-"
                    ),
                    "flags": row["flags"],
                    "idle_ratio": _ratio(row["idle"], row["wait_timeout"]),
                    "age_ratio": _ratio(row["age"], max_age if max_age else None),
                }
            )
    return rows
