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
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from . import process, threads
from .contain import guard

if TYPE_CHECKING:
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


class RequestScope:
    """One request, from ``request_started`` to ``request_finished``."""

    __slots__ = (
        "__weakref__",
        "_request",
        "_request_id",
        "finished",
        "method",
        "path",
        "started",
        "thread",
        "view",
    )

    def __init__(self, thread: threads.ThreadInfo) -> None:
        self.thread = thread
        self.started = time.perf_counter()
        self.finished: float | None = None
        self._request_id: str | None = None
        self.method: str | None = None
        self.path: str | None = None
        self._request: HttpRequest | None = None
        self.view: str | None = None

    @property
    def request_id(self) -> str:
        """The request id: the sane incoming header value, or one generated on first use."""
        rid = self._request_id
        if rid is None:
            # 128 random bits: unique, not secret (random is reseeded after fork).
            rid = self._request_id = f"{random.getrandbits(128):032x}"
        return rid

    def attach(self, request: HttpRequest, header_meta_key: str | None) -> None:
        """Fill in what the middleware knows about the request."""
        self.method = request.method
        self.path = clean_path(request.path)
        self._request = request
        if header_meta_key is not None:
            # A missing or hostile value is ignored (an id is generated): never logged raw.
            rid = clean_request_id(request.META.get(header_meta_key))
            if rid is not None:
                self._request_id = rid

    def view_name(self) -> str | None:
        """The resolved view (URL name, or the view's dotted path), once it is known."""
        if self.view is None and self._request is not None:
            match = getattr(self._request, "resolver_match", None)
            if match is not None:
                self.view = match.view_name or match._func_path
        return self.view

    def finish(self) -> None:
        if self.finished is None:
            self.view_name()
            self._request = None
            self.finished = time.perf_counter()

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


# Django sends the request signals with send(), not send_robust(): a receiver's exception
# would break the request, so both receivers are contained.
@guard("scope.request_started")
def on_request_started(
    sender: object, environ: Any = None, scope: Any = None, **kwargs: Any
) -> None:
    """``request_started`` receiver: this thread now serves a request."""
    process.check()
    info = threads.current()
    rs = RequestScope(info)
    info.scope = rs
    carrier = environ if environ is not None else scope
    if isinstance(carrier, dict):
        carrier[CARRIER_KEY] = rs
    _current.set(rs)


@guard("scope.request_finished")
def on_request_finished(sender: object, **kwargs: Any) -> None:
    """``request_finished`` receiver: the request whose response just closed is over.

    That request is the one in the context (the handler sends the signal from the
    request's own context): not necessarily the last one started on this thread, since
    Django 3.2's ASGI handler runs every request's sync code on one shared thread.
    """
    in_context = _current.get()
    rs = in_context
    if rs is None or rs.finished is not None:
        rs = threads.current().scope
    if rs is not None:
        rs.finish()
        owner = rs.thread
        if owner.scope is rs:
            owner.scope = None
    if in_context is not None:
        _current.set(None)


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
