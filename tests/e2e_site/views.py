"""Views the end-to-end test drives: safe work, the detached-thread bug, a forced 2006."""

from __future__ import annotations

import threading
import time

from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse

import conndiag


def _query() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return int(cursor.fetchone()[0])


def work(request: HttpRequest) -> HttpResponse:
    """Database work in the view, on the request's thread: the safe pattern."""
    return JsonResponse({"result": _query()})


def detached(request: HttpRequest) -> HttpResponse:
    """The bug: a thread started from the view does database work (conndiag refuses it)."""
    outcome: list[str] = []

    def job() -> None:
        try:
            _query()
            outcome.append("ran")
        except conndiag.UnsafeQueryError as exc:
            outcome.append(f"refused:{exc.context}")

    thread = threading.Thread(target=job, name="e2e-detached")
    thread.start()
    thread.join(5)
    return JsonResponse({"thread": outcome[0] if outcome else "timeout"})


def arm(request: HttpRequest) -> HttpResponse:
    """Shrink this persistent connection's wait_timeout to 1 s (conndiag still believes the
    value it read when the connection opened)."""
    with connection.cursor() as cursor:
        cursor.execute("SET SESSION wait_timeout = 1")
    return JsonResponse({"armed": True})


def gone_away(request: HttpRequest) -> HttpResponse:
    """Idle past the shortened wait_timeout, then query: the server has dropped us (2006)."""
    time.sleep(float(request.GET.get("sleep", "2.5")))
    try:
        _query()
    except DatabaseError as exc:
        return JsonResponse({"error": str(exc)})
    return JsonResponse({"error": None})
