"""structlog for the demo site, set up the way production teams usually do it.

* One JSON object per line (or a coloured console format when ``DEMO_LOG_FORMAT=console``),
  to stdout and to a log file, with an ISO timestamp, the level, the logger name, the process
  id and the ``request_id`` on every line (``null`` outside requests). conndiag's middleware
  binds ``request_id`` with ``structlog.contextvars``, so ``merge_contextvars`` comes first.
* stdlib logging (Django's own loggers, ``py.warnings``...) goes through structlog's
  ``ProcessorFormatter``, so every line of the file has the same shape.
* structlog loggers are stdlib ``BoundLogger``s: the level of the ``conndiag`` logger decides
  whether conndiag's routine per-query events are emitted (conndiag checks it cheaply).

This is application configuration: a library (conndiag included) never calls
``structlog.configure()``.
"""

from __future__ import annotations

import os
from typing import Any

import structlog


def add_pid(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Every line says which process wrote it (gunicorn runs several)."""
    event_dict.setdefault("pid", os.getpid())
    return event_dict


def ensure_request_id(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """``request_id`` is on every line, ``null`` when the line is not about a request."""
    event_dict.setdefault("request_id", None)
    return event_dict


def shared_processors() -> list[Any]:
    """Processors run for structlog events and for stdlib records alike."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_pid,
        ensure_request_id,
    ]


def renderer(fmt: str) -> Any:
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=False)
    return structlog.processors.JSONRenderer(sort_keys=False, default=str)


def configure_structlog() -> None:
    """Configure structlog to hand its events to stdlib logging (see :func:`logging_dict`)."""
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared_processors(),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def logging_dict(
    *, level: str, conndiag_level: str, fmt: str, log_file: str | None, stdout: bool
) -> dict[str, Any]:
    """The ``LOGGING`` setting: stdout and/or a file, both through ``ProcessorFormatter``."""
    formatter = {
        "()": structlog.stdlib.ProcessorFormatter,
        "processors": [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer(fmt),
        ],
        "foreign_pre_chain": shared_processors(),
    }
    handlers: dict[str, Any] = {}
    if stdout:
        handlers["stdout"] = {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stdout",
            "formatter": "structured",
        }
    if log_file:
        # Several gunicorn workers append to one file: O_APPEND keeps their lines whole.
        handlers["file"] = {
            "class": "logging.FileHandler",
            "filename": log_file,
            "mode": "a",
            "encoding": "utf-8",
            "formatter": "structured",
        }
    names = list(handlers)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"structured": formatter},
        "handlers": handlers,
        "root": {"handlers": names, "level": level.upper()},
        "loggers": {
            # Django's loggers keep their own handlers unless told otherwise: send them to ours.
            "django": {"handlers": names, "level": level.upper(), "propagate": False},
            "django.server": {"handlers": names, "level": level.upper(), "propagate": False},
            # The level of conndiag's logger decides whether per-query events are emitted.
            "conndiag": {"handlers": names, "level": conndiag_level.upper(), "propagate": False},
        },
    }
