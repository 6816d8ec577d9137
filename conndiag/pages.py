"""``conndiag:connections``: the live connection inspector as a page (see :mod:`.inspector`).

Served by ``path("", include("conndiag.urls"))`` at ``/conndiag/connections``. Access: the
same rules as ``/metrics`` (:func:`conndiag.views.check_access`: loopback only unless
``METRICS_TOKEN`` or ``METRICS_ALLOWED_IPS`` say otherwise) and, for a client that is not on
loopback and is logged in, ``is_staff``. Plain HTML and CSS from a Django template rendered
by a private template engine (the project's ``TEMPLATES`` need not list conndiag), no
JavaScript; it refreshes itself with ``<meta http-equiv="refresh">`` every
:data:`DEFAULT_REFRESH` seconds (``?refresh=N``, ``0`` to stop). With
``CONNDIAG["INSPECTOR"] = False`` it answers 404.
"""

from __future__ import annotations

import datetime
import functools
import os
from typing import TYPE_CHECKING, Any

from django.http import Http404, HttpResponse
from django.views.decorators.http import require_safe

from . import inspector, process
from .conf import get_config
from .views import _denied, check_access, client_address

if TYPE_CHECKING:
    from django.http import HttpRequest
    from django.template import Engine

#: seconds between two refreshes of the page
DEFAULT_REFRESH = 5
MAX_REFRESH = 3600
#: conndiag's own templates (``templates/conndiag/`` of this package)
TEMPLATE_DIR = os.path.join(os.path.dirname(__file__), "templates", "conndiag")


@functools.lru_cache(maxsize=1)
def engine() -> Engine:
    """A template engine of conndiag's own (autoescaping, no project configuration needed)."""
    from django.template import Engine

    return Engine(dirs=[TEMPLATE_DIR], autoescape=True, debug=False)


def staff_required(request: HttpRequest) -> HttpResponse | None:
    """403 for a logged-in user who is not staff, unless the client is on loopback."""
    address = client_address(request)
    if address is not None and address.is_loopback:
        return None
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated and not user.is_staff:
        return _denied(403, "The connection inspector is for staff users only.")
    return None


def _refresh(request: HttpRequest) -> int:
    try:
        value = int(request.GET.get("refresh", DEFAULT_REFRESH))
    except ValueError:
        return DEFAULT_REFRESH
    return max(0, min(MAX_REFRESH, value))


def render(report: dict[str, Any], refresh: int) -> str:
    """The page's HTML for an :func:`conndiag.inspector.inspect` report."""
    from django.template import Context

    rows = inspector.display_rows(report)
    notes = []
    for alias, alias_report in report["aliases"].items():
        server = alias_report["server"]
        if server["error"]:
            notes.append(
                {"error": True, "text": f"{alias}: the server's list failed: {server['error']}"}
            )
        elif not server["available"]:
            notes.append(
                {
                    "error": False,
                    "text": f"{alias} ({alias_report['vendor']}): no server-side list; "
                    "the connections the processes published",
                }
            )
    generated = datetime.datetime.fromtimestamp(report["generated_at"], datetime.timezone.utc)
    context = {
        "report": report,
        "rows": rows,
        "total": len(rows),
        "flagged": report["flagged"],
        "flag_counts": sorted(report["flag_counts"].items()),
        "processes": len(report["processes"]),
        "notes": notes,
        "legend": list(inspector.FLAG_HELP.items()),
        "refresh": refresh,
        "generated": generated.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return engine().get_template("connections.html").render(Context(context))


@require_safe
def connections(request: HttpRequest) -> HttpResponse:
    """Every connection of every live process of this host, joined with the servers' lists."""
    config = get_config()
    if not config.inspector:
        msg = "The conndiag connection inspector is off (CONNDIAG['INSPECTOR'] = False)."
        raise Http404(msg)
    denied = check_access(request, config) or staff_required(request)
    if denied is not None:
        return denied
    process.check()
    report = inspector.inspect(config=config)
    response = HttpResponse(
        render(report, _refresh(request)), content_type="text/html; charset=utf-8"
    )
    response["Cache-Control"] = "no-store"
    response["X-Robots-Tag"] = "noindex"
    return response
