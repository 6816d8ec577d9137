"""Request scope: sane request ids, safe paths, and a scope per request thread."""

from __future__ import annotations

import pytest

from conndiag import scope, threads
from tests.conftest import of
from tests.handlers import wsgi_get

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("value", ["abc-123", "0f8fad5b-d9cb-469f-a165-70867728950e", "a.b:c/d"])
def test_sane_request_ids_are_kept(value):
    """Ordinary request ids pass unchanged."""
    assert scope.clean_request_id(value) == value


@pytest.mark.parametrize(
    "value",
    ["", "x" * 129, "evil\nINFO fake log line", "tab\there", 'quote"d', "<script>", None, 42],
)
def test_hostile_request_ids_are_rejected(value):
    """Huge values, control characters, newlines and odd types are never accepted."""
    assert scope.clean_request_id(value) is None


def test_paths_are_escaped_and_bounded():
    """Control characters in a path are escaped and its length is bounded."""
    assert scope.clean_path("/a\nb\x1b[31m") == "/a\\x0ab\\x1b[31m"
    assert len(scope.clean_path("/" + "x" * 5000)) == scope.MAX_PATH_LENGTH + 3


def test_scope_lives_from_request_started_to_request_finished(events):
    """request_started opens the scope on the request thread; request_finished closes it."""
    seen: list[object] = []
    from tests.testapp import views

    views.START_HOOK = lambda: seen.append(threads.current().scope)
    try:
        wsgi_get("/nothing/")
    finally:
        views.START_HOOK = None
    (rs,) = seen
    assert isinstance(rs, scope.RequestScope)
    assert rs.finished is not None
    assert rs.path == "/nothing/"
    assert rs.view_name() == "nothing"
    assert threads.current().scope is None
    assert scope.current_scope() is None


def test_hostile_header_never_reaches_the_logs(events):
    """A request id header with a newline is replaced by a generated id."""
    hostile = "x\nconndiag.query.refused forged=1"
    status, _ = wsgi_get("/sync/", headers={"X-Request-ID": hostile})
    assert status.startswith("200")
    ids = {e["request_id"] for e in of(events, "conndiag.query")}
    assert len(ids) == 1
    (rid,) = ids
    assert "\n" not in rid
    assert "forged" not in rid
    assert all("forged" not in repr(e) for e in events)


def test_sane_header_is_used_as_request_id(events):
    """A sane X-Request-ID is the request id of every query event of that request."""
    wsgi_get("/sync/", headers={"X-Request-ID": "req-42"})
    assert {e["request_id"] for e in of(events, "conndiag.query")} == {"req-42"}


def test_a_wsgi_scope_never_fails_a_report():
    """A path Django cannot decode (not latin-1, against PEP 3333) or that no URL pattern
    matches still gives a path and no view: a refusal's message is never broken by them."""
    rs = scope.RequestScope(threads.current(), {"REQUEST_METHOD": "GET", "PATH_INFO": "/\u20ac/x"})
    assert rs.path == "/\u20ac/x"
    assert rs.view_name() is None
    assert "GET /\u20ac/x" in rs.describe()
    unknown = scope.RequestScope(threads.current(), {"REQUEST_METHOD": "GET", "PATH_INFO": "/no/"})
    assert unknown.view_name() is None
    assert unknown.path == "/no/"
