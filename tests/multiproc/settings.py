"""The tests' settings with ``default`` = the MariaDB server, persistent connections.

``CONNDIAG_MP_DB`` names the database (the multi-process test creates and drops it), so the
server's process list for it counts exactly this site's connections.
"""

from __future__ import annotations

import os

from tests.settings import *  # noqa: F403
from tests.settings import MYSQL_URL, log_events_as_json, mysql_settings

_db = mysql_settings(os.environ.get("CONNDIAG_TEST_MYSQL_URL", MYSQL_URL))
_db["NAME"] = os.environ.get("CONNDIAG_MP_DB", "conndiag_mp")
_db["CONN_MAX_AGE"] = None

DATABASES = {"default": _db}
ROOT_URLCONF = "tests.multiproc.urls"

if os.environ.get("CONNDIAG_TEST_EVENTS"):
    log_events_as_json(os.environ["CONNDIAG_TEST_EVENTS"])

if os.environ.get("CONNDIAG_TEST_WITHOUT_CONNDIAG"):
    # the same site without conndiag: the control the fork tests compare with
    INSTALLED_APPS = [a for a in INSTALLED_APPS if a != "conndiag"]  # noqa: F405
    MIDDLEWARE = [m for m in MIDDLEWARE if not m.startswith("conndiag.")]  # noqa: F405
    ROOT_URLCONF = "tests.multiproc.urls_without_conndiag"
