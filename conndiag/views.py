"""``/metrics``: the Prometheus exposition, served by Django, protected.

Include it with ``path("", include("conndiag.urls"))``. It serves the default registry, or,
when ``PROMETHEUS_MULTIPROC_DIR`` is set, a registry with a ``MultiProcessCollector`` that
aggregates every worker's files (so any worker answers for all of them), after sweeping dead
workers' files into the archive (:mod:`conndiag.multiprocess`).

Access (``CONNDIAG`` keys):

- ``METRICS_ALLOWED_IPS``: the client's ``REMOTE_ADDR`` must be in one of these networks,
  else 403;
- ``METRICS_TOKEN``: the request must carry ``Authorization: Bearer <token>`` (compared in
  constant time), else 401 with ``WWW-Authenticate: Bearer``;
- both set: both are required; neither set: only loopback clients (127.0.0.0/8, ::1) are
  served, everyone else gets 403.

``X-Forwarded-For`` is never trusted: behind a proxy, ``REMOTE_ADDR`` is the proxy's address
(use the token then, or a proxy that sets ``REMOTE_ADDR`` itself). With
``CONNDIAG["METRICS"] = False`` the view answers 404.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import TYPE_CHECKING

from django.http import Http404, HttpResponse
from django.views.decorators.http import require_safe

from . import multiprocess, process
from .conf import get_config
from .contain import guard
from .metrics import flush_all_quietly, multiprocess_dir


@guard("metrics.flush")
def _before_scrape(path: str | None) -> None:
    """Push this process's pending numbers (so the scrape is exact here) and, in
    multi-process mode, archive dead workers' files (their live gauges leave).

    Contained: if either fails, the scrape serves what the directory holds.
    """
    flush_all_quietly()
    if path:
        multiprocess.sweep(path)


if TYPE_CHECKING:
    from django.http import HttpRequest

    from .conf import Config


def client_address(request: HttpRequest) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's address from ``REMOTE_ADDR`` (IPv4-mapped IPv6 unwrapped), if valid."""
    try:
        address = ipaddress.ip_address(str(request.META.get("REMOTE_ADDR", "")).strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _bearer_token(request: HttpRequest) -> str | None:
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, token = str(header).partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _denied(status: int, message: str) -> HttpResponse:
    response = HttpResponse(message + "\n", status=status, content_type="text/plain")
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="conndiag metrics"'
    response["Cache-Control"] = "no-store"
    return response


def check_access(request: HttpRequest, config: Config) -> HttpResponse | None:
    """None when the request may read the metrics, else the 401/403 response."""
    address = client_address(request)
    if config.metrics_allowed_ips:
        if address is None or not any(address in net for net in config.metrics_allowed_ips):
            return _denied(403, "Your address is not in CONNDIAG['METRICS_ALLOWED_IPS'].")
    elif config.metrics_token is None and (address is None or not address.is_loopback):
        return _denied(
            403,
            "conndiag serves /metrics to loopback clients only unless "
            "CONNDIAG['METRICS_TOKEN'] or CONNDIAG['METRICS_ALLOWED_IPS'] is set.",
        )
    if config.metrics_token is not None:
        given = _bearer_token(request)
        if given is None or not hmac.compare_digest(
            given.encode("utf-8"), config.metrics_token.encode("utf-8")
        ):
            return _denied(401, "A valid 'Authorization: Bearer <token>' header is required.")
    return None


@require_safe
def metrics(request: HttpRequest) -> HttpResponse:
    """The Prometheus exposition of this process (or of every worker, in multi-process)."""
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.exposition import choose_encoder

    config = get_config()
    if not config.metrics:
        msg = "conndiag metrics are off (CONNDIAG['METRICS'] = False)."
        raise Http404(msg)
    denied = check_access(request, config)
    if denied is not None:
        return denied
    process.check()  # a worker's first scrape may come before its first query
    path = multiprocess_dir()
    _before_scrape(path)
    if path:
        registry = CollectorRegistry()
        multiprocess.collector_class()(registry, path=path)
    else:
        registry = REGISTRY
    encoder, content_type = choose_encoder(request.META.get("HTTP_ACCEPT", ""))
    response = HttpResponse(encoder(registry), content_type=content_type)
    response["Cache-Control"] = "no-store"
    return response
