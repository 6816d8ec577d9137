"""Where conndiag's events go: structlog when the application configured it, else stdlib logging.

The choice follows the application, and conndiag never configures either:

- ``structlog.is_configured()`` (the application called ``structlog.configure()``, directly
  or the django-structlog way with structlog's stdlib ``LoggerFactory``): the event goes to
  ``structlog.get_logger("conndiag.<family>")`` with its fields as keyword arguments;
- otherwise to the stdlib logger ``conndiag.<family>`` (``query``, ``connection``, ``server``,
  ``internal``; all children of ``conndiag``): Django's ``LOGGING`` filters and routes it.
  The fields become attributes of the ``LogRecord`` (``record.alias``, ``record.event``...),
  and the record's message is readable: ``"<event>: <explanation or key=value summary>"``.
  The one field whose name ``LogRecord`` already uses, ``message``, *is* that message.

With nothing configured at all, stdlib logging drops the routine (DEBUG/INFO) events after
a cheap level check and prints WARNING and up (the anomalies) once each on stderr, through
``logging.lastResort``.

The choice is made per event, not once: ``structlog.is_configured()`` is an attribute read,
and an application (or a test's ``structlog.testing.capture_logs``) may configure structlog
after conndiag's runtime was built.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import structlog

#: event families, each a child logger of the configured ``LOGGER_NAME`` (``conndiag``)
FAMILIES = ("query", "connection", "server", "internal")
QUERY_FAMILY, CONNECTION_FAMILY, SERVER_FAMILY, INTERNAL_FAMILY = FAMILIES

LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
}
LEVELS = {name: number for number, name in LEVEL_NAMES.items()}

#: the fields a ``LogRecord`` message summarises, per event (the rest are attributes only)
SUMMARY_FIELDS: dict[str, tuple[str, ...]] = {
    "conndiag.query": (
        "alias",
        "vendor",
        "context",
        "outcome",
        "duration_s",
        "thread_name",
        "request_id",
        "connection_id",
    ),
    "conndiag.query.failed": (
        "alias",
        "vendor",
        "context",
        "error_class",
        "error_code",
        "thread_name",
        "request_id",
        "connection_id",
        "connection_idle_s",
        "cause",
    ),
    "conndiag.connection.opened": (
        "alias",
        "vendor",
        "context",
        "connection_id",
        "open_duration_s",
        "thread_name",
        "conn_max_age_state",
    ),
    "conndiag.connection.closed": (
        "alias",
        "vendor",
        "reason",
        "connection_id",
        "connection_age_s",
        "connection_queries",
        "connection_thread",
    ),
    "conndiag.connection.stale": (
        "alias",
        "vendor",
        "context",
        "connection_id",
        "connection_idle_s",
        "wait_timeout_s",
        "replaced",
        "thread_name",
        "request_id",
    ),
    "conndiag.connection.failed": (
        "alias",
        "vendor",
        "context",
        "error_class",
        "error_code",
        "thread_name",
        "cause",
    ),
    "conndiag.server.facts": (
        "alias",
        "vendor",
        "connection_id",
        "wait_timeout_s",
        "max_connections",
    ),
    "conndiag.internal_error": ("component", "error"),
}


class EventMessage:
    """A ``LogRecord`` message rendered only when a handler formats the record.

    ``str()`` gives ``"<event>: <text>"``: the explanation of a flagged or refused query, or
    a ``key=value`` summary of the event's main fields.
    """

    __slots__ = ("event", "fields", "text")

    def __init__(self, event: str, text: str | None, fields: dict[str, Any]) -> None:
        self.event = event
        self.text = text
        self.fields = fields

    def __str__(self) -> str:
        text = self.text
        if text is None:
            fields = self.fields
            text = " ".join(
                f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}"
                for name in SUMMARY_FIELDS.get(self.event, ())
                if (value := fields.get(name)) is not None
            )
        return f"{self.event}: {text}"

    def __repr__(self) -> str:
        return repr(str(self))


def structlog_level_enabled(logger_name: str, level_no: int) -> bool:
    """Whether structlog, as the application configured it, would emit at ``level_no``."""
    wrapper_class = structlog.get_config()["wrapper_class"]
    if isinstance(wrapper_class, type) and issubclass(wrapper_class, structlog.stdlib.BoundLogger):
        return logging.getLogger(logger_name).isEnabledFor(level_no)
    is_enabled_for = getattr(wrapper_class, "is_enabled_for", None)
    if is_enabled_for is not None:
        # make_filtering_bound_logger classes (structlog's default wrapper class); their
        # is_enabled_for ignores ``self``.
        return bool(is_enabled_for(wrapper_class, level_no))
    return True


#: seconds a structlog level check is trusted (reading structlog's config builds a dict)
_STRUCTLOG_LEVEL_CACHE_SECONDS = 1.0


class Backend:
    """Emits conndiag's events to structlog or to stdlib logging, whichever the app uses."""

    __slots__ = ("_sl", "_sl_bound", "_sl_enabled", "_sl_until", "_std", "names")

    def __init__(self, logger_name: str) -> None:
        #: family -> full logger name (``conndiag.query``)
        self.names = {family: f"{logger_name}.{family}" for family in FAMILIES}
        self._std = {family: logging.getLogger(name) for family, name in self.names.items()}
        # One lazy proxy per family: with cache_logger_on_first_use it binds only once.
        self._sl = {family: structlog.get_logger(name) for family, name in self.names.items()}
        #: (family, level) -> the emitter of :meth:`_structlog_emitter`, once structlog says
        #: loggers may be cached (``cache_logger_on_first_use``): what the lazy proxy would
        #: do, without the proxy's ``__getattr__`` and ``bind()`` on every event
        self._sl_bound: dict[tuple[str, int], Any] = {}
        self._sl_enabled: dict[tuple[str, int], bool] = {}
        self._sl_until = 0.0

    def enabled(self, family: str, level_no: int) -> bool:
        """Whether an event of ``family`` at ``level_no`` would be emitted at all (cheap)."""
        if not structlog.is_configured():
            return self._std[family].isEnabledFor(level_no)
        now = time.monotonic()
        if now >= self._sl_until:
            self._sl_enabled.clear()
            self._sl_until = now + _STRUCTLOG_LEVEL_CACHE_SECONDS
        key = (family, level_no)
        enabled = self._sl_enabled.get(key)
        if enabled is None:
            enabled = self._sl_enabled[key] = structlog_level_enabled(self.names[family], level_no)
        return enabled

    def _structlog_emitter(
        self, family: str, level_no: int
    ) -> Callable[[str, dict[str, Any]], None]:
        """``emitter(event, fields)`` for ``family`` at ``level_no`` through structlog.

        When structlog caches its loggers (``cache_logger_on_first_use``), the emitter is
        kept, and it hands the fields to a bound logger as its *context*: a new bound logger
        of the configured class, on the same wrapped logger and processors, whose level
        method is called with the event alone. That is what ``log.debug(event, **fields)``
        does, without the three copies of the fields the keyword arguments cost on their
        way (ours, the level method's, ``_proxy_to_logger``'s): structlog's pipeline starts
        from a copy of the context either way. Otherwise (no caching: structlog resolves
        the configuration per call) the lazy proxy is called with keyword arguments.
        """
        proxy = self._sl[family]
        name = LEVEL_NAMES[level_no]
        if not structlog.get_config()["cache_logger_on_first_use"]:

            def emit_uncached(event: str, fields: dict[str, Any]) -> None:
                getattr(proxy, name)(event, **fields)

            return emit_uncached
        # conndiag's proxies carry no initial values: the bound logger's context is empty,
        # so the fields are the whole context.
        bound = proxy.bind()
        cls, logger, processors = type(bound), bound._logger, bound._processors
        level_method = getattr(cls, name)

        def emit_cached(event: str, fields: dict[str, Any]) -> None:
            level_method(cls(logger, processors, fields), event)

        self._sl_bound[(family, level_no)] = emit_cached
        return emit_cached

    def emit(self, family: str, level_no: int, event: str, fields: dict[str, Any]) -> None:
        """Emit ``event`` with ``fields`` (the dict is consumed: the caller built it for this)."""
        if structlog.is_configured():
            emitter = self._sl_bound.get((family, level_no))
            if emitter is None:
                emitter = self._structlog_emitter(family, level_no)
            emitter(event, fields)
            return
        logger = self._std[family]
        if not logger.isEnabledFor(level_no):
            return
        text = fields.pop("message", None)
        fields["event"] = event
        # makeRecord, not logger.log(): no findCaller() stack walk (the caller would be this
        # module anyway); the application's record factory and Logger class still apply.
        record = logger.makeRecord(
            logger.name,
            level_no,
            __file__,
            0,
            EventMessage(event, text, fields),
            (),
            None,
            func=event,
            extra=fields,
        )
        logger.handle(record)


#: ``LogRecord`` attributes that are not conndiag fields (what a JSON formatter leaves out)
RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("x", logging.INFO, __file__, 0, "", (), None))
) | {"message", "asctime"}


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """conndiag's fields of a stdlib record, as a structlog event dict would carry them."""
    return {k: v for k, v in vars(record).items() if k not in RECORD_ATTRIBUTES}
