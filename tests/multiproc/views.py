from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse

from tests.testapp.models import Item


def item_count(request: HttpRequest) -> HttpResponse:
    """Exactly one ORM query."""
    return JsonResponse({"count": Item.objects.count()})
