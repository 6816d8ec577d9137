"""ConnDiagMiddleware: sync and async; binds request_id for the application's structlog logs."""

from __future__ import annotations

import pytest
import structlog
from asgiref.sync import async_to_sync, iscoroutinefunction
from django.http import HttpResponse
from django.test import RequestFactory

from conndiag import scope
from conndiag.middleware import ConnDiagMiddleware
from tests.handlers import wsgi_get


@pytest.fixture
def structlog_configured():
    """The application configured structlog (its defaults) for the test."""
    structlog.configure()
    yield
    structlog.reset_defaults()


def test_sync_mode_binds_and_unbinds_request_id(structlog_configured):
    """During the view the request id is in structlog's context vars; after, it is gone."""
    seen: dict[str, object] = {}

    def view(request):
        seen.update(structlog.contextvars.get_contextvars())
        seen["scope"] = scope.current_scope()
        return HttpResponse("ok")

    mw = ConnDiagMiddleware(view)
    assert not iscoroutinefunction(mw)
    request = RequestFactory().get("/x", HTTP_X_REQUEST_ID="abc-1")
    mw(request)
    assert seen["request_id"] == "abc-1"
    assert seen["scope"].path == "/x"
    assert "request_id" not in structlog.contextvars.get_contextvars()
    assert scope.current_scope() is None


def test_nothing_is_bound_when_structlog_is_not_configured():
    """Without structlog configured no context variable is bound (nobody would read it):
    the scope still carries the request id."""
    seen: dict[str, object] = {}

    def view(request):
        seen.update(structlog.contextvars.get_contextvars())
        seen["scope"] = scope.current_scope()
        return HttpResponse("ok")

    ConnDiagMiddleware(view)(RequestFactory().get("/x", HTTP_X_REQUEST_ID="abc-2"))
    assert "request_id" not in seen
    assert seen["scope"].request_id == "abc-2"


def test_async_mode_is_a_coroutine_function(structlog_configured):
    """With an async get_response the middleware is async and sets the scope in context."""
    seen: dict[str, object] = {}

    async def view(request):
        seen["scope"] = scope.current_scope()
        seen.update(structlog.contextvars.get_contextvars())
        return HttpResponse("ok")

    mw = ConnDiagMiddleware(view)
    assert iscoroutinefunction(mw)
    request = RequestFactory().get("/async-path")
    response = async_to_sync(mw)(request)
    assert response.status_code == 200
    assert seen["scope"].path == "/async-path"
    assert len(seen["request_id"]) == 32


@pytest.mark.django_db
def test_real_handler_request_gets_its_view_name(events):
    """Through the WSGI handler, the scope learns the resolved view name."""
    wsgi_get("/sync/")
    assert {e["view"] for e in events if e["event"] == "conndiag.query"} == {"sync"}
