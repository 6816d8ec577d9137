"""Request scope: which request a thread is serving, and where work came from.

``request_started`` fires on the thread that serves the request (WSGI, threaded servers,
ASGI's per-request sync thread); that thread is the request thread until
``request_finished`` fires there. The receivers below record it in the thread's
:class:`~conndiag.threads.ThreadInfo`. The middleware adds what only it can see (the
request id header, method, path, view) and puts the scope in a context variable, so that
``sync_to_async`` / ``asyncio.to_thread`` work carries it to other threads.
"""

from __future__ import annotations

import random
import re
import threading
import time
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

from structlog import is_configured as structlog_configured
from structlog.contextvars import bind_contextvars

from . import process, threads
from .conf import get_config
from .contain import contained_inline, internal_error
from .exceptions import ConnDiagError

if TYPE_CHECKING:
    from collections.abc import Callable

    from django.http import HttpRequest

#: Key under which the scope is left in the WSGI environ / ASGI scope for the middleware.
CARRIER_KEY = "conndiag.request"

_current: ContextVar[RequestScope | None] = threads.request_var

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_UNSAFE_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\\\"]")
MAX_PATH_LENGTH = 256


def current_scope() -> RequestScope | None:
    """The request scope carried by the current context, if any."""
    return _current.get()


def clean_request_id(value: object) -> str | None:
    """``value`` when it is a sane request id, else None (it is then never logged)."""
    if isinstance(value, str) and _REQUEST_ID_RE.match(value):
        return value
    return None


def clean_path(path: str) -> str:
    """A request path safe for a log line: control characters escaped, length bounded."""
    if len(path) > MAX_PATH_LENGTH:
        path = path[:MAX_PATH_LENGTH] + "..."
    if _UNSAFE_RE.search(path):
        path = _UNSAFE_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", path)
    return path


#: ``_rid_raw`` before the request id header was read
_UNREAD: Any = object()


