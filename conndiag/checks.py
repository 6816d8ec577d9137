"""System checks: the misconfigurations behind "MySQL server has gone away".

Ids are stable: ``conndiag.E0xx`` are errors, ``conndiag.W0xx`` warnings. Static checks
read settings only; database checks (``Tags.database``) run with ``check --database`` and
``migrate``.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured

from . import conf

MIDDLEWARE_PATH = "conndiag.middleware.ConnDiagMiddleware"


@register(Tags.compatibility)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """conndiag.E001: the CONNDIAG setting is valid."""
    try:
        conf.parse(getattr(settings, "CONNDIAG", None))
    except ImproperlyConfigured as exc:
        return [
            Error(
                str(exc),
                hint="Fix the CONNDIAG setting; the README lists every key and its values.",
                id="conndiag.E001",
            )
        ]
    return []


@register(Tags.compatibility)
def check_middleware(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """conndiag.W001 (missing) and conndiag.W002 (not first)."""
    middleware = list(getattr(settings, "MIDDLEWARE", None) or [])
    if MIDDLEWARE_PATH not in middleware:
        return [
            Warning(
                f"{MIDDLEWARE_PATH} is not in MIDDLEWARE.",
                hint=(
                    "Add it first in MIDDLEWARE: without it, request ids, paths and views are "
                    "missing from conndiag's reports and async views are attributed less "
                    "precisely."
                ),
                id="conndiag.W001",
            )
        ]
    if middleware[0] != MIDDLEWARE_PATH:
        return [
            Warning(
                f"{MIDDLEWARE_PATH} is not first in MIDDLEWARE.",
                hint=(
                    "Move it first, so queries made by the middleware before it are attributed "
                    "to their request."
                ),
                id="conndiag.W002",
            )
        ]
    return []
