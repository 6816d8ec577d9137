"""Work for a ``multiprocessing`` child of any start method (importable without Django
set up: a spawned or forkserver child starts a fresh interpreter)."""

from __future__ import annotations

import os
from typing import Any


def query_and_report(alias: str) -> dict[str, Any]:
    """Set Django up if this process has not, run a query, say which pids conndiag saw."""
    import django
    from django.apps import apps

    if not apps.ready:
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
        django.setup()
    from django.db import connections

    from conndiag import process
    from conndiag.state import state_of

    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1")
    state = state_of(connections[alias])
    return {
        "getpid": os.getpid(),
        "conndiag": process.pid(),
        "connection_pid": None if state is None else state.pid,
    }
