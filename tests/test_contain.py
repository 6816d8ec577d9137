"""Containment: conndiag's own failures are reported once per kind and never reach the app.

The per-component fault injection (every internal component made to raise in turn, through
real queries, requests, connects, closes, threads and executors) is tests/test_faults.py.
"""

from __future__ import annotations

import importlib
import json
import logging
import pkgutil
import re
import textwrap
from pathlib import Path

import pytest

import conndiag
from conndiag import contain, runtime
from tests.conftest import ROOT, of, run_python

# Every module, so that every guarded step is registered.
for _module in pkgutil.iter_modules(conndiag.__path__):
    importlib.import_module(f"conndiag.{_module.name}")


def test_guard_reports_and_returns_the_default(events):
    """A guarded step's exception is reported once per kind; the caller gets the default."""

    @contain.guard("scope.test", default="fallback")
    def step(fail: bool) -> str:
        if fail:
            raise ValueError("boom")
        return "ran"

    rt = runtime.get()
    before = rt.internal_errors
    assert step(False) == "ran"
    assert step(True) == "fallback"
    assert step(True) == "fallback"
    assert rt.internal_errors == before + 2
    reported = [e for e in of(events, "conndiag.internal_error") if e["component"] == "scope.test"]
    assert len(reported) == 1
    assert reported[0]["error"] == "ValueError: boom"


def test_guard_lets_refusals_and_interrupts_through():
    """A refusal the policy asked for (ConnDiagError) and KeyboardInterrupt are not failures."""

    @contain.guard("scope.test")
    def refuse(exc: BaseException) -> None:
        raise exc

    with pytest.raises(conndiag.ConnDiagError):
        refuse(conndiag.ConnDiagError("refused"))
    with pytest.raises(KeyboardInterrupt):
        refuse(KeyboardInterrupt())


def test_internal_error_without_a_runtime_falls_back_to_the_stdlib_logger(monkeypatch, caplog):
    """When no runtime can be built, failures are counted and logged once per kind."""

    def cannot_build() -> runtime.Runtime:
        raise RuntimeError("no runtime")

    monkeypatch.setattr(runtime, "get", cannot_build)
    monkeypatch.setattr(contain, "_fallback_reported", set())
    before = contain.fallback_count
    with caplog.at_level(logging.ERROR, logger="conndiag"):
        contain.internal_error("wrapper", ValueError("x"))
        contain.internal_error("wrapper", ValueError("y"))
    assert contain.fallback_count == before + 4  # two failures, and the reporter failed twice
    lines = [r.getMessage() for r in caplog.records if "component=wrapper " in r.getMessage()]
    assert len(lines) == 1
    assert "ValueError" in lines[0]


def test_a_recorder_that_cannot_be_built_is_left_out_and_reported(monkeypatch, events):
    """The runtime builds without a failing recorder and says so, naming what is missing."""
    from conndiag import metrics

    def broken(config: object, registry: object = None) -> None:
        raise FileNotFoundError(2, "No such file or directory", "/missing/counter_1.db")

    monkeypatch.setattr(metrics, "MetricsRecorder", broken)
    rt = runtime.get()
    assert [type(r).__name__ for r in rt.recorders] == ["EventLog", "Publisher"]
    (event,) = of(events, "conndiag.internal_error")
    assert event["component"] == "metrics.build"
    assert "conndiag runs without its metrics" in event["error"]
    assert "conndiag.E002" in event["error"]


def test_every_component_conndiag_reports_has_its_own_metric_label():
    """Each component a guarded step or an ``internal_error`` call names maps to its own
    ``component`` label of ``conndiag_internal_errors_total``, not to ``other``."""
    from conndiag import events, metrics, publish
    from conndiag.metrics import component_label

    named = {component for component, _ in contain.GUARDED}
    # the runtime names a recorder's failures after its class, a build's after its name
    for recorder in (events.EventLog, metrics.MetricsRecorder, publish.Publisher):
        named.add(f"{recorder.__name__}.query")
    named |= {f"{name}.build" for name in ("events", "metrics", "inspector")}
    for module in sorted((ROOT / "conndiag").rglob("*.py")):
        named |= set(re.findall(r'internal_error\(\s*f?"([\w.]+)', module.read_text()))
    assert named
    assert sorted(c for c in named if component_label(c) == "other") == []


MISSING_DIR_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import django
    from django.conf import settings
    django.setup()
    import structlog
    from structlog.testing import capture_logs
    from django.core import checks
    from django.db import connection
    from tests.handlers import wsgi_get

    with capture_logs() as events:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            first = cursor.fetchone()[0]
            cursor.execute("SELECT 2")
            second = cursor.fetchone()[0]
        status, body = wsgi_get("/nothing/")
        connection.close()
    ids = [m.id for m in checks.run_checks() if m.id.startswith("conndiag.")]
    internal = [e for e in events if e["event"] == "conndiag.internal_error"]
    print(json.dumps({
        "rows": [first, second], "status": status, "body": body.decode(),
        "internal": internal, "checks": ids,
        "opened": len([e for e in events if e["event"] == "conndiag.connection.opened"]),
    }, default=str))
""")


def test_missing_multiprocess_dir_runs_without_metrics_and_says_so(tmp_path: Path):
    """PROMETHEUS_MULTIPROC_DIR naming a missing directory: queries and requests work, the
    log says once that conndiag runs without metrics, and check conndiag.E002 reports it.

    A subprocess, because prometheus_client reads the variable when it is first imported.
    """
    out = run_python(
        "-c",
        MISSING_DIR_SCRIPT,
        env={
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing"),
        },
        timeout=120,
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["rows"] == [1, 2]
    assert result["status"].startswith("200")
    assert result["body"] == "nothing"
    assert result["opened"] == 1  # the event log still works
    (internal,) = result["internal"]
    assert internal["component"] == "metrics.build"
    assert "conndiag runs without its metrics" in internal["error"]
    assert "FileNotFoundError" in internal["error"]
    assert "conndiag.E002" in result["checks"]
