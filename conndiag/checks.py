"""System checks: the misconfigurations behind "MySQL server has gone away".

Ids are stable: ``conndiag.E0xx`` are errors, ``conndiag.W0xx`` warnings (docs/diagnosis.md
lists each with its message and hint). Static checks read settings and the environment only.
Database checks (``Tags.database``) ask the server, on a connection of their own that is
closed before they return; Django runs them with ``check --database ALIAS`` and ``migrate``
(Django 6.1 runs database checks only when databases are named).

| id | kind | fires when |
|----|------|------------|
| E001 | static | ``CONNDIAG`` is not valid |
| W001 | static | the middleware is not in ``MIDDLEWARE`` |
| W002 | static | the middleware is not first |
| W003 | static | ``CONN_MAX_AGE=None`` without ``CONN_HEALTH_CHECKS`` |
| W004 | static | persistent connections (``CONN_MAX_AGE`` not 0) under ASGI |
| E002 | static | ``PROMETHEUS_MULTIPROC_DIR`` set but missing or not writable |
| E003 | database | the server cannot be reached to read its facts |
| W005 | database | ``CONN_MAX_AGE`` None or >= the server's ``wait_timeout``, health checks off |
| W006 | database | ``max_connections`` below the connections the deployment may open |
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured

from . import conf
from .diagnosis import diagnose
from .serverfacts import PROBED_VENDORS, read_facts

MIDDLEWARE_PATH = "conndiag.middleware.ConnDiagMiddleware"
#: apps whose presence means the project is served over ASGI
ASGI_APPS = ("daphne", "channels")
#: environment variables prometheus_client reads for its multi-process directory
MULTIPROC_ENV = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")


@register(Tags.compatibility)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """conndiag.E001: the CONNDIAG setting is valid."""
    try:
        conf.parse(getattr(settings, "CONNDIAG", None))
    except ImproperlyConfigured as exc:
        return [
            Error(
                str(exc),
                hint="Fix the CONNDIAG setting; the README lists every key and its values.",
                id="conndiag.E001",
            )
        ]
    return []


@register(Tags.compatibility)
def check_middleware(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """conndiag.W001 (missing) and conndiag.W002 (not first)."""
    middleware = list(getattr(settings, "MIDDLEWARE", None) or [])
    if MIDDLEWARE_PATH not in middleware:
        return [
            Warning(
                f"{MIDDLEWARE_PATH} is not in MIDDLEWARE.",
                hint=(
                    "Add it first in MIDDLEWARE: under ASGI, without it, request ids, paths and "
                    "views are missing from conndiag's reports and async views are attributed "
                    "less precisely. (Under WSGI it steps out of the chain at start-up: the "
                    "request_started receiver does its work.)"
                ),
                id="conndiag.W001",
            )
        ]
    if middleware[0] != MIDDLEWARE_PATH:
        return [
            Warning(
                f"{MIDDLEWARE_PATH} is not first in MIDDLEWARE.",
                hint=(
                    "Move it first, so that under ASGI queries made by the middleware before it "
                    "are attributed to their request."
                ),
                id="conndiag.W002",
            )
        ]
    return []


@functools.cache
def _vendor(engine: str) -> str | None:
    """The vendor of backend ``engine`` (``sqlite`` for SpatiaLite too), None if it cannot
    be loaded (Django itself reports that)."""
    from django.db.utils import load_backend

    try:
        return str(load_backend(engine).DatabaseWrapper.vendor)
    except Exception:
        return None


def _server_databases() -> Iterable[tuple[str, Mapping[str, Any]]]:
    """``(alias, settings)`` of every configured database that has a server (not the SQLite
    family, recognised by the backend's vendor, not by its ENGINE path)."""
    for alias, db in (getattr(settings, "DATABASES", None) or {}).items():
        if _vendor(str(db.get("ENGINE", ""))) != "sqlite":
            yield alias, db


def _health_checks_supported() -> bool:
    import django

    return django.VERSION >= (4, 1)


@register(Tags.compatibility)
def check_persistent_without_health_checks(
    app_configs: Any = None, **kwargs: Any
) -> list[CheckMessage]:
    """conndiag.W003: CONN_MAX_AGE=None without CONN_HEALTH_CHECKS."""
    messages: list[CheckMessage] = []
    for alias, db in _server_databases():
        if "CONN_MAX_AGE" not in db or db["CONN_MAX_AGE"] is not None:
            continue
        if db.get("CONN_HEALTH_CHECKS"):
            continue
        if _health_checks_supported():
            hint = (
                f"Set DATABASES[{alias!r}]['CONN_HEALTH_CHECKS'] = True (Django checks the "
                "connection before its first use in each request), or a finite CONN_MAX_AGE "
                "below the server's wait_timeout."
            )
        else:
            hint = (
                "This Django has no CONN_HEALTH_CHECKS (4.1+): set a finite CONN_MAX_AGE below "
                "the server's wait_timeout, or upgrade and turn health checks on."
            )
        messages.append(
            Warning(
                f"DATABASES[{alias!r}] keeps connections forever (CONN_MAX_AGE=None) without "
                "health checks: once the server drops an idle connection (wait_timeout), the "
                "next request reuses it and fails with 'server has gone away'.",
                hint=hint,
                id="conndiag.W003",
            )
        )
    return messages


def asgi_detected() -> str | None:
    """Why the project looks ASGI-served (a setting or an installed app), or None."""
    if getattr(settings, "ASGI_APPLICATION", None):
        return "ASGI_APPLICATION is set"
    installed = list(getattr(settings, "INSTALLED_APPS", None) or [])
    for app in ASGI_APPS:
        if app in installed:
            return f"{app!r} is in INSTALLED_APPS"
    return None


@register(Tags.compatibility)
def check_persistent_under_asgi(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """conndiag.W004: CONN_MAX_AGE other than 0 under ASGI."""
    why = asgi_detected()
    if why is None:
        return []
    messages: list[CheckMessage] = []
    for alias, db in _server_databases():
        max_age = db.get("CONN_MAX_AGE", 0)
        if max_age == 0:
            continue
        shown = "None" if max_age is None else f"{max_age:g}"
        messages.append(
            Warning(
                f"DATABASES[{alias!r}]['CONN_MAX_AGE'] = {shown} under ASGI ({why}): Django "
                "4.0+ runs each request's sync code on its own thread, so every request "
                "leaves a persistent connection behind (Django ticket #33497); they pile up "
                "until the server's max_connections is reached.",
                hint=(
                    f"Set DATABASES[{alias!r}]['CONN_MAX_AGE'] = 0 under ASGI, or use a "
                    "connection pooler (Django 5.1+ 'pool' option for PostgreSQL, PgBouncer, "
                    "ProxySQL)."
                ),
                id="conndiag.W004",
            )
        )
    return messages


@register(Tags.compatibility)
def check_multiprocess_dir(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """conndiag.E002: the prometheus_client multi-process directory is usable."""
    try:
        metrics_on = conf.parse(getattr(settings, "CONNDIAG", None)).metrics
    except ImproperlyConfigured:
        return []  # E001 reports it
    if not metrics_on:
        return []
    for name in MULTIPROC_ENV:
        path = os.environ.get(name)
        if not path:
            continue
        if not os.path.isdir(path):
            problem = "does not exist or is not a directory"
        elif not os.access(path, os.W_OK | os.X_OK):
            problem = "is not writable by this process"
        else:
            return []
        return [
            Error(
                f"{name}={path!r} {problem}: prometheus_client cannot write the metrics of "
                "this process, so every metric update fails or is lost.",
                hint=(
                    f"Create the directory before the server starts, writable by the worker "
                    f"user, and empty it on each deploy (or unset {name} for a single-process "
                    "server)."
                ),
                id="conndiag.E002",
            )
        ]
    return []


# --- database checks ------------------------------------------------------------------------


def expected_connections(config: conf.Config | None = None) -> tuple[int, str] | None:
    """How many connections per alias the deployment may open at once, and where that came
    from: ``CONNDIAG["EXPECTED_CONNECTIONS"]``, else the ``WEB_CONCURRENCY`` environment
    variable (workers; one thread each), else None (not known: the check is skipped)."""
    if config is None:
        try:
            config = conf.get_config()
        except ImproperlyConfigured:
            return None
    if config.expected_connections is not None:
        return config.expected_connections, "CONNDIAG['EXPECTED_CONNECTIONS']"
    raw = os.environ.get("WEB_CONCURRENCY", "")
    if raw.strip().isdigit() and int(raw) > 0:
        return int(raw), "WEB_CONCURRENCY"
    return None


def _same_server(alias: str) -> list[str]:
    """Aliases configured for the same server as ``alias`` (each worker thread opens one
    connection per alias)."""
    databases = getattr(settings, "DATABASES", None) or {}
    mine = databases[alias]
    key = (mine.get("ENGINE"), mine.get("HOST"), str(mine.get("PORT")))
    return [
        other
        for other, db in databases.items()
        if (db.get("ENGINE"), db.get("HOST"), str(db.get("PORT"))) == key
        and not (db.get("TEST") or {}).get("MIRROR")
    ]


def database_report(alias: str) -> tuple[dict[str, Any] | None, list[CheckMessage]]:
    """The server facts of ``alias`` and the database check messages about it."""
    from django.db import connections

    db = connections[alias]
    if db.vendor not in PROBED_VENDORS:
        return None, []
    try:
        facts = read_facts(db)
    except Exception as exc:
        diagnosis = diagnose(exc, None)
        return None, [
            Error(
                f"conndiag cannot reach DATABASES[{alias!r}] to read its server facts: "
                f"{type(exc).__name__}: {exc} ({diagnosis.error_class}, code "
                f"{diagnosis.code}).",
                hint=f"Likely cause: {diagnosis.cause}.",
                id="conndiag.E003",
            )
        ]
    if facts is None:
        return None, []
    messages: list[CheckMessage] = []
    wait_timeout = facts.get("wait_timeout_s")
    max_age = db.settings_dict.get("CONN_MAX_AGE", 0)
    health = bool(db.settings_dict.get("CONN_HEALTH_CHECKS", False))
    if wait_timeout and not health and (max_age is None or (max_age and max_age >= wait_timeout)):
        kept = "None (kept forever)" if max_age is None else f"{max_age:g} s"
        messages.append(
            Warning(
                f"DATABASES[{alias!r}]['CONN_MAX_AGE'] = {kept} is not below the "
                f"server's wait_timeout ({wait_timeout:g} s) and health checks are off: a "
                "connection idle longer than wait_timeout is dropped by the server and then "
                "reused by Django, failing with 'server has gone away'.",
                hint=(
                    f"Set CONN_MAX_AGE below {wait_timeout:g} (with margin), or turn "
                    "CONN_HEALTH_CHECKS on (Django 4.1+), or raise the server's wait_timeout."
                ),
                id="conndiag.W005",
            )
        )
    expected = expected_connections()
    limit = facts.get("max_connections")
    if expected is not None and limit:
        per_alias, source = expected
        aliases = _same_server(alias)
        needed = per_alias * len(aliases)
        if needed > limit:
            messages.append(
                Warning(
                    f"The server of DATABASES[{alias!r}] allows max_connections={limit}, but "
                    f"the deployment may open {needed} ({per_alias} from {source} x "
                    f"{len(aliases)} alias(es) on this server: {', '.join(aliases)}); "
                    "connects will fail with 'Too many connections' (1040) under load.",
                    hint=(
                        "Raise the server's max_connections, lower workers x threads, or put "
                        "a pooler in between. Set CONNDIAG['EXPECTED_CONNECTIONS'] to the "
                        "total across every host."
                    ),
                    id="conndiag.W006",
                )
            )
    return facts, messages


@register(Tags.database)
def check_database(
    app_configs: Any = None, databases: Iterable[str] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """conndiag.E003, W005, W006: what the server says (only for the named databases)."""
    if databases is None:
        return []
    messages: list[CheckMessage] = []
    for alias in databases:
        messages.extend(database_report(alias)[1])
    return messages


#: every conndiag check, static then database (the doctor runs them all)
STATIC_CHECKS: tuple[Callable[..., list[CheckMessage]], ...] = (
    check_settings,
    check_middleware,
    check_persistent_without_health_checks,
    check_persistent_under_asgi,
    check_multiprocess_dir,
)
DATABASE_CHECKS: tuple[Callable[..., list[CheckMessage]], ...] = (check_database,)
