from __future__ import annotations

import os

from django.http import HttpRequest, HttpResponse, JsonResponse

from tests.testapp.models import Item


def item_count(request: HttpRequest) -> HttpResponse:
    """Exactly one ORM query; the worker's pid tells the test which worker holds connections."""
    return JsonResponse({"count": Item.objects.count(), "pid": os.getpid()})
