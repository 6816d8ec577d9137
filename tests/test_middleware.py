"""The request scope's entry: ConnDiagMiddleware under ASGI, the request_started receiver
under WSGI; both bind request_id for the application's structlog logs."""

from __future__ import annotations

import json

import pytest
import structlog
from asgiref.sync import async_to_sync, iscoroutinefunction
from django.core.exceptions import MiddlewareNotUsed
from django.core.handlers.wsgi import WSGIHandler
from django.http import HttpResponse
from django.test import RequestFactory

from conndiag import scope, threads
from conndiag.middleware import ConnDiagMiddleware
from tests.handlers import wsgi_get


@pytest.fixture
def structlog_configured():
    """The application configured structlog (its defaults) for the test."""
    structlog.configure()
    yield
    structlog.reset_defaults()


def test_a_sync_handler_leaves_the_middleware_out():
    """Under a synchronous handler the middleware steps out (``MiddlewareNotUsed``): the
    request_started receiver does its work, and WSGI requests pay for no extra layer."""
    with pytest.raises(MiddlewareNotUsed):
        ConnDiagMiddleware(lambda request: HttpResponse("ok"))
    handler = WSGIHandler()
    chain = []
    layer = handler._middleware_chain
    while layer is not None:
        chain.append(layer)
        layer = getattr(layer, "__wrapped__", None) or getattr(layer, "get_response", None)
    assert not any(isinstance(layer, ConnDiagMiddleware) for layer in chain)


@pytest.mark.django_db
def test_wsgi_binds_and_unbinds_request_id(structlog_configured):
    """Under WSGI, during the view the request id is in structlog's context vars (bound by
    the request_started receiver); after the response closed, it is gone."""
    status, body = wsgi_get("/scope/a\nb/", headers={"X-Request-ID": "abc-1"})
    assert status.startswith("200")
    seen = json.loads(body)
    assert seen["contextvars"] == {"request_id": "abc-1"}
    assert seen["scope"] == {
        "request_id": "abc-1",
        "method": "GET",
        "path": "/scope/a\\x0ab/",  # the newline escaped: the path is safe for a log line
        "view": "scope",
    }
    assert "request_id" not in structlog.contextvars.get_contextvars()
    assert scope.current_scope() is None


@pytest.mark.django_db
def test_nothing_is_bound_when_structlog_is_not_configured():
    """Without structlog configured no context variable is bound (nobody would read it):
    the scope still carries the request id."""
    status, body = wsgi_get("/scope/x/", headers={"X-Request-ID": "abc-2"})
    seen = json.loads(body)
    assert seen["contextvars"] == {}
    assert seen["scope"]["request_id"] == "abc-2"


def test_a_finished_wsgi_scope_keeps_what_events_need_and_not_the_environ():
    """After the response closed, a scope still answers method, path, view and request id
    (a thread started by the request reports them later), from a copy of a few values: the
    server's environ is not kept alive."""
    import gc
    import weakref
    from wsgiref.util import setup_testing_defaults

    class Environ(dict):  # a dict that can be weakly referenced
        pass

    environ = Environ(PATH_INFO="/scope/late/", REQUEST_METHOD="post", HTTP_X_REQUEST_ID="r-9")
    setup_testing_defaults(environ)
    rs = scope.RequestScope(threads.current(), environ)
    ref = weakref.ref(environ)
    rs.finish()
    del environ
    gc.collect()
    assert ref() is None
    assert (rs.method, rs.path, rs.view_name(), rs.request_id) == (
        "POST",
        "/scope/late/",
        "scope",
        "r-9",
    )


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
