"""``tests.inspector_site`` on PostgreSQL: ``default`` is the database ``CONNDIAG_MP_DB``."""

from __future__ import annotations

import os

from tests.inspector_site.settings import *  # noqa: F403
from tests.settings import POSTGRES_URL, postgres_settings

_db = postgres_settings(os.environ.get("CONNDIAG_TEST_POSTGRES_URL", POSTGRES_URL))
_db["NAME"] = os.environ.get("CONNDIAG_MP_DB", "conndiag_insp")
_db["CONN_MAX_AGE"] = None

DATABASES = {"default": _db}
