"""Settings of conndiag's demo site. Everything that changes between runs comes from the
environment, so each failure mode can be shown without editing this file.

Variable                  Meaning (default)
DATABASE_URL              mysql://user:pass@host:port/name or sqlite:///path
                          (default: SQLite in demo_site/var/demo.sqlite3)
DEMO_CONN_MAX_AGE         CONN_MAX_AGE in seconds, or "none" for persistent connections (0)
DEMO_CONN_HEALTH_CHECKS   CONN_HEALTH_CHECKS, 1 or 0 (0)
DEMO_MYSQL_WAIT_TIMEOUT   MySQL only: SET SESSION wait_timeout=N on connect (server's value)
DEMO_VAR_DIR              where the SQLite file and the log go (demo_site/var)
DEMO_LOG_FILE             the JSON log file; empty for none (DEMO_VAR_DIR/demo.log)
DEMO_LOG_STDOUT           also log to stdout, 1 or 0 (1)
DEMO_LOG_FORMAT           json or console (json)
DEMO_LOG_LEVEL            level of the site's and Django's logs (info)
DEMO_QUERY_LOG_LEVEL      CONNDIAG["QUERY_LOG_LEVEL"], the level of per-query events (info)
DEMO_CONNDIAG_LOG_LEVEL   level of the "conndiag" logger; "warning" hides the per-query
                          events and keeps the anomalies (DEMO_QUERY_LOG_LEVEL)
DEMO_DETACHED_POLICY      CONNDIAG["POLICY"]["detached"]: raise, log or ignore (raise)
DEMO_LOG_SQL              CONNDIAG["LOG_SQL"], 1 or 0 (1)
"""

from __future__ import annotations

import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from demo import dburl, logconfig

SITE_DIR = Path(__file__).resolve().parent.parent  # demo_site/
VAR_DIR = Path(os.environ.get("DEMO_VAR_DIR", SITE_DIR / "var"))


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    msg = f"{name}={value!r} is not valid: expected 1 or 0."
    raise ImproperlyConfigured(msg)


def conn_max_age(value: str) -> int | None:
    """``DEMO_CONN_MAX_AGE``: a number of seconds, or ``none`` for persistent connections."""
    if value.strip().lower() in ("none", "null", "persistent"):
        return None
    try:
        seconds = int(value)
    except ValueError:
        seconds = -1
    if seconds < 0:
        msg = f"DEMO_CONN_MAX_AGE={value!r} is not valid: expected seconds (0, 60...) or 'none'."
        raise ImproperlyConfigured(msg)
    return seconds


def _database_from_url(url: str) -> dict[str, object]:
    try:
        return dburl.database_from_url(url)
    except dburl.DatabaseURLError as exc:
        raise ImproperlyConfigured(str(exc)) from None


SECRET_KEY = os.environ.get("DEMO_SECRET_KEY", "conndiag-demo-not-secret")
DEBUG = _flag("DEMO_DEBUG", False)
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
ROOT_URLCONF = "demo.urls"
WSGI_APPLICATION = "demo.wsgi.application"
ASGI_APPLICATION = "demo.asgi.application"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "conndiag",
    "jobs",
]

MIDDLEWARE = [
    "conndiag.middleware.ConnDiagMiddleware",  # first: every other layer runs inside its scope
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]

_db_url = os.environ.get("DATABASE_URL", "")
DATABASES = {
    "default": (
        _database_from_url(_db_url)
        if _db_url
        else {"ENGINE": "django.db.backends.sqlite3", "NAME": str(VAR_DIR / "demo.sqlite3")}
    )
}
DATABASES["default"]["CONN_MAX_AGE"] = conn_max_age(os.environ.get("DEMO_CONN_MAX_AGE", "0"))
DATABASES["default"]["CONN_HEALTH_CHECKS"] = _flag("DEMO_CONN_HEALTH_CHECKS", False)
_wait_timeout = os.environ.get("DEMO_MYSQL_WAIT_TIMEOUT", "")
if DATABASES["default"]["ENGINE"] == "django.db.backends.mysql" and _wait_timeout:
    # A short server-side idle timeout for this site's sessions only: shows "gone away" fast.
    DATABASES["default"]["OPTIONS"]["init_command"] = (  # type: ignore[index]
        f"SET SESSION wait_timeout={int(_wait_timeout)}"
    )
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several gunicorn workers and threads write at once: wait for the lock, don't fail.
    DATABASES["default"]["OPTIONS"] = {"timeout": 20}

QUERY_LOG_LEVEL = os.environ.get("DEMO_QUERY_LOG_LEVEL", "info").lower()
CONNDIAG = {
    "QUERY_LOG_LEVEL": QUERY_LOG_LEVEL,
    "LOG_SQL": _flag("DEMO_LOG_SQL", True),
    "POLICY": {"detached": os.environ.get("DEMO_DETACHED_POLICY", "raise")},
}

# -- logging -------------------------------------------------------------------------------
VAR_DIR.mkdir(parents=True, exist_ok=True)
LOG_FILE = os.environ.get("DEMO_LOG_FILE", str(VAR_DIR / "demo.log")) or None
logconfig.configure_structlog()
LOGGING_CONFIG = "logging.config.dictConfig"
LOGGING = logconfig.logging_dict(
    level=os.environ.get("DEMO_LOG_LEVEL", "info"),
    conndiag_level=os.environ.get("DEMO_CONNDIAG_LOG_LEVEL", QUERY_LOG_LEVEL),
    fmt=os.environ.get("DEMO_LOG_FORMAT", "json"),
    log_file=LOG_FILE,
    stdout=_flag("DEMO_LOG_STDOUT", True),
)
