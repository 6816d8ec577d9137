"""System checks: each id fires on its misconfiguration and stays quiet otherwise.

Static checks are driven through settings; database checks ask the real MariaDB server
(``wait_timeout`` set per session through ``init_command``, the real ``max_connections``).
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.core.checks import Tags, run_checks
from django.core.checks.registry import registry
from django.db import connections

from conndiag import checks

MYSQL_DB = pytest.mark.django_db(databases=["default", "mysql"])


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*checks.MULTIPROC_ENV, "WEB_CONCURRENCY"):
        monkeypatch.delenv(name, raising=False)


def ids(messages: list[Any]) -> list[str]:
    return [m.id for m in messages]


@pytest.fixture
def databases(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A DATABASES setting for the static checks to read (set without ``setting_changed``:
    the static checks read settings only, and the live connections stay as they are)."""
    value: dict[str, Any] = {
        "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
        "main": {"ENGINE": "django.db.backends.mysql", "NAME": "x", "CONN_MAX_AGE": 0},
    }
    monkeypatch.setattr(django_settings, "DATABASES", value)
    return value


def invalid_conndiag(monkeypatch: pytest.MonkeyPatch, value: Any) -> None:
    """Set an invalid CONNDIAG the way a settings file would (conndiag's own receiver would
    refuse it through ``override_settings``)."""
    monkeypatch.setattr(django_settings, "CONNDIAG", value)


# --- registration -------------------------------------------------------------------------


def test_checks_are_registered() -> None:
    """Every conndiag check is registered; the database check under Tags.database only."""
    registered = registry.get_checks(include_deployment_checks=True)
    for check in (*checks.STATIC_CHECKS, *checks.DATABASE_CHECKS):
        assert check in registered
    assert set(checks.check_database.tags) == {Tags.database}  # type: ignore[attr-defined]
    for check in checks.STATIC_CHECKS:
        assert Tags.database not in check.tags  # type: ignore[attr-defined]


def test_the_test_settings_pass_every_static_check() -> None:
    """The test project is configured correctly: no conndiag message without databases."""
    assert [m for m in run_checks() if m.id and m.id.startswith("conndiag.")] == []


# --- E001, W001, W002 ---------------------------------------------------------------------


def test_e001_invalid_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """conndiag.E001 names the bad key; a valid setting passes."""
    invalid_conndiag(monkeypatch, {"REPLACE_STALE": "yes"})
    (message,) = checks.check_settings()
    assert message.id == "conndiag.E001"
    assert "REPLACE_STALE" in message.msg
    assert message.hint
    monkeypatch.setattr(django_settings, "CONNDIAG", {"REPLACE_STALE": True})
    assert checks.check_settings() == []


def test_w001_middleware_missing(settings: Any) -> None:
    """conndiag.W001 fires when the middleware is absent."""
    settings.MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
    assert ids(checks.check_middleware()) == ["conndiag.W001"]


def test_w002_middleware_not_first(settings: Any) -> None:
    """conndiag.W002 fires when the middleware is present but not first; first passes."""
    settings.MIDDLEWARE = ["django.middleware.common.CommonMiddleware", checks.MIDDLEWARE_PATH]
    assert ids(checks.check_middleware()) == ["conndiag.W002"]
    settings.MIDDLEWARE = [checks.MIDDLEWARE_PATH, "django.middleware.common.CommonMiddleware"]
    assert checks.check_middleware() == []


# --- W003 ---------------------------------------------------------------------------------


def test_w003_persistent_without_health_checks(databases: dict[str, Any]) -> None:
    """conndiag.W003 fires for CONN_MAX_AGE=None without CONN_HEALTH_CHECKS, per alias."""
    databases["main"]["CONN_MAX_AGE"] = None
    (message,) = checks.check_persistent_without_health_checks()
    assert message.id == "conndiag.W003"
    assert "'main'" in message.msg
    assert "CONN_HEALTH_CHECKS" in message.hint


def test_w003_quiet_with_health_checks_or_finite_age(databases: dict[str, Any]) -> None:
    """conndiag.W003 stays quiet with health checks on, a finite CONN_MAX_AGE, or SQLite."""
    databases["main"].update(CONN_MAX_AGE=None, CONN_HEALTH_CHECKS=True)
    assert checks.check_persistent_without_health_checks() == []
    databases["main"].update(CONN_MAX_AGE=60, CONN_HEALTH_CHECKS=False)
    assert checks.check_persistent_without_health_checks() == []
    databases["default"]["CONN_MAX_AGE"] = None
    assert checks.check_persistent_without_health_checks() == []


