"""Fault injection: each internal component of conndiag, made to raise in turn, costs the
application nothing.

For every component (discovered, not listed by hand where conndiag can list them):

- every guarded step (``conndiag.contain.GUARDED``: the connect and close hooks, the
  middleware's entry and exit, the ``Thread.start`` / ``submit`` hooks and the task
  wrapper, the metrics view's flush, ...), made to fail at its first line;
- every entry point contained inline (``conndiag.contain.INLINE``: the request signal
  receivers), its body made to fail;
- every method of every recorder the runtime built (the event log, the metrics), from the
  ``Recorder`` protocol;
- the decision and state functions the execute wrapper and the hooks call (classify, the
  thread lookup, the query record, stale, diagnosis, server facts, the connection state,
  the request scope, the runtime's fan-out and its build),

the application's queries, connects and closes, requests through Django's real WSGI and ASGI
handlers, thread starts and executor submits must succeed with the same results as without
the fault, on SQLite and MariaDB; the fault must have been hit, counted (the runtime's
counter and ``conndiag_internal_errors_total``) and reported once per kind.

The policy here says ``log`` for ``detached``: a refusal is a decision conndiag takes only
when it can classify, so with a broken classifier the refused work would legitimately run;
with ``log`` the results must be identical whatever fails.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from asgiref.sync import async_to_sync
from django.core.handlers.wsgi import WSGIHandler
from django.db import DatabaseError, connections
from django.test import override_settings
from prometheus_client import REGISTRY

import conndiag
from conndiag import contain, runtime
from conndiag.metrics import component_label
from conndiag.records import Recorder
from tests.conftest import mysql_wait_timeout, of
from tests.handlers import asgi_get, wsgi_get
from tests.testapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "mysql"])

ALIASES = ("default", "mysql")
#: every MariaDB query is "stale" (wait_timeout 600 s, margin 3600 s), so stale is on the path
SETTINGS = {"POLICY": {"detached": "log"}, "STALE_MARGIN": 3600.0}

# Import every module so that every guarded step is registered.
for _module in pkgutil.iter_modules(conndiag.__path__):
    importlib.import_module(f"conndiag.{_module.name}")


class InjectedFault(RuntimeError):
    """The failure this module injects."""


# --- the application's operations -----------------------------------------------------------


def _queries(alias: str) -> Any:
    manager = Item.objects.using(alias)
    manager.create(name="a")
    manager.bulk_create([Item(name="b"), Item(name="c")])
    updated = manager.filter(name="c").update(name="d")
    names = sorted(manager.values_list("name", flat=True))
    deleted, _ = manager.filter(name__in=["a", "b"]).delete()
    return names, updated, deleted, manager.count()


def _connect_close(alias: str) -> Any:
    db = connections[alias]
    db.close()
    db.ensure_connection()
    with db.cursor() as cursor:
        cursor.execute("SELECT 1")
        row = cursor.fetchone()
    db.close()
    return list(row), db.connection is None


def _connect_fails(alias: str) -> Any:
    db = connections.create_connection(alias)  # through conndiag's hook, like any wrapper
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    db.settings_dict = {
        **db.settings_dict,
        "PORT": str(closed_port),
        "NAME": "/nonexistent-conndiag-dir/db.sqlite3" if db.vendor == "sqlite" else "x",
    }
    try:
        db.ensure_connection()
    except DatabaseError as exc:
        return type(exc).__name__, str(exc.args[0])[:40]
    finally:
        db.close()
    return "connected"


def _wsgi(path: str) -> Callable[[str], Any]:
    def run(alias: str) -> Any:
        status, body = wsgi_get(path, f"db={alias}")
        return status, body.decode()

    return run


def _metrics_view(alias: str) -> Any:
    environ = {"PATH_INFO": "/metrics", "REQUEST_METHOD": "GET", "REMOTE_ADDR": "127.0.0.1"}
    setup_testing_defaults(environ)
    status: list[str] = []
    response = WSGIHandler()(environ, lambda s, h, e=None: status.append(s))
    try:
        body = b"".join(response)
    finally:
        response.close()
    return status[0], b"conndiag_queries_total" in body


def _asgi(alias: str) -> Any:
    status, body = async_to_sync(asgi_get)("/async/", f"db={alias}")
    return status, body.decode()


def _thread(alias: str) -> Any:
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(Item.objects.using(alias).count()))
    t.start()
    t.join()
    return result


def _executor(alias: str) -> Any:
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: Item.objects.using(alias).count()).result()


SCENARIOS: dict[str, Callable[[str], Any]] = {
    "queries": _queries,
    "connect_close": _connect_close,
    "connect_fails": _connect_fails,
    "wsgi_sync_view": _wsgi("/sync/"),
    "wsgi_view_starting_a_thread": _wsgi("/thread/"),
    "wsgi_view_submitting_to_a_pool": _wsgi("/executor/"),
    "asgi_async_view": _asgi,
    "metrics_view": _metrics_view,
    "thread_start": _thread,
    "executor_submit": _executor,
}


def run_all() -> dict[tuple[str, str], Any]:
    """Every scenario on every alias, from an empty table; the results (or the error)."""
    results: dict[tuple[str, str], Any] = {}
    for alias in ALIASES:
        for name, scenario in SCENARIOS.items():
            Item.objects.using(alias).all().delete()
            try:
                results[(alias, name)] = scenario(alias)
            except Exception as exc:  # recorded, so the comparison names the scenario
                results[(alias, name)] = f"raised {type(exc).__name__}: {exc}"
    return results


# --- the components -------------------------------------------------------------------------


class Fault:
    """A callable that raises :class:`InjectedFault` and counts its calls."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise InjectedFault(self.name)


