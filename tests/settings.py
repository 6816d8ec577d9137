"""Settings for conndiag's test suite: SQLite as ``default``, a real MariaDB as ``mysql``, a
real PostgreSQL as ``postgres`` (``CONNDIAG_TEST_POSTGRES_URL``, default
``postgresql://postgres@127.0.0.1:5432/test``).

``CONNDIAG_TEST_MYSQL_URL`` (default ``mysql://root@127.0.0.1:3306/test``) points the MySQL
alias elsewhere. The test database is ``test_conndiag`` (+ ``CONNDIAG_TEST_DB_SUFFIX``, so
matrix runs in parallel don't collide).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote, urlsplit

SECRET_KEY = "conndiag-tests-not-secret"
DEBUG = False
USE_TZ = True
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.urls"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "conndiag",
    "tests.testapp",
]
MIDDLEWARE = [
    "conndiag.middleware.ConnDiagMiddleware",
    "django.middleware.common.CommonMiddleware",
]


def server_settings(url: str, engine: str, port: int, user: str) -> dict[str, Any]:
    """A ``DATABASES`` entry for a server database from ``scheme://user:pw@host:port/name``."""
    parts = urlsplit(url)
    return {
        "ENGINE": engine,
        "HOST": parts.hostname or "127.0.0.1",
        "PORT": str(parts.port or port),
        "USER": unquote(parts.username or user),
        "PASSWORD": unquote(parts.password or ""),
        "NAME": parts.path.lstrip("/") or "test",
        "TEST": {
            "NAME": "test_conndiag" + os.environ.get("CONNDIAG_TEST_DB_SUFFIX", ""),
            "DEPENDENCIES": [],
        },
    }


def mysql_settings(url: str) -> dict[str, Any]:
    db = server_settings(url, "django.db.backends.mysql", 3306, "root")
    db["OPTIONS"] = {"charset": "utf8mb4"}
    return db


def postgres_settings(url: str) -> dict[str, Any]:
    return server_settings(url, "django.db.backends.postgresql", 5432, "postgres")


POSTGRES_URL = os.environ.get(
    "CONNDIAG_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("CONNDIAG_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")

DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
    "mysql": mysql_settings(MYSQL_URL),
    "postgres": postgres_settings(POSTGRES_URL),
}

CONNDIAG: dict[str, object] = {}

LOGGING_CONFIG = None


def log_events_as_json(path: str) -> None:
    """Send conndiag's events as JSON lines (``event``, ``level``, the fields) to ``path``,
    appended, line-buffered: several processes (a server's workers, a test runner's) share
    it. For the sites that tests run in other processes."""
    import structlog

    out = open(path, "a", buffering=1)  # noqa: SIM115 - for the life of the process
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
