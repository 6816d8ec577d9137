"""The tests' settings with ``default`` = the MariaDB server, persistent connections, and
conndiag's events rendered as JSON lines (the format the Loki rules read) to a file.

``CONNDIAG_TEST_MYSQL_URL`` points at the server, ``CONNDIAG_E2E_DB`` names the database
(the e2e test creates it) and ``CONNDIAG_E2E_LOG`` is the JSON log file.
"""

from __future__ import annotations

import os

import structlog

from tests.settings import *  # noqa: F403
from tests.settings import MYSQL_URL, mysql_settings

_db = mysql_settings(os.environ.get("CONNDIAG_TEST_MYSQL_URL", MYSQL_URL))
_db["NAME"] = os.environ.get("CONNDIAG_E2E_DB", "conndiag_e2e")
_db["CONN_MAX_AGE"] = None  # persistent: what makes a dropped connection get reused

DATABASES = {"default": _db}
ROOT_URLCONF = "tests.e2e_site.urls"
INSTALLED_APPS = ["conndiag"]
CONNDIAG = {"LOG_QUERIES": True}

_log = open(os.environ.get("CONNDIAG_E2E_LOG", os.devnull), "a", buffering=1)  # noqa: SIM115
structlog.configure(
    processors=[
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso"),
        structlog.processors.JSONRenderer(),
    ],
    logger_factory=structlog.PrintLoggerFactory(file=_log),
    cache_logger_on_first_use=True,
)
