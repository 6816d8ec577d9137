"""The ``CONNDIAG`` setting, parsed once into a frozen, typed :class:`Config`.

Nothing here runs at import time: :func:`get_config` reads the setting on first use and
caches the result; the cache is dropped on ``setting_changed`` (see ``conndiag/install.py``) so
``override_settings`` works. Every bad key or value raises ``ImproperlyConfigured`` naming
the key, the value and what is allowed.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ImproperlyConfigured

#: The query contexts (README.md, "How it works"), in the order they are documented.
CONTEXTS = ("request", "cross_thread", "detached", "forked", "background")
#: What a policy can say about a context.
ACTIONS = ("raise", "log", "ignore", "replace")
#: the contexts an action is limited to: only a connection inherited across fork can be
#: replaced (dropped unclosed, a fresh one opened before the query)
ACTION_CONTEXTS: Mapping[str, tuple[str, ...]] = {"replace": ("forked",)}
LEVELS = ("debug", "info", "warning", "error")

DEFAULT_POLICY: Mapping[str, str] = {
    "request": "ignore",
    "cross_thread": "log",
    "detached": "raise",
    "forked": "replace",
    "background": "ignore",
}

_HEADER_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")


@dataclass(frozen=True, slots=True)
class Config:
    """Every conndiag setting, validated. Build it with :func:`parse`, not by hand."""

    policy: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_POLICY))
    request_id_header: str | None = "X-Request-ID"
    track_threads: bool = True
    log_queries: bool = True
    query_log_level: str = "debug"
    query_log_sample_rate: float = 1.0
    log_sql: bool = False
    log_sql_params: bool = False
    sql_max_length: int = 1000
    logger_name: str = "conndiag"
    metrics: bool = True
    metrics_token: str | None = None
    metrics_allowed_ips: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: ``cached`` by default: one probe per alias and process (per TTL), so per-request
    #: connections (CONN_MAX_AGE=0) cost no round trip each; ``connect`` probes every one
    server_facts: str = "cached"
    server_facts_ttl: float = 300.0
    replace_stale: bool = False
    stale_margin: float = 0.0
    #: connections per alias the deployment may open at once (workers x threads), for the
    #: max_connections check; None: from the WEB_CONCURRENCY environment variable, if set
    expected_connections: int | None = None
    #: publish this process's open connections for ``manage.py conndiag connections``
    inspector: bool = True
    #: where they are published (None: see :func:`conndiag.publish.directory`)
    inspector_dir: str | None = None

    #: the ``request.META`` key of :attr:`request_id_header` (``HTTP_X_REQUEST_ID``)
    request_id_meta_key: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        header = self.request_id_header
        key = None if header is None else "HTTP_" + header.upper().replace("-", "_")
        object.__setattr__(self, "request_id_meta_key", key)


def _fail(key: str, value: object, allowed: str) -> ImproperlyConfigured:
    where = key if key.startswith("CONNDIAG") else f"CONNDIAG[{key!r}]"
    msg = f"{where} = {value!r} is not valid: expected {allowed}."
    return ImproperlyConfigured(msg)


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, value, "True or False")
    return value


def _number(lo: float, hi: float) -> Callable[[str, object], float]:
    def check(key: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(key, value, f"a number from {lo} to {hi}")
        if math.isnan(value) or not lo <= value <= hi:
            raise _fail(key, value, f"a number from {lo} to {hi}")
        return float(value)

    return check


def _int(lo: int, hi: int) -> Callable[[str, object], int]:
    def check(key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise _fail(key, value, f"a whole number from {lo} to {hi}")
        return value

    return check


def _choice(*choices: str) -> Callable[[str, object], str]:
    def check(key: str, value: object) -> str:
        if value not in choices:
            raise _fail(key, value, "one of " + ", ".join(repr(c) for c in choices))
        return str(value)

    return check


def _optional_str(key: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _fail(key, value, "a non-empty string or None")
    return value


def _header(key: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _HEADER_RE.match(value):
        raise _fail(key, value, "an HTTP header name such as 'X-Request-ID', or None")
    return value


def _logger_name(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(key, value, "a non-empty logger name")
    return value


def _absolute_dir(key: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not os.path.isabs(value):
        raise _fail(key, value, "an absolute directory path such as '/run/conndiag', or None")
    return value


def _policy(key: str, value: object) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise _fail(key, value, "a dict mapping contexts to actions")
    merged = dict(DEFAULT_POLICY)
    for context, action in value.items():
        if context not in CONTEXTS:
            msg = (
                f"CONNDIAG[{key!r}] has an unknown context {context!r} (set to {action!r}): "
                f"expected one of the contexts {', '.join(CONTEXTS)}."
            )
            raise ImproperlyConfigured(msg)
        allowed = [a for a in ACTIONS if context in ACTION_CONTEXTS.get(a, (context,))]
        if action not in allowed:
            where = f"CONNDIAG[{key!r}][{context!r}]"
            raise _fail(where, action, "one of " + ", ".join(repr(a) for a in allowed))
        merged[context] = action
    return merged


def _networks(key: str, value: object) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise _fail(key, value, "a list of IP addresses or networks such as '10.0.0.0/8'")
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except (TypeError, ValueError):
            raise _fail(key, item, "an IP address or network such as '10.0.0.0/8'") from None
    return tuple(networks)


#: setting key -> (Config field, validator)
_KEYS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "POLICY": ("policy", _policy),
    "REQUEST_ID_HEADER": ("request_id_header", _header),
    "TRACK_THREADS": ("track_threads", _bool),
    "LOG_QUERIES": ("log_queries", _bool),
    "QUERY_LOG_LEVEL": ("query_log_level", _choice(*LEVELS)),
    "QUERY_LOG_SAMPLE_RATE": ("query_log_sample_rate", _number(0.0, 1.0)),
    "LOG_SQL": ("log_sql", _bool),
    "LOG_SQL_PARAMS": ("log_sql_params", _bool),
    "SQL_MAX_LENGTH": ("sql_max_length", _int(16, 1_000_000)),
    "LOGGER_NAME": ("logger_name", _logger_name),
    "METRICS": ("metrics", _bool),
    "METRICS_TOKEN": ("metrics_token", _optional_str),
    "METRICS_ALLOWED_IPS": ("metrics_allowed_ips", _networks),
    "SERVER_FACTS": ("server_facts", _choice("connect", "cached", "off")),
    "SERVER_FACTS_TTL": ("server_facts_ttl", _number(1.0, 86_400.0)),
    "REPLACE_STALE": ("replace_stale", _bool),
    "STALE_MARGIN": ("stale_margin", _number(0.0, 3600.0)),
    "EXPECTED_CONNECTIONS": (
        "expected_connections",
        lambda key, value: None if value is None else _int(1, 1_000_000)(key, value),
    ),
    "INSPECTOR": ("inspector", _bool),
    "INSPECTOR_DIR": ("inspector_dir", _absolute_dir),
}


def parse(raw: object) -> Config:
    """Validate a ``CONNDIAG`` value and return the :class:`Config` it describes."""
    if raw is None:
        return Config()
    if not isinstance(raw, Mapping):
        raise _fail("CONNDIAG", raw, "a dict")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _KEYS:
            msg = f"CONNDIAG has an unknown key {key!r}. Allowed keys: {', '.join(sorted(_KEYS))}."
            raise ImproperlyConfigured(msg)
        attr, check = _KEYS[key]
        values[attr] = check(key, value)
    return Config(**values)


_cached: Config | None = None


def get_config() -> Config:
    """The current configuration, parsed from ``settings.CONNDIAG`` on first use."""
    global _cached
    config = _cached
    if config is None:
        from django.conf import settings

        config = _cached = parse(getattr(settings, "CONNDIAG", None))
    return config


def clear_cache(**kwargs: object) -> None:
    """Forget the parsed configuration (a ``setting_changed`` receiver)."""
    global _cached
    if kwargs.get("setting", "CONNDIAG") == "CONNDIAG":
        _cached = None