def test_sqlite_family_is_known_by_vendor_not_engine_path(databases: dict[str, Any]) -> None:
    """A SQLite-based backend whose ENGINE lacks "sqlite3" (SpatiaLite's is
    ``django.contrib.gis.db.backends.spatialite``) has no server: W003 stays quiet for it."""
    databases["geo"] = {"ENGINE": "tests.spatialite_like", "NAME": ":memory:", "CONN_MAX_AGE": None}
    assert checks.check_persistent_without_health_checks() == []
    assert [alias for alias, _ in checks._server_databases()] == ["main"]


# --- W004 ---------------------------------------------------------------------------------


def test_w004_persistent_connections_under_asgi(databases: dict[str, Any], settings: Any) -> None:
    """conndiag.W004 fires for CONN_MAX_AGE > 0 (or None) when ASGI_APPLICATION is set."""
    settings.ASGI_APPLICATION = "project.asgi.application"
    databases["main"]["CONN_MAX_AGE"] = 60
    (message,) = checks.check_persistent_under_asgi()
    assert message.id == "conndiag.W004"
    assert "ASGI_APPLICATION is set" in message.msg
    databases["main"]["CONN_MAX_AGE"] = None
    assert ids(checks.check_persistent_under_asgi()) == ["conndiag.W004"]


