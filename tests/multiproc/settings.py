"""The tests' settings with ``default`` = the MariaDB server, persistent connections.

``CONNDIAG_MP_DB`` names the database (the multi-process test creates and drops it), so the
server's process list for it counts exactly this site's connections.
"""

from __future__ import annotations

import os

from tests.settings import *  # noqa: F403
from tests.settings import MYSQL_URL, mysql_settings

_db = mysql_settings(os.environ.get("CONNDIAG_TEST_MYSQL_URL", MYSQL_URL))
_db["NAME"] = os.environ.get("CONNDIAG_MP_DB", "conndiag_mp")
_db["CONN_MAX_AGE"] = None

DATABASES = {"default": _db}
ROOT_URLCONF = "tests.multiproc.urls"
