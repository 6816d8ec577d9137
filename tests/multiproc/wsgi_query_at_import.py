"""The site, plus the mistake the fork tests reproduce: a query at import time.

Under a pre-forking server without lazy-apps (uWSGI's default, gunicorn ``--preload``) this
module is imported once, in the master, so the connection opened here is inherited by every
worker.
"""

from __future__ import annotations

from django.db import connection

from tests.multiproc.wsgi import application

with connection.cursor() as cursor:
    cursor.execute("SELECT 1")

__all__ = ["application"]