def test_w004_detects_asgi_from_installed_apps(
    databases: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """conndiag.W004 also recognises daphne (or channels) in INSTALLED_APPS."""
    # Read as a setting only: daphne is not installed here, so the app registry is left as is.
    monkeypatch.setattr(
        django_settings, "INSTALLED_APPS", ["daphne", *django_settings.INSTALLED_APPS]
    )
    databases["main"]["CONN_MAX_AGE"] = 60
    (message,) = checks.check_persistent_under_asgi()
    assert "'daphne' is in INSTALLED_APPS" in message.msg


def test_w004_quiet_without_asgi_or_with_per_request_connections(
    databases: dict[str, Any], settings: Any
) -> None:
    """conndiag.W004 stays quiet under WSGI, and under ASGI with CONN_MAX_AGE=0."""
    databases["main"]["CONN_MAX_AGE"] = 60
    assert checks.check_persistent_under_asgi() == []
    settings.ASGI_APPLICATION = "project.asgi.application"
    databases["main"]["CONN_MAX_AGE"] = 0
    assert checks.check_persistent_under_asgi() == []


# --- E002 ---------------------------------------------------------------------------------


def test_e002_multiprocess_dir_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """conndiag.E002 fires when PROMETHEUS_MULTIPROC_DIR does not exist."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    (message,) = checks.check_multiprocess_dir()
    assert message.id == "conndiag.E002"
    assert "does not exist" in message.msg


def test_e002_multiprocess_dir_not_writable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """conndiag.E002 fires when the directory is not writable (for root: immutable)."""
    root = os.geteuid() == 0
    if root:  # root ignores mode bits; an immutable directory is unwritable even for root
        subprocess.run(["chattr", "+i", str(tmp_path)], check=True)
    else:
        tmp_path.chmod(0o500)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    try:
        assert "not writable" in checks.check_multiprocess_dir()[0].msg
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(tmp_path)], check=True)
        else:
            tmp_path.chmod(0o700)


def test_e002_quiet_for_a_usable_dir_unset_or_metrics_off(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """conndiag.E002 stays quiet for a writable directory, when unset, and with METRICS off."""
    assert checks.check_multiprocess_dir() == []
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert checks.check_multiprocess_dir() == []
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    monkeypatch.setattr(django_settings, "CONNDIAG", {"METRICS": False})
    assert checks.check_multiprocess_dir() == []
    invalid_conndiag(monkeypatch, {"METRICS": "maybe"})
    assert checks.check_multiprocess_dir() == []  # E001 reports that


# --- database checks ----------------------------------------------------------------------


@pytest.fixture
def mysql_db() -> Iterator[dict[str, Any]]:
    """The ``mysql`` alias's settings dict with ``wait_timeout = 5``, restored afterwards."""
    db = connections["mysql"]
    sd = db.settings_dict
    saved = {key: sd.get(key) for key in ("OPTIONS", "CONN_MAX_AGE", "CONN_HEALTH_CHECKS", "PORT")}
    sd["OPTIONS"] = {**sd["OPTIONS"], "init_command": "SET SESSION wait_timeout=5"}
    yield sd
    sd.update(saved)


def test_database_check_needs_named_databases() -> None:
    """Without ``databases`` (plain ``manage.py check``) the database check does nothing."""
    assert checks.check_database() == []
    assert checks.check_database(databases=None) == []


@MYSQL_DB
def test_w005_conn_max_age_not_below_wait_timeout(mysql_db: dict[str, Any]) -> None:
    """conndiag.W005 fires when CONN_MAX_AGE >= the session's wait_timeout, health checks off;
    the thread's own connection is left untouched."""
    before = connections["mysql"].connection
    mysql_db.update(CONN_MAX_AGE=600, CONN_HEALTH_CHECKS=False)
    (message,) = checks.check_database(databases=["mysql"])
    assert message.id == "conndiag.W005"
    assert "wait_timeout (5 s)" in message.msg
    assert connections["mysql"].connection is before


@MYSQL_DB
def test_w005_persistent_connections_name_the_wait_timeout(mysql_db: dict[str, Any]) -> None:
    """conndiag.W005 fires for CONN_MAX_AGE=None (kept forever) without health checks, with
    the wait_timeout the check just read from the server."""
    mysql_db.update(CONN_MAX_AGE=None, CONN_HEALTH_CHECKS=False)
    (message,) = checks.check_database(databases=["mysql"])
    assert message.id == "conndiag.W005"
    assert "CONN_MAX_AGE'] = None" in message.msg
    assert "wait_timeout (5 s)" in message.msg
    assert "below 5" in message.hint
    mysql_db.update(CONN_HEALTH_CHECKS=True)
    assert checks.check_database(databases=["mysql"]) == []


@MYSQL_DB
def test_w005_quiet_below_wait_timeout_or_with_health_checks(mysql_db: dict[str, Any]) -> None:
    """conndiag.W005 stays quiet for CONN_MAX_AGE below wait_timeout, or with health checks."""
    mysql_db.update(CONN_MAX_AGE=3, CONN_HEALTH_CHECKS=False)
    assert checks.check_database(databases=["mysql"]) == []
    mysql_db.update(CONN_MAX_AGE=600, CONN_HEALTH_CHECKS=True)
    assert checks.check_database(databases=["mysql"]) == []


@MYSQL_DB
def test_w006_max_connections_below_expected(mysql_db: dict[str, Any], settings: Any) -> None:
    """conndiag.W006 fires when EXPECTED_CONNECTIONS exceeds the server's max_connections."""
    settings.CONNDIAG = {"EXPECTED_CONNECTIONS": 100_000}
    (message,) = checks.check_database(databases=["mysql"])
    assert message.id == "conndiag.W006"
    assert "CONNDIAG['EXPECTED_CONNECTIONS']" in message.msg


@MYSQL_DB
def test_w006_reads_web_concurrency(
    mysql_db: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """conndiag.W006 falls back to the WEB_CONCURRENCY environment variable."""
    monkeypatch.setenv("WEB_CONCURRENCY", "100000")
    (message,) = checks.check_database(databases=["mysql"])
    assert "from WEB_CONCURRENCY" in message.msg


@MYSQL_DB
def test_w006_quiet_when_the_server_has_room_or_nothing_is_known(
    mysql_db: dict[str, Any], settings: Any
) -> None:
    """conndiag.W006 stays quiet below max_connections and when no worker count is known."""
    assert checks.check_database(databases=["mysql"]) == []
    settings.CONNDIAG = {"EXPECTED_CONNECTIONS": 2}
    assert checks.check_database(databases=["mysql"]) == []


@MYSQL_DB
def test_e003_server_unreachable(mysql_db: dict[str, Any]) -> None:
    """conndiag.E003 fires, with the diagnosis, when the server cannot be reached."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        mysql_db["PORT"] = str(s.getsockname()[1])
    (message,) = checks.check_database(databases=["mysql"])
    assert message.id == "conndiag.E003"
    assert "refused" in message.msg
    assert "HOST/PORT" in message.hint


@MYSQL_DB
def test_database_checks_skip_servers_without_facts() -> None:
    """SQLite aliases are not probed: no database message for them."""
    assert checks.check_database(databases=["default"]) == []


@MYSQL_DB
def test_check_command_runs_the_database_check(mysql_db: dict[str, Any]) -> None:
    """Through Django's registry: named databases run conndiag's database check, others don't
    (Django 6.1 runs database checks only when databases are named)."""
    mysql_db.update(CONN_MAX_AGE=600, CONN_HEALTH_CHECKS=False)
    assert "conndiag.W005" in ids(run_checks(databases=["mysql"]))
    assert "conndiag.W005" not in ids(run_checks())
