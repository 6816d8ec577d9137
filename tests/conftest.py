"""Shared fixtures: a real MariaDB/MySQL server, captured conndiag events, a fresh runtime.

MySQL tests use the ``mysql`` alias (see ``tests/settings.py``). When no server answers,
the session tries to start a private ``mariadbd`` in a temporary directory; if that fails
too, MySQL tests fail loudly under ``CI=true`` and are skipped, with the reason, elsewhere.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import pytest
import structlog
from django.conf import settings
from structlog.testing import capture_logs

from conndiag import runtime, serverfacts
from conndiag.logbackend import record_fields

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """A needed service or tool is missing: fail under ``CI=true``, skip (saying so) elsewhere."""
    if IN_CI:
        pytest.fail(f"CI needs it: {reason}", pytrace=False)
    pytest.skip(f"{reason} (under CI=true this fails)")


def require_tool(name: str, package: str) -> str:
    """The path of command ``name`` (from Debian's ``package``), or :func:`unavailable`."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (apt-get install {package})")
    return path


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _start_private_mariadb() -> tuple[str, int] | None:
    """Start a throw-away mariadbd on a free port; returns (host, port) or None."""
    server = shutil.which("mariadbd") or shutil.which("mysqld")
    install_db = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    if server is None or install_db is None:
        return None
    datadir = tempfile.mkdtemp(prefix="conndiag-mariadb-")
    subprocess.run(
        [
            install_db,
            f"--datadir={datadir}",
            "--auth-root-authentication-method=normal",
            "--user=root",
        ],
        check=True,
        capture_output=True,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.Popen(
        [
            server,
            f"--datadir={datadir}",
            f"--port={port}",
            "--bind-address=127.0.0.1",
            f"--socket={datadir}/mysqld.sock",
            "--user=root",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    for _ in range(100):
        if _reachable("127.0.0.1", port):
            return "127.0.0.1", port
        time.sleep(0.2)
    return None


def _mysql_probe() -> str | None:
    db = settings.DATABASES["mysql"]
    host, port = str(db["HOST"]), int(db["PORT"])
    if _reachable(host, port):
        return None
    started = _start_private_mariadb()
    if started is not None:
        db["HOST"], db["PORT"] = started[0], str(started[1])
        return None
    return f"no MySQL/MariaDB server at {host}:{port} and none could be started"


def _postgres_unavailable_reason() -> str | None:
    db = settings.DATABASES["postgres"]
    host, port = str(db["HOST"]), int(db["PORT"])
    if _reachable(host, port):
        return None
    return f"no PostgreSQL server at {host}:{port}"


_REASONS: dict[str, str | None] = {}
_PROBES = {"mysql": _mysql_probe, "postgres": _postgres_unavailable_reason}


def unavailable_reason(service: str) -> str | None:
    if service not in _REASONS:
        _REASONS[service] = _PROBES[service]()
    return _REASONS[service]


def mysql_unavailable_reason() -> str | None:
    """Why MySQL tests cannot run (None: they can), probed once per session."""
    return unavailable_reason("mysql")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that use the ``mysql`` / ``postgres`` alias get that marker automatically."""
    for item in items:
        cls = getattr(item, "cls", None)
        databases = set(getattr(cls, "databases", None) or ())
        marker = item.get_closest_marker("django_db")
        if marker is not None:
            databases |= set(marker.kwargs.get("databases", ()) or ())
        for service in _PROBES:
            if service in databases and service not in item.keywords:
                item.add_marker(getattr(pytest.mark, service))


def pytest_runtest_setup(item: pytest.Item) -> None:
    for service in _PROBES:
        if item.get_closest_marker(service) is None:
            continue
        reason = unavailable_reason(service)
        if reason is None:
            continue
        unavailable(f"a {service} server: {reason} (see tests/settings.py)")


@pytest.fixture(autouse=True)
def _fresh_runtime() -> Iterator[None]:
    """Every test starts with a runtime built from its own settings."""
    runtime.reset()
    yield
    runtime.reset()


class _EventRecords(logging.Handler):
    """Collects conndiag's stdlib records as the dicts structlog's ``capture_logs`` gives."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.entries: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        entry = record_fields(record)
        if "event" in entry:
            entry["log_level"] = record.levelname.lower()
            entry["message"] = record.getMessage()
            self.entries.append(entry)


@contextmanager
def capture_events(logger_name: str = "conndiag") -> Iterator[list[dict[str, Any]]]:
    """Every conndiag event emitted in the block, as dicts, from whichever backend is active.

    structlog configured (the test configured it, as an application would): structlog's
    ``capture_logs``, leaving structlog's configured state as it was. Otherwise conndiag logs
    through stdlib logging: a handler on the ``conndiag`` logger, which is opened to DEBUG
    for the block (as an application's ``LOGGING`` that wants routine events would), turns
    each record into ``{"event", "log_level", "message", **fields}``.
    """
    if structlog.is_configured():
        with capture_logs() as captured:
            yield captured
        return
    logger = logging.getLogger(logger_name)
    handler = _EventRecords()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.entries
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Every conndiag event emitted during the test, as dicts (see :func:`capture_events`).

    Connections earlier tests left to the garbage collector are collected and reported
    first, so they don't show up as this test's ``abandoned`` closes.
    """
    from conndiag.lifecycle import report_abandoned

    gc.collect()
    report_abandoned()
    with capture_events() as captured:
        yield captured


def of(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The captured events named ``name``."""
    return [e for e in events if e.get("event") == name]


@pytest.fixture(autouse=True, scope="session")
def _structlog_defaults() -> None:
    """The suite runs as a project that configured no structlog (stdlib backend) unless a
    test configures it."""
    structlog.reset_defaults()


@contextmanager
def mysql_wait_timeout(seconds: int) -> Iterator[None]:
    """New ``mysql`` connections get ``SET SESSION wait_timeout`` (their session only)."""
    from django.db import connections

    db = connections["mysql"]
    options = db.settings_dict["OPTIONS"]
    db.close()
    db.settings_dict["OPTIONS"] = {**options, "init_command": f"SET SESSION wait_timeout={seconds}"}
    serverfacts.clear_cache()
    try:
        yield
    finally:
        connections["mysql"].close()
        db.settings_dict["OPTIONS"] = options
        serverfacts.clear_cache()


@pytest.fixture
def short_timeout() -> Iterator[None]:
    """Every new ``mysql`` connection gets ``wait_timeout = 1``."""
    with mysql_wait_timeout(1):
        yield


def kill_mysql_connection(server_id: int) -> None:
    """``KILL`` a MySQL connection from another connection, as an operator or the server would."""
    from django.db import connections

    other = connections.create_connection("mysql")
    try:
        with other.cursor() as cursor:
            cursor.execute(f"KILL {int(server_id)}")
    finally:
        other.close()


ROOT = Path(__file__).resolve().parent.parent


def run_python(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run this Python on ``args`` from the repository root (importable as it is); stdout.

    Without ``env`` the child gets no ``DJANGO_SETTINGS_MODULE``: a script sets its own.
    A failure raises ``CalledProcessError`` with the child's output.
    """
    child = {**os.environ, "PYTHONPATH": str(ROOT)}
    child.pop("DJANGO_SETTINGS_MODULE", None)
    child.update(env or {})
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=child,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    ).stdout


def in_ended_threads(work: Callable[[], object], count: int = 1) -> None:
    """Run ``work`` in ``count`` threads, one after another, that end without closing their
    connections; then collect them and report what gc found (the next safe point would)."""
    from conndiag.lifecycle import report_abandoned

    for _ in range(count):
        t = threading.Thread(target=work)
        t.start()
        t.join()
    del t
    gc.collect()
    report_abandoned()
