"""The live runtime: the parsed config, the policy table and the active recorders.

Built on first use from :func:`conndiag.conf.get_config` and dropped when ``CONNDIAG``
changes. :meth:`Runtime.emit` fans a record out to every recorder; a recorder's failure is
counted and reported once per kind, and never reaches the application. A recorder that
cannot be built (the metrics, when ``PROMETHEUS_MULTIPROC_DIR`` names a missing directory)
is left out: conndiag runs without it and says so (an internal error ``<name>.build``,
reported through the recorders that could be built; see also check ``conndiag.E002``).
The runtime is the reporter of :mod:`conndiag.contain`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from . import contain, events, metrics, publish
from .conf import Config, get_config

if TYPE_CHECKING:
    from collections.abc import Callable

    from .records import Query, Recorder


class Runtime:
    __slots__ = ("_lock", "_reported", "config", "internal_errors", "policy", "recorders")

    def __init__(self, config: Config, recorders: list[Recorder]) -> None:
        self.config = config
        #: context -> action, a plain dict for the hot path
        self.policy: dict[str, str] = dict(config.policy)
        self.recorders = tuple(recorders)
        self.internal_errors = 0
        self._reported: set[tuple[str, type[BaseException]]] = set()
        self._lock = threading.Lock()

    def record_query(self, q: Query) -> None:
        for recorder in self.recorders:
            try:
                recorder.query(q)
            except Exception as exc:
                self.internal_error(f"{type(recorder).__name__}.query", exc)

    def emit(self, method: str, *args: Any) -> None:
        """Call ``method(*args)`` on every recorder, containing their failures."""
        for recorder in self.recorders:
            try:
                getattr(recorder, method)(*args)
            except Exception as exc:
                self.internal_error(f"{type(recorder).__name__}.{method}", exc)

    def internal_error(self, component: str, error: BaseException) -> None:
        """Count a failure of conndiag's own code; report the first of each kind."""
        key = (component, type(error))
        with self._lock:
            self.internal_errors += 1
            first = key not in self._reported
            self._reported.add(key)
        for recorder in self.recorders:
            try:
                recorder.internal_error(component, error, first)
            except Exception:  # noqa: S110 - the reporter itself failed; nothing left to tell
                pass


class RecorderUnavailable(RuntimeError):
    """A recorder could not be built: conndiag runs without it (reported, never raised)."""


def build(config: Config) -> Runtime:
    factories: list[tuple[str, Callable[[Config], Recorder]]] = [("events", events.EventLog)]
    if config.metrics:
        factories.append(("metrics", metrics.MetricsRecorder))
    if config.inspector:
        factories.append(("inspector", publish.Publisher))
    recorders: list[Recorder] = []
    failed: list[tuple[str, Exception]] = []
    for name, factory in factories:
        try:
            recorders.append(factory(config))
        except Exception as exc:
            failed.append((name, exc))
    recorders.extend(_listeners)
    rt = Runtime(config, recorders)
    for name, error in failed:
        msg = f"conndiag runs without its {name}: {type(error).__name__}: {error}"
        if name == "metrics":
            msg += " (check conndiag.E002: PROMETHEUS_MULTIPROC_DIR)"
        unavailable = RecorderUnavailable(msg)
        unavailable.__cause__ = error
        rt.internal_error(f"{name}.build", unavailable)
    return rt


#: recorders that outlive rebuilds: conndiag.testing's, while a test suite watches (else none)
_listeners: list[Recorder] = []


def add_listener(recorder: Recorder) -> None:
    """Add ``recorder`` to every runtime built from now on (the current one is rebuilt)."""
    if recorder not in _listeners:
        _listeners.append(recorder)
    reset()


def remove_listener(recorder: Recorder) -> None:
    if recorder in _listeners:
        _listeners.remove(recorder)
    reset()


_runtime: Runtime | None = None
_build_lock = threading.Lock()


def get() -> Runtime:
    """The current runtime (built on first use)."""
    rt = _runtime
    if rt is None:
        rt = _rebuild()
    return rt


def _rebuild() -> Runtime:
    global _runtime
    with _build_lock:
        if _runtime is None:
            _runtime = build(get_config())
        return _runtime


def after_fork() -> None:
    """:func:`conndiag.process.on_fork` callback: new locks (a parent thread may have held one)."""
    global _build_lock
    _build_lock = threading.Lock()
    rt = _runtime
    if rt is not None:
        rt._lock = threading.Lock()


def internal_error(component: str, error: BaseException) -> None:
    """Count and report a failure of conndiag's own code (the reporter of ``contain``)."""
    rt = _runtime
    if rt is None:
        rt = get()  # if it cannot be built, contain falls back to the stdlib logger
    rt.internal_error(component, error)


contain.set_reporter(internal_error)


def reset(**kwargs: object) -> None:
    """Drop the runtime so the next query builds it from the current settings."""
    global _runtime
    if kwargs.get("setting", "CONNDIAG") == "CONNDIAG":
        _runtime = None
