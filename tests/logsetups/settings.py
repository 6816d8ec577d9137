"""A fresh project's settings (what ``startproject`` writes), plus one logging set-up.

``CONNDIAG_LOG_SETUP`` picks the set-up, as in docs/logging.md:

- ``nothing``: no ``LOGGING``, no structlog configuration (Django's defaults);
- ``stdlib-json``: ``LOGGING`` with python-json-logger, JSON lines on stdout;
- ``structlog-json``: ``structlog.configure()``, JSON lines on stdout;
- ``django-structlog``: structlog handing its events to stdlib logging
  (``structlog.stdlib.LoggerFactory`` + ``ProcessorFormatter``), the django-structlog way.

``CONNDIAG_LOG_LEVEL`` is the level of the ``conndiag`` logger in the configured set-ups
(``DEBUG``: every query). ``CONNDIAG_SETUP_DB`` is the SQLite file.
"""

from __future__ import annotations

import os

# conndiag and the test views' app, conndiag's middleware first (as in the test suite)
from tests.settings import INSTALLED_APPS, MIDDLEWARE  # noqa: F401

SETUP = os.environ.get("CONNDIAG_LOG_SETUP", "nothing")
LEVEL = os.environ.get("CONNDIAG_LOG_LEVEL", "DEBUG")

SECRET_KEY = "conndiag-log-setups-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.urls"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("CONNDIAG_SETUP_DB", "db.sqlite3"),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = True

#: the one handler of both LOGGING set-ups: JSON lines on stdout
_JSON_TO_STDOUT = {
    "class": "logging.StreamHandler",
    "formatter": "json",
    "stream": "ext://sys.stdout",
}

if SETUP == "stdlib-json":
    # docs/logging.md, "stdlib LOGGING"
    LOGGING = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {
                "()": "pythonjsonlogger.json.JsonFormatter",
                "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
                "rename_fields": {"asctime": "timestamp", "levelname": "level"},
            },
        },
        "handlers": {"json": _JSON_TO_STDOUT},
        "loggers": {
            "conndiag": {"handlers": ["json"], "level": LEVEL, "propagate": False},
        },
    }
elif SETUP == "structlog-json":
    # docs/logging.md, "structlog"
    import logging
    import sys

    import structlog

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, LEVEL)),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
elif SETUP == "django-structlog":
    # docs/logging.md, "django-structlog"
    import structlog

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.filter_by_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    LOGGING = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {
                "()": structlog.stdlib.ProcessorFormatter,
                "processor": structlog.processors.JSONRenderer(),
            },
        },
        "handlers": {"json": _JSON_TO_STDOUT},
        "loggers": {
            "conndiag": {"handlers": ["json"], "level": LEVEL, "propagate": False},
        },
    }
elif SETUP != "nothing":
    raise ValueError(f"unknown CONNDIAG_LOG_SETUP {SETUP!r}")