def _guarded_cell(guarded: Callable[..., Any]) -> Any:
    """The closure cell of a guarded step that holds the step itself."""
    inner = guarded.__wrapped__  # type: ignore[attr-defined]
    for cell in guarded.__closure__ or ():
        if cell.cell_contents is inner:
            return cell
    raise AssertionError(f"{guarded!r} is not a contain.guard step")


def _replace_everywhere(monkeypatch: pytest.MonkeyPatch, original: Any, fault: Fault) -> None:
    """Replace ``original`` in every conndiag module that refers to it (aliases included)."""
    import sys

    found = False
    for name, module in list(sys.modules.items()):
        if not name.startswith("conndiag") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if value is original:
                monkeypatch.setattr(module, attr, fault)
                found = True
    assert found, original


#: the decision and state functions on the entry paths, as (module, attribute path)
COLLABORATORS = [
    ("conndiag.classify", "classify"),
    ("conndiag.threads", "current"),
    ("conndiag.threads", "ThreadInfo.handed_off_origin"),
    ("conndiag.records", "Query.__init__"),
    ("conndiag.stale", "report"),
    ("conndiag.diagnosis", "diagnose"),
    ("conndiag.policy", "explain"),
    ("conndiag.serverfacts", "probe"),
    ("conndiag.state", "ConnState.__init__"),
    ("conndiag.state", "ConnState.connected"),
    ("conndiag.scope", "RequestScope.__init__"),
    ("conndiag.scope", "RequestScope.attach"),
    ("conndiag.scope", "RequestScope.finish"),
    ("conndiag.runtime", "Runtime.emit"),
    ("conndiag.runtime", "Runtime.record_query"),
    ("conndiag.runtime", "build"),
    ("conndiag.metrics", "Metrics.flush_thread"),
]


RECORDER_METHODS = [m for m in vars(Recorder) if not m.startswith("_")]


def _recorder_classes() -> list[type]:
    """Every recorder class the runtime builds (every class of a conndiag module that
    implements the Recorder protocol's ``query`` and ``connection_opened``), except
    conndiag.testing's listener, which is added only while a test suite watches."""
    import sys

    found = []
    for name, module in sorted(sys.modules.items()):
        if not name.startswith("conndiag.") or name in ("conndiag.records", "conndiag.testing"):
            continue
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and value.__module__ == name
                and "query" in vars(value)
                and "connection_opened" in vars(value)
            ):
                found.append(value)
    return found


def _components() -> list[tuple[str, str]]:
    """(kind, name) of every component to break; names are stable test ids."""
    found = [("guarded", f"{c}:{fn.__qualname__}") for c, fn in contain.GUARDED]
    found += [("inline", f"{c}:{module}.{body}") for c, module, body in contain.INLINE]
    for cls in _recorder_classes():
        found += [
            ("recorder", f"{cls.__module__}:{cls.__name__}.{m}")
            for m in RECORDER_METHODS
            if m in vars(cls)
        ]
    found += [("collaborator", f"{mod}:{path}") for mod, path in COLLABORATORS]
    return found


COMPONENTS = _components()


