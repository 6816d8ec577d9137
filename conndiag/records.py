"""The facts recorders receive, and the interface a recorder implements.

The execute wrapper and the connection hooks build these records and hand them to every
active recorder (the structlog event log, the Prometheus metrics). A recorder that fails
never breaks the application's query: the runtime counts and reports the failure once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .threads import allowed

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

    from .scope import RequestScope
    from .state import ConnState
    from .threads import ThreadInfo

#: what conndiag did about a query, by policy action (the metrics' ``action`` label)
ACTION_LABELS = {"ignore": "observed", "log": "logged", "raise": "raised", "replace": "replaced"}


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """A classified database error and its most likely cause."""

    #: ``gone_away``, ``lost``, ``server_timeout``, ``refused``, ``too_many_connections``,
    #: ``access_denied``, ``other``
    error_class: str
    #: the driver's error code as a string from a fixed allow-list, else ``other``
    code: str
    #: the most likely cause, in plain words, computed from what conndiag knows
    cause: str


class Query:
    """One query seen by the execute wrapper."""

    __slots__ = (
        "action",
        "allowed",
        "context",
        "db",
        "diagnosis",
        "duration",
        "error",
        "idle",
        "info",
        "inherited",
        "many",
        "message",
        "params",
        "scope",
        "sql",
        "state",
    )

    def __init__(
        self,
        db: BaseDatabaseWrapper,
        state: ConnState,
        info: ThreadInfo,
        context: str,
        scope: RequestScope | None,
        action: str,
        sql: str,
        params: Any,
        many: bool,
        idle: float,
    ) -> None:
        self.db = db
        self.state = state
        self.info = info
        self.context = context
        self.scope = scope
        #: the policy action: ``ignore``, ``log`` or ``raise``
        self.action = action
        self.allowed = context == "background" and allowed(info)
        self.sql = sql
        self.params = params
        self.many = many
        #: seconds the connection was idle before this query
        self.idle = idle
        #: seconds the query took (None when it was refused)
        self.duration: float | None = None
        self.error: BaseException | None = None
        self.diagnosis: Diagnosis | None = None
        #: the connection inherited across fork this query's connection replaced, if any
        self.inherited: ConnState | None = None
        #: a refused query's account, computed once (``policy.refuse``): the refusal event
        #: and the exception say the same words, even if the request returns in between
        self.message: str | None = None


class Recorder(Protocol):
    """What the runtime calls. Methods must be cheap and must not touch the database.

    A recorder may subclass it to inherit a no-op for each method it has nothing to do for.
    """

    def query(self, q: Query) -> None:
        """After every query that ran (or was refused), successful or not."""
        return None

    def connection_opened(self, state: ConnState, info: ThreadInfo) -> None:
        """After a connection was opened (``state.open_duration`` is set)."""
        return None

    def connection_closed(self, state: ConnState, reason: str) -> None:
        """After a connection was closed, or found abandoned (``reason``)."""
        return None

    def connect_failed(
        self,
        alias: str,
        vendor: str,
        info: ThreadInfo,
        context: str,
        duration: float,
        diagnosis: Diagnosis,
    ) -> None:
        """After an attempt to connect failed."""
        return None

    def stale(self, q: Query, wait_timeout: float, replaced: bool) -> None:
        """Before a query on a connection idle past the server's ``wait_timeout``."""
        return None
        return None

    def server_facts(self, state: ConnState, facts: dict[str, Any]) -> None:
        """After server facts (``wait_timeout``, ``max_connections``) were learned."""
        return None
        return None

    def internal_error(self, component: str, error: BaseException, first: bool) -> None:
        """After conndiag's own code failed (``first``: the first failure of its kind)."""
        return None
        return None
