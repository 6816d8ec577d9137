"""conndiag's exceptions. They share :class:`ConnDiagError` and carry the facts as attributes.

Every one pickles with its message and attributes (Django's parallel test runner,
``multiprocessing`` and Celery result backends send exceptions between processes): the
keyword-only facts are restored by :meth:`UnsafeQueryError.__reduce__`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: the facts every :class:`UnsafeQueryError` carries, in ``__init__`` order
FACTS = (
    "context",
    "alias",
    "vendor",
    "thread_name",
    "thread_ident",
    "thread_native_id",
    "pid",
    "request_id",
    "request_method",
    "request_path",
    "view",
    "request_returned_ago",
    "connection_id",
    "connection_age",
    "connection_opened_by_pid",
)


class ConnDiagError(Exception):
    """Base class of every exception conndiag raises on purpose."""


class UnsafeQueryError(ConnDiagError):
    """A query was refused, before reaching the database, because of the context it ran in.

    Raised only where ``CONNDIAG["POLICY"]`` says ``raise`` for the context. The message
    says what happened, why it breaks and how to fix it; the same facts are attributes.
    """

    #: the context that was refused (``detached``, ``forked``, ...)
    context: str = ""

    def __init__(
        self,
        message: str,
        *,
        context: str,
        alias: str,
        vendor: str,
        thread_name: str,
        thread_ident: int,
        thread_native_id: int,
        pid: int,
        request_id: str | None,
        request_method: str | None,
        request_path: str | None,
        view: str | None,
        request_returned_ago: float | None,
        connection_id: int | None,
        connection_age: float | None,
        connection_opened_by_pid: int | None,
    ) -> None:
        super().__init__(message)
        self.context = context
        self.alias = alias
        self.vendor = vendor
        self.thread_name = thread_name
        self.thread_ident = thread_ident
        self.thread_native_id = thread_native_id
        self.pid = pid
        self.request_id = request_id
        self.request_method = request_method
        self.request_path = request_path
        self.view = view
        self.request_returned_ago = request_returned_ago
        self.connection_id = connection_id
        self.connection_age = connection_age
        self.connection_opened_by_pid = connection_opened_by_pid

    def __reduce__(self) -> tuple[Any, ...]:
        # BaseException pickles as cls(*args), which loses the keyword-only facts.
        facts = {name: getattr(self, name) for name in FACTS}
        return (_rebuild, (type(self), str(self), facts), self.__dict__)


class DetachedQueryError(UnsafeQueryError):
    """ORM work that originated in a request ran outside that request's thread."""


class ForkedConnectionError(UnsafeQueryError):
    """A connection opened in another process (inherited across ``fork()``) was used."""


class CrossThreadQueryError(UnsafeQueryError):
    """A query ran inside a live request's context but on another thread (policy: raise)."""


class RequestQueryError(UnsafeQueryError):
    """A query on the request thread, refused because the policy says so."""


class BackgroundQueryError(UnsafeQueryError):
    """A background query, refused because the policy says so."""


def _rebuild(cls: type[UnsafeQueryError], message: str, facts: dict[str, Any]) -> UnsafeQueryError:
    """Unpickle an :class:`UnsafeQueryError` (module level, so pickle can find it)."""
    return cls(message, **facts)


ERRORS_BY_CONTEXT: dict[str, type[UnsafeQueryError]] = {
    "request": RequestQueryError,
    "cross_thread": CrossThreadQueryError,
    "detached": DetachedQueryError,
    "forked": ForkedConnectionError,
    "background": BackgroundQueryError,
}


class UnsafeQueriesFound(ConnDiagError, AssertionError):
    """A test (or ``conndiag.testing.assert_no_unsafe_queries()`` block) during which conndiag
    refused or flagged a query. ``events`` are the refused and flagged queries
    (:class:`conndiag.testing.Event`), the message has each one's full explanation.
    """

    def __init__(self, message: str, events: Sequence[object] = ()) -> None:
        super().__init__(message)
        self.events = tuple(events)

    def __reduce__(self) -> tuple[type[UnsafeQueriesFound], tuple[str, tuple[object, ...]]]:
        # Picklable with its events (Django's --parallel workers send it to the parent).
        return (type(self), (str(self), self.events))
