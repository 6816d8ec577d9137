"""Settings for the suite that the fork tests run under ``manage.py test --parallel`` and
pytest-xdist: one alias per kind of database the issue names:

- ``default``: SQLite, in-memory test database (Django's default for SQLite);
- ``sqlitefile``: SQLite with a file test database (in ``CONNDIAG_FORKSUITE_DIR``);
- ``mysql``, ``postgres``: the tests' servers, when ``CONNDIAG_FORKSUITE_SERVERS`` names them.

``CONNDIAG_FORKSUITE_WITHOUT=1`` removes conndiag (the baseline); conndiag's events go as
JSON lines to ``CONNDIAG_TEST_EVENTS``. ``CONNDIAG_FORKSUITE_TAG`` keeps the test databases
of concurrent runs apart.
"""

from __future__ import annotations

import os

from tests.settings import *  # noqa: F403
from tests.settings import (
    MYSQL_URL,
    POSTGRES_URL,
    log_events_as_json,
    mysql_settings,
    postgres_settings,
)

_tag = os.environ.get("CONNDIAG_FORKSUITE_TAG", "") + os.environ.get("CONNDIAG_TEST_DB_SUFFIX", "")
_dir = os.environ.get("CONNDIAG_FORKSUITE_DIR", "/tmp")
DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
    "sqlitefile": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(_dir, "db.sqlite3"),
        "TEST": {"NAME": os.path.join(_dir, "test.sqlite3")},
    },
}
_servers = os.environ.get("CONNDIAG_FORKSUITE_SERVERS", "").split(",")
for _alias, _make, _url in (
    ("mysql", mysql_settings, MYSQL_URL),
    ("postgres", postgres_settings, POSTGRES_URL),
):
    if _alias in _servers:
        DATABASES[_alias] = _make(_url)
        DATABASES[_alias]["TEST"]["NAME"] = "test_conndiag_forksuite" + _tag

if os.environ.get("CONNDIAG_FORKSUITE_WITHOUT"):
    INSTALLED_APPS = [a for a in INSTALLED_APPS if a != "conndiag"]  # noqa: F405
    MIDDLEWARE = [m for m in MIDDLEWARE if not m.startswith("conndiag.")]  # noqa: F405

if os.environ.get("CONNDIAG_TEST_EVENTS"):
    log_events_as_json(os.environ["CONNDIAG_TEST_EVENTS"])
