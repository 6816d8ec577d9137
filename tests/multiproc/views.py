from __future__ import annotations

import os
import time

from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse

from tests.testapp.models import Item


def item_count(request: HttpRequest) -> HttpResponse:
    """Exactly one ORM query; the worker's pid tells the test which worker holds connections."""
    return JsonResponse({"count": Item.objects.count(), "pid": os.getpid()})


def sleep(request: HttpRequest) -> HttpResponse:
    """No database: sleep ``?s=`` seconds (a request uWSGI's harakiri kills)."""
    time.sleep(float(request.GET.get("s", "5")))
    return JsonResponse({"pid": os.getpid()})


def pid(request: HttpRequest) -> HttpResponse:
    """No database: which process served the request."""
    return JsonResponse({"pid": os.getpid()})


def echo(request: HttpRequest) -> HttpResponse:
    """Ask the database server to echo this request's value: a response carrying another
    value read another request's result rows (a connection shared across processes)."""
    value = request.GET.get("v", "")
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s", [value])
        (echoed,) = cursor.fetchone()
    return JsonResponse({"sent": value, "echoed": echoed, "pid": os.getpid()})
