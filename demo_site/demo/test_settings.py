"""The demo's settings for its own test suite: the site's settings, quieter.

The log goes nowhere (no file, no stdout) and conndiag logs only anomalies, unless the
environment says otherwise; the
database is Django's test database (SQLite in memory by default).
"""

from __future__ import annotations

import os

os.environ.setdefault("DEMO_LOG_FILE", "")
os.environ.setdefault("DEMO_LOG_STDOUT", "0")
# conndiag's warnings and errors only (what a failing test's captured log shows)
os.environ.setdefault("DEMO_CONNDIAG_LOG_LEVEL", "warning")

from demo.settings import *  # noqa: F403
