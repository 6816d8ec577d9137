"""Views the tests drive through the real WSGI and ASGI handlers.

Each view that hands work to another thread waits for it and reports the outcome in its
response, so a test can assert on what happened in that thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import async_to_sync, sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse

import conndiag
from tests.testapp.models import Item

POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-pool")
#: a test may set this to run code on the request thread of ``nothing_view``
START_HOOK: Callable[[], None] | None = None


def _alias(request: HttpRequest) -> str:
    return request.GET.get("db", "default")


def _write(alias: str) -> str:
    try:
        Item.objects.using(alias).create(name="x")
        return "ok"
    except conndiag.UnsafeQueryError as exc:
        return f"refused:{exc.context}"


def sync_view(request: HttpRequest) -> HttpResponse:
    Item.objects.using(_alias(request)).create(name="sync")
    return JsonResponse({"count": Item.objects.using(_alias(request)).count()})


def thread_view(request: HttpRequest) -> HttpResponse:
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(_write(_alias(request))))
    t.start()
    t.join()
    return JsonResponse({"thread": result[0]})


def executor_view(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"task": POOL.submit(_write, _alias(request)).result()})


def hatch_view(request: HttpRequest) -> HttpResponse:
    alias = _alias(request)

    @conndiag.background_db_work()
    def work() -> str:
        return _write(alias)

    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(work()))
    t.start()
    t.join()
    return JsonResponse({"thread": result[0]})


async def async_view(request: HttpRequest) -> HttpResponse:
    """The async ORM (Django 4.1+), or ``sync_to_async`` on Django 3.2/4.0."""
    manager = Item.objects.using(_alias(request))
    if hasattr(manager, "acreate"):
        item = await manager.acreate(name="async")
        fetched = await manager.aget(pk=item.pk)
    else:
        item = await sync_to_async(manager.create)(name="async")
        fetched = await sync_to_async(manager.get)(pk=item.pk)
    return JsonResponse({"name": fetched.name})


async def async_to_thread_view(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"thread": await asyncio.to_thread(_write, _alias(request))})


def sync_awaits_to_thread_view(request: HttpRequest) -> HttpResponse:
    """A sync view awaiting ORM work run by ``asyncio.to_thread`` and by
    ``sync_to_async(thread_sensitive=False)``, through ``async_to_sync``."""
    alias = _alias(request)

    async def work() -> list[str]:
        return [
            await asyncio.to_thread(_write, alias),
            await sync_to_async(_write, thread_sensitive=False)(alias),
        ]

    return JsonResponse({"threads": async_to_sync(work)()})


#: asyncio.Events a test creates: ``gate_view`` waits on ``GATES[?gate=]`` after noting its
#: name in ENTERED (the test then knows the request is in its view)
GATES: dict[str, asyncio.Event] = {}
ENTERED: list[str] = []


async def gate_view(request: HttpRequest) -> HttpResponse:
    """Waits at its gate, then (``?write=1``) writes through ``asyncio.to_thread``."""
    name = request.GET["gate"]
    ENTERED.append(name)
    await GATES[name].wait()
    result = "none"
    if request.GET.get("write"):
        result = await asyncio.to_thread(_write, _alias(request))
    return JsonResponse({"thread": result})


async def async_hatch_view(request: HttpRequest) -> HttpResponse:
    """An async view whose ORM work runs inside ``async with background_db_work()``."""
    manager = Item.objects.using(_alias(request))
    async with conndiag.background_db_work():
        count = await sync_to_async(manager.count)()
    return JsonResponse({"count": count})


def nothing_view(request: HttpRequest) -> HttpResponse:
    if START_HOOK is not None:
        START_HOOK()
    return HttpResponse("nothing")


#: how many queries ``bench_view`` runs (set by tests/benchmark.py)
BENCH_QUERIES = 10


def bench_view(request: HttpRequest) -> HttpResponse:
    manager = Item.objects.using(_alias(request))
    for _ in range(BENCH_QUERIES):
        manager.filter(pk=1).first()
    return HttpResponse("ok")


def scope_view(request: HttpRequest, part: str = "") -> JsonResponse:
    """What the request's code sees: structlog's context variables and conndiag's scope."""
    import structlog

    from conndiag import scope

    rs = scope.current_scope()
    return JsonResponse(
        {
            "contextvars": structlog.contextvars.get_contextvars(),
            "scope": None
            if rs is None
            else {
                "request_id": rs.request_id,
                "method": rs.method,
                "path": rs.path,
                "view": rs.view_name(),
            },
        }
    )
