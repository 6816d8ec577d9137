"""Containment: conndiag's own failures never reach the application.

Every entry point conndiag adds to the application's path (the execute wrapper, the
connection hooks, the request signal receivers, the middleware, the ``Thread.start`` and
``submit`` hooks, the metrics view) does its own work in a *contained* step: a failure
there is reported with :func:`internal_error` and the application's operation runs exactly
as it would without conndiag. Only a refusal the policy asked for (a
:class:`~conndiag.exceptions.ConnDiagError`) goes through: it is a decision, not a failure.

Two forms, one rule:

- :func:`guard`, a decorator for a step that is conndiag's work only (a signal receiver,
  the part of a hook before or after the application's operation): its ``Exception`` is
  reported and ``default`` is returned;
- on the per-query and per-request paths (``conndiag/wrapper.py``, the request signal
  receivers of ``conndiag/scope.py``) the same rule is written inline, as ``try`` /
  ``except Exception`` that calls :func:`internal_error`, because a ``try`` costs nothing
  in CPython 3.11+ while a guard costs a function call (and, for a signal receiver, the
  re-packing of its keyword arguments) per query or per request. A receiver written so
  registers its body with :func:`contained_inline`, so that the fault-injection tests
  make that body fail in turn as they do every guarded step.

:func:`internal_error` counts the failure (``conndiag_internal_errors_total``) and reports
the first of each kind (component, exception type) through the runtime, which plugs its
reporter in with :func:`set_reporter` (this module imports nothing of conndiag's, so the
lowest layers can use it). Before a runtime exists, or when none can be built, the failure
goes to the stdlib logger ``conndiag`` (once per kind).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

from .exceptions import ConnDiagError

_F = TypeVar("_F", bound=Callable[..., Any])

Reporter = Callable[[str, BaseException], None]

_fallback_reported: set[tuple[str, type[BaseException]]] = set()
_fallback_lock = threading.Lock()
#: failures that reached no runtime (none could be built): counted here
fallback_count = 0


def _fallback(component: str, error: BaseException) -> None:
    """Report without a runtime: count, and log the first of each kind at error level."""
    global fallback_count
    key = (component, type(error))
    with _fallback_lock:
        fallback_count += 1
        first = key not in _fallback_reported
        _fallback_reported.add(key)
    if first:
        logging.getLogger("conndiag").error(
            "conndiag.internal_error component=%s error=%s: %s (conndiag keeps out of the "
            "application's way)",
            component,
            type(error).__name__,
            error,
        )


_reporter: Reporter = _fallback

#: every guarded step, as (component, guarded function): tests/test_faults.py makes each
#: of them fail in turn
GUARDED: list[tuple[str, Callable[..., Any]]] = []


#: every step contained inline, as (component, module, name of the body its entry point
#: calls inside its ``try``): tests/test_faults.py replaces the body
INLINE: list[tuple[str, str, str]] = []


def contained_inline(component: str, module: str, body: str) -> None:
    """Register ``module.body``, called inside ``try`` / ``except Exception`` that reports
    to :func:`internal_error` as ``component`` (see the module docstring)."""
    INLINE.append((component, module, body))


def set_reporter(reporter: Reporter) -> None:
    """Where :func:`internal_error` sends failures (the runtime calls this at import)."""
    global _reporter
    _reporter = reporter


def internal_error(component: str, error: BaseException) -> None:
    """Count a failure of conndiag's own code and report the first of its kind. Never raises."""
    try:
        _reporter(component, error)
    except Exception as reporter_failed:
        try:
            _fallback(component, error)
            _fallback("contain.reporter", reporter_failed)
        except Exception:  # noqa: S110 - even logging failed: nothing is left to tell
            pass


def guard(component: str, default: Any = None) -> Callable[[_F], _F]:
    """Contain the decorated step: its ``Exception`` is reported and ``default`` returned.

    A :class:`~conndiag.exceptions.ConnDiagError` (a refusal the policy asked for) and
    ``BaseException`` that is not an ``Exception`` (``KeyboardInterrupt``, ``SystemExit``)
    propagate.
    """

    def decorate(fn: _F) -> _F:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ConnDiagError:
                raise
            except Exception as exc:
                internal_error(component, exc)
                return default

        GUARDED.append((component, guarded))
        return cast("_F", guarded)

    return decorate
