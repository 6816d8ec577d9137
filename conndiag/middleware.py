"""``ConnDiagMiddleware``: the request scope under ASGI. Put it first in ``MIDDLEWARE``.

Under ASGI it attaches what only a middleware can see there (request id, method, path,
view) to the scope that ``request_started`` opened, makes it the scope of the request's
context (so ``sync_to_async`` work carries it), and, when the application configured
structlog, binds ``request_id`` for the application's own structlog logs.

Under WSGI (any synchronous handler: the WSGI server's, the test client's) the
``request_started`` receiver already does all of that from the WSGI ``environ``
(conndiag/scope.py), so the middleware steps out of the chain when Django builds it
(``MiddlewareNotUsed``): a WSGI request pays for no middleware layer at all (see README,
"Performance").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.core.exceptions import MiddlewareNotUsed
from structlog import is_configured as structlog_configured
from structlog.contextvars import bind_contextvars, reset_contextvars

from . import scope as _scope
from . import threads
from .conf import get_config
from .contain import guard

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from django.http import HttpRequest, HttpResponseBase

_KEY = _scope.CARRIER_KEY
_current_scope = _scope.current_scope


class ConnDiagMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        if not iscoroutinefunction(get_response):
            # A synchronous handler: request_started opens the whole scope (see above).
            raise MiddlewareNotUsed("conndiag: request_started opens the scope under WSGI")
        self.get_response = get_response
        markcoroutinefunction(self)

    # Contained (conndiag/contain.py): if entering fails the request is served without its
    # scope; if leaving fails the response is returned all the same.
    @staticmethod
    @guard("middleware.enter")
    def _enter(request: HttpRequest) -> tuple[Any, Any] | None:
        carrier = getattr(request, "scope", None)  # ASGIRequest
        rs = carrier.get(_KEY) if isinstance(carrier, dict) else None
        if rs is None:
            # request_started did not fire (a bare handler call): open the scope here.
            info = threads.current()
            rs = info.scope or _scope.RequestScope(info)
        rs.attach(request, get_config().request_id_meta_key)
        token = None if _current_scope() is rs else _scope.enter(rs)
        # The application's structlog lines get request_id; without structlog nobody reads it.
        log_tokens = bind_contextvars(request_id=rs.request_id) if structlog_configured() else None
        return token, log_tokens

    @staticmethod
    @guard("middleware.leave")
    def _leave(tokens: tuple[Any, Any] | None) -> None:
        if tokens is None:
            return
        token, log_tokens = tokens
        if log_tokens is not None:
            reset_contextvars(**log_tokens)
        if token is not None:
            _scope.leave(token)

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        tokens = self._enter(request)
        try:
            get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]] = self.get_response
            return await get_response(request)
        finally:
            self._leave(tokens)
