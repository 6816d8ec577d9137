"""The ``/metrics`` view: who may read it, and what it serves."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client, RequestFactory
from django.urls import reverse

from conndiag import conf, views
from conndiag.metrics import MetricsRecorder

pytestmark = [pytest.mark.urls("tests.multiproc.urls"), pytest.mark.django_db]

TOKEN = "s3cret-token-value"


@pytest.fixture(autouse=True)
def _metrics(settings: Any) -> None:
    settings.CONNDIAG = {}
    conf.clear_cache()
    MetricsRecorder(conf.get_config())  # conndiag's metrics exist on the default registry


def get(remote_addr: str = "127.0.0.1", **headers: str) -> Any:
    return Client(REMOTE_ADDR=remote_addr).get("/metrics", **headers)


def test_url_is_metrics() -> None:
    """``include("conndiag.urls")`` at the root serves the view at ``/metrics``."""
    assert reverse("conndiag:metrics") == "/metrics"


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
def test_loopback_is_served_by_default(address: str) -> None:
    """With no token and no allow-list, loopback clients get the text exposition."""
    response = get(address)
    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert b"conndiag_policy_info" in response.content
    assert response["Cache-Control"] == "no-store"


@pytest.mark.parametrize("address", ["10.0.0.5", "192.168.1.1", "2001:db8::1", "", "nonsense"])
def test_others_are_refused_by_default(address: str) -> None:
    """Non-loopback (or unparsable) clients get 403 when nothing is configured."""
    response = get(address)
    assert response.status_code == 403
    assert b"conndiag_" not in response.content


def test_forwarded_for_is_not_trusted() -> None:
    """A loopback X-Forwarded-For from a remote peer does not open the door."""
    response = get("10.0.0.5", HTTP_X_FORWARDED_FOR="127.0.0.1")
    assert response.status_code == 403


def test_token_is_required_when_configured(settings: Any) -> None:
    """With METRICS_TOKEN, a missing or wrong bearer token is 401 with WWW-Authenticate,
    even from loopback; the right one is served from anywhere."""
    settings.CONNDIAG = {"METRICS_TOKEN": TOKEN}
    missing = get("127.0.0.1")
    assert missing.status_code == 401
    assert missing["WWW-Authenticate"].startswith("Bearer")
    assert get("127.0.0.1", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert get("127.0.0.1", HTTP_AUTHORIZATION=f"Basic {TOKEN}").status_code == 401
    assert get("127.0.0.1", HTTP_AUTHORIZATION=f"Bearer {TOKEN}x").status_code == 401
    ok = get("203.0.113.7", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert ok.status_code == 200
    assert b"conndiag_policy_info" in ok.content


def test_token_is_compared_in_constant_time(settings: Any, monkeypatch: Any) -> None:
    """The token check goes through hmac.compare_digest."""
    settings.CONNDIAG = {"METRICS_TOKEN": TOKEN}
    calls: list[tuple[bytes, bytes]] = []
    real = views.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(views.hmac, "compare_digest", spy)
    assert get(HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 200
    assert calls == [(TOKEN.encode(), TOKEN.encode())]


def test_ip_allow_list(settings: Any) -> None:
    """With METRICS_ALLOWED_IPS, only those networks are served (loopback too must be
    listed); others get 403."""
    settings.CONNDIAG = {"METRICS_ALLOWED_IPS": ["10.0.0.0/8", "2001:db8::/32"]}
    assert get("10.1.2.3").status_code == 200
    assert get("2001:db8::5").status_code == 200
    assert get("11.0.0.1").status_code == 403
    assert get("127.0.0.1").status_code == 403


def test_allow_list_and_token_are_both_required(settings: Any) -> None:
    """Both configured: an allowed address still needs the token; a token from an address
    outside the list is refused."""
    settings.CONNDIAG = {"METRICS_ALLOWED_IPS": ["10.0.0.0/8"], "METRICS_TOKEN": TOKEN}
    assert get("10.0.0.1").status_code == 401
    assert get("10.0.0.1", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 200
    assert get("192.0.2.1", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 403


def test_openmetrics_is_negotiated() -> None:
    """A Prometheus that asks for OpenMetrics gets it."""
    response = get(HTTP_ACCEPT="application/openmetrics-text; version=1.0.0")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert response.content.rstrip().endswith(b"# EOF")


def test_only_get_and_head(settings: Any) -> None:
    """POST is 405."""
    assert Client().post("/metrics").status_code == 405
    assert Client().head("/metrics").status_code == 200


def test_metrics_off_is_404(settings: Any) -> None:
    """CONNDIAG['METRICS'] = False: the view does not exist."""
    settings.CONNDIAG = {"METRICS": False}
    assert get().status_code == 404


def test_scrape_flushes_pending_query_numbers(settings: Any) -> None:
    """A scrape includes this process's queries that ran just before it."""
    from django.db import connection

    from conndiag import runtime

    runtime._runtime = None
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    before = _queries(get().content)
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    assert _queries(get().content) == before + 1


def _queries(text: bytes) -> float:
    for line in text.decode().splitlines():
        if line.startswith(
            'conndiag_queries_total{action="observed",alias="default",context="background"'
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_view_directly_with_request_factory() -> None:
    """check_access returns None for loopback and a 403 response otherwise."""
    config = conf.get_config()
    assert views.check_access(RequestFactory().get("/metrics"), config) is None
    denied = views.check_access(RequestFactory(REMOTE_ADDR="10.0.0.1").get("/metrics"), config)
    assert denied is not None and denied.status_code == 403