class RequestScope:
    """One request, from ``request_started`` to ``request_finished``.

    Nothing is read when the request starts. Under WSGI the scope keeps the request's
    ``environ`` (Django's ``request.META``); under ASGI the middleware links the request
    (:meth:`attach`). The method, path, request id header and view are read from there
    when something first needs them (an event, a refusal's message), and cleaned only
    when read; the view is then resolved from the path. Most requests log nothing, and
    pay for none of it. A finished scope keeps only those few values, never the request.
    """

    __slots__ = (
        "__weakref__",
        "_environ",
        "_header_key",
        "_log_token",
        "_method",
        "_path",
        "_raw_path",
        "_request",
        "_request_id",
        "_rid_raw",
        "finished",
        "thread",
        "view",
    )

    def __init__(self, thread: threads.ThreadInfo, environ: dict[str, Any] | None = None) -> None:
        self.thread = thread
        #: ``time.perf_counter()`` when the request finished (None while it runs)
        self.finished: float | None = None
        self._environ = environ
        self._request: HttpRequest | None = None
        self._header_key: str | None = None
        self._request_id: str | None = None
        self._rid_raw: Any = _UNREAD
        self._method: str | None = None
        self._path: str | None = None
        self._raw_path: str | None = None
        self.view: str | None = None
        self._log_token: Token[Any] | None = None

    @property
    def method(self) -> str | None:
        method = self._method
        if method is None:
            request = self._request
            if request is not None:
                method = self._method = request.method
            elif self._environ is not None:
                raw = self._environ.get("REQUEST_METHOD")
                method = self._method = raw.upper() if isinstance(raw, str) else None
        return method

    @method.setter
    def method(self, value: str | None) -> None:
        self._method = value

    @property
    def path(self) -> str | None:
        """The request path, safe for a log line (:func:`clean_path`)."""
        path = self._path
        if path is None:
            raw = self._raw_path
            if raw is None:
                request = self._request
                if request is not None:
                    raw = request.path
                elif self._environ is not None:
                    raw = _wsgi_path(self._environ)[0]
                else:
                    return None
            path = self._path = clean_path(raw)
        return path

    @path.setter
    def path(self, value: str | None) -> None:
        self._path = value

    def _header_value(self) -> Any:
        request = self._request
        if request is not None:
            key = self._header_key
            return None if key is None else request.META.get(key)
        environ = self._environ
        if environ is None:
            return None
        key = get_config().request_id_meta_key
        return None if key is None else environ.get(key)

    @property
    def request_id(self) -> str:
        """The request id: the sane incoming header value, or one generated on first use."""
        rid = self._request_id
        if rid is None:
            raw = self._rid_raw
            if raw is _UNREAD:
                raw = self._header_value()
            self._rid_raw = None
            # A missing or hostile value is ignored (an id is generated): never logged raw.
            rid = None if raw is None else clean_request_id(raw)
            if rid is None:
                # 128 random bits: unique, not secret (random is reseeded after fork).
                rid = random.getrandbits(128).to_bytes(16, "big").hex()  # 32 hex digits
            self._request_id = rid
        return rid

    def attach(self, request: HttpRequest, header_meta_key: str | None) -> None:
        """Link the request the middleware sees (read lazily, see the class docstring)."""
        self._request = request
        self._header_key = header_meta_key

    def view_name(self) -> str | None:
        """The resolved view (URL name, or the view's dotted path), once it is known.

        From the request's ``resolver_match`` when the middleware linked the request;
        otherwise (WSGI) the path is resolved here, once, against ``ROOT_URLCONF``.
        """
        if self.view is None:
            request = self._request
            if request is not None:
                match = getattr(request, "resolver_match", None)
            elif self._environ is not None:
                match = _resolve(self._environ)
            else:
                match = None
            if match is not None:
                self.view = match.view_name or match._func_path
        return self.view

    def finish(self, now: float | None = None) -> None:
        """The request is over (at ``now``, a ``time.perf_counter()`` value)."""
        if self.finished is None:
            if self._request_id is None and self._rid_raw is _UNREAD:
                self._rid_raw = self._header_value()  # read now: the request goes below
            request = self._request
            if request is not None:
                # Keep what later events may need; drop the request itself.
                self.view_name()
                if self._method is None:
                    self._method = request.method
                if self._path is None:
                    self._raw_path = request.path
                self._request = None
            else:
                environ = self._environ
                if environ is not None:
                    # Keep what later events may need (read lazily, as above); drop the
                    # environ, which holds the server's objects for this request.
                    get = environ.get
                    self._environ = {
                        "REQUEST_METHOD": get("REQUEST_METHOD"),
                        "PATH_INFO": get("PATH_INFO", ""),
                        "SCRIPT_NAME": get("SCRIPT_NAME", ""),
                        "SCRIPT_URL": get("SCRIPT_URL", ""),
                        "REDIRECT_URL": get("REDIRECT_URL", ""),
                    }
            self.finished = time.perf_counter() if now is None else now

    def returned_ago(self) -> float | None:
        """Seconds since the request finished, or None while it is live."""
        if self.finished is None:
            return None
        return time.perf_counter() - self.finished

    def describe(self) -> str:
        what = f"{self.method or '?'} {self.path or '?'}"
        view = self.view_name()
        if view:
            what += f" (view {view})"
        what += f", request id {self.request_id}"
        ago = self.returned_ago()
        if ago is None:
            what += ", still running"
        else:
            what += f", which returned {ago:.1f} s ago"
        return what


def _wsgi_path(environ: dict[str, Any]) -> tuple[str, str]:
    """``(path, path_info)`` of a WSGI environ, as Django's ``WSGIRequest`` computes them.

    Never raises (a report is being written: a refusal's message must not fail): an environ
    Django could not decode gives its raw ``PATH_INFO``, which :func:`clean_path` escapes.
    """
    from django.core.handlers.wsgi import get_path_info, get_script_name

    try:
        path_info = get_path_info(environ) or "/"
        script_name = get_script_name(environ)
    except Exception:
        raw = str(environ.get("PATH_INFO") or "/")
        return raw, raw
    # As WSGIRequest.__init__: the path is the script name (without its trailing slash)
    # followed by the path info.
    path = "{}/{}".format(script_name.rstrip("/"), path_info.replace("/", "", 1))
    return path, path_info


def _resolve(environ: dict[str, Any]) -> Any:
    """The ``ResolverMatch`` of a WSGI request's path, or None (no match, or resolving
    failed: a report must not fail for it)."""
    from django.urls import get_resolver

    try:
        return get_resolver().resolve(_wsgi_path(environ)[1])
    except Exception:  # Resolver404, or a broken URLconf: the view is unknown
        return None


#: structlog's context variable for ``request_id`` (``bind_contextvars`` makes it once and
#: keeps it for the life of the process), known after the first bind
_request_id_var: ContextVar[Any] | None = None