def inject(monkeypatch: pytest.MonkeyPatch, kind: str, name: str) -> Fault:
    """Make component ``name`` raise until the test ends."""
    fault = Fault(name)
    if kind == "guarded":
        component, _, qualname = name.partition(":")
        (guarded,) = [
            fn for c, fn in contain.GUARDED if c == component and fn.__qualname__ == qualname
        ]
        cell = _guarded_cell(guarded)
        monkeypatch.setattr(cell, "cell_contents", fault)
        return fault
    if kind == "inline":
        component, _, where = name.partition(":")
        module_name, _, body = where.rpartition(".")
        monkeypatch.setattr(importlib.import_module(module_name), body, fault)
        return fault
    module_name, _, path = name.partition(":")
    module = importlib.import_module(module_name)
    if "." in path:
        cls_name, method = path.split(".")
        monkeypatch.setattr(getattr(module, cls_name), method, fault)
    else:
        _replace_everywhere(monkeypatch, getattr(module, path), fault)
    return fault


# --- the tests ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _short_wait_timeout() -> Iterator[None]:
    with mysql_wait_timeout(600):
        yield


_BASELINE: dict[tuple[str, str], Any] = {}


@pytest.fixture
def baseline() -> dict[tuple[str, str], Any]:
    """The results without any fault (computed once: every scenario starts from scratch)."""
    if not _BASELINE:
        with override_settings(CONNDIAG=SETTINGS):
            _BASELINE.update(run_all())
    return _BASELINE


def _internal_errors_metric() -> float:
    """``conndiag_internal_errors_total`` summed over every component label."""
    from conndiag.metrics import COMPONENTS

    return sum(
        REGISTRY.get_sample_value("conndiag_internal_errors_total", {"component": label}) or 0
        for label in COMPONENTS
    )


def test_every_kind_of_component_is_covered():
    """The discovery finds the entry points the issue names (it is not an empty list)."""
    components = {c for c, _ in contain.GUARDED} | {c for c, _, _ in contain.INLINE}
    for expected in (
        "lifecycle.connect",
        "lifecycle.close",
        "scope.request_started",
        "scope.request_finished",
        "middleware.enter",
        "middleware.leave",
        "threads.start",
        "threads.submit",
        "threads.task",
        "metrics.flush",
        "serverfacts.on_connect",
        "lifecycle.report_abandoned",
    ):
        assert expected in components
    recorders = {n.split(":")[1].split(".")[0] for k, n in COMPONENTS if k == "recorder"}
    assert {"EventLog", "MetricsRecorder", "Publisher"} <= recorders
    assert {component_label(c) for c in components} <= {
        "wrapper",
        "lifecycle",
        "stale",
        "serverfacts",
        "scope",
        "threads",
        "middleware",
        "metrics",
    }


@pytest.mark.parametrize(("kind", "name"), COMPONENTS, ids=[n for _, n in COMPONENTS])
def test_a_failing_component_costs_the_application_nothing(
    kind: str,
    name: str,
    baseline: dict[tuple[str, str], Any],
    monkeypatch: pytest.MonkeyPatch,
    events: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With this component raising, every scenario on SQLite and MariaDB gives the same
    result as without the fault, and the fault was hit, counted and reported once per kind."""
    with override_settings(CONNDIAG=SETTINGS):
        fallback_before = contain.fallback_count
        if name == "conndiag.runtime:build":
            monkeypatch.setattr(contain, "_fallback_reported", set())
        rt_before = runtime.get()
        counted_before = rt_before.internal_errors
        metric_before = _internal_errors_metric()
        fault = inject(monkeypatch, kind, name)
        if name.endswith(".internal_error"):
            # It is called only for another failure: make one.
            inject(monkeypatch, "collaborator", "conndiag.classify:classify")
        if name == "conndiag.runtime:build":
            runtime.reset()  # the next entry point tries to build it, and cannot
        with caplog.at_level(logging.ERROR, logger="conndiag"):
            results = run_all()
        assert results == baseline
        assert fault.calls > 0, f"no scenario reached {name}"
        injected = [
            e
            for e in of(events, "conndiag.internal_error")
            if "InjectedFault" in e["error"] or "InjectedFault" in str(e.get("component"))
        ]
        kinds = [
            (e["component"], e["error"].split(":")[0])
            for e in of(events, "conndiag.internal_error")
        ]
        assert len(kinds) == len(set(kinds)), kinds  # each kind reported once
        if name == "conndiag.runtime:build":
            # No runtime: counted and logged once per kind by the stdlib fallback.
            assert contain.fallback_count > fallback_before
            logged = [r.getMessage() for r in caplog.records if "InjectedFault" in r.getMessage()]
            assert logged
            assert len(logged) == len(set(logged))
            return
        rt = runtime.get()
        assert rt is rt_before
        assert rt.internal_errors > counted_before
        if name != "conndiag.events:EventLog.internal_error":
            assert injected, f"{name} failed but no conndiag.internal_error event says so"
        if not name.startswith("conndiag.metrics:MetricsRecorder.internal_error"):
            assert _internal_errors_metric() > metric_before