def _bind_request_id(request_id: str) -> Token[Any]:
    """``structlog.contextvars.bind_contextvars(request_id=...)``, then set on its variable
    directly: one ``ContextVar.set`` per request instead of a call with keyword arguments
    and a loop over them (and the same for the reset, :func:`_unbind`)."""
    global _request_id_var
    var = _request_id_var
    if var is None:
        token: Token[Any] = bind_contextvars(request_id=request_id)["request_id"]
        _request_id_var = token.var
        return token
    return var.set(request_id)


def _unbind(token: Token[Any]) -> None:
    """Put the request id's variable back as it was before the request (structlog's
    ``reset_contextvars``, for one variable)."""
    try:
        token.var.reset(token)
    except ValueError:  # the token belongs to another context: just unbind
        token.var.set(Ellipsis)  # structlog's "not bound"


#: called at the end of every request, after the scope is closed, with
#: ``time.perf_counter()`` (install.py sets it to the metrics' push: one receiver does
#: both, saving a signal dispatch per request)
after_request: Callable[[float], None] | None = None


# Django sends the request signals with send(), not send_robust(): a receiver's exception
# would break the request, so both receivers are contained, inline (a guard would cost
# each request two more calls, conndiag/contain.py): each is a try/except around its body.
def on_request_started(
    sender: object, environ: Any = None, scope: Any = None, **kwargs: Any
) -> None:
    """``request_started`` receiver: this thread now serves a request.

    Under WSGI (``environ``) this opens the whole scope: the middleware has nothing to
    add (:class:`~conndiag.middleware.ConnDiagMiddleware` steps out of a sync handler), so
    the request id is bound for the application's structlog logs here. Under ASGI
    (``scope``) the middleware links the request and binds the id in the request's context.
    """
    try:
        _open(environ, scope)
    except ConnDiagError:
        raise  # a decision, not a failure (contain.py): none is taken here today
    except Exception as exc:
        internal_error("scope.request_started", exc)


def _open(environ: Any, scope: Any) -> None:
    process.check()
    info = threads.current()
    if environ is not None:
        rs = RequestScope(info, environ)
        if structlog_configured():
            rs._log_token = _bind_request_id(rs.request_id)
    else:
        rs = RequestScope(info)
        if isinstance(scope, dict):
            scope[CARRIER_KEY] = rs
    info.scope = rs
    _current.set(rs)


def on_request_finished(sender: object, **kwargs: Any) -> None:
    """``request_finished`` receiver: the request whose response just closed is over.

    That request is the one in the context (the handler sends the signal from the
    request's own context): not necessarily the last one started on this thread, since
    Django 3.2's ASGI handler runs every request's sync code on one shared thread. Then
    :data:`after_request` runs (the metrics' push).
    """
    try:
        _close()
    except ConnDiagError:
        raise  # a decision, not a failure (contain.py): none is taken here today
    except Exception as exc:
        internal_error("scope.request_finished", exc)


def _close() -> None:
    in_context = _current.get()
    rs = in_context
    if rs is None or rs.finished is not None:
        rs = threads.current().scope
    now = time.perf_counter()
    if rs is not None:
        rs.finish(now)
        owner = rs.thread
        if owner.scope is rs:
            owner.scope = None
        token = rs._log_token
        if token is not None:
            rs._log_token = None
            _unbind(token)
    if in_context is not None:
        _current.set(None)
    hook = after_request
    if hook is not None:
        hook(now)


contained_inline("scope.request_started", __name__, "_open")  # on_request_started
contained_inline("scope.request_finished", __name__, "_close")  # on_request_finished


def enter(rs: RequestScope) -> Any:
    """Make ``rs`` the scope of the current context; returns a token for :func:`leave`."""
    return _current.set(rs)


def leave(token: Any) -> None:
    try:
        _current.reset(token)
    except ValueError:
        # The token was made in another context (the response was finished elsewhere).
        _current.set(None)


def after_fork() -> None:
    """:func:`conndiag.process.on_fork` callback, in the child, on the thread that noticed.

    A process forked while serving a request (``os.fork()`` or ``multiprocessing`` in a
    view) does not serve it: the parent answers it, and nothing recycles the child's
    connections. The child's work keeps that request as its *origin*, so its queries are
    ``detached``. A worker forked by a server (outside any request) starts with none.
    """
    info = threads.current()
    info.native_id = threading.get_native_id()  # the kernel's id of this thread changed
    rs = info.scope or _current.get()
    if rs is not None:
        info.scope = None
        if info.origin is None:
            info.origin = rs
        _current.set(None)
