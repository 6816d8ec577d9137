"""The logging backends: structlog when configured, else stdlib ``conndiag.*`` loggers.

In-process tests check the stdlib records (attributes, logger names, readable messages, the
``message`` mapping) and the switch between backends. The set-up tests run a fresh project
(``tests/logsetups``) in a subprocess per set-up of docs/logging.md, through real WSGI and
ASGI handling, and read what reached its stdout and stderr.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog
from django.db import connections

from conndiag import events as ev
from conndiag.logbackend import FAMILIES, RECORD_ATTRIBUTES, EventMessage, record_fields
from dashboards import checks, generate
from tests.conftest import capture_events, of, require_tool
from tests.testapp.models import Item

ROOT = Path(__file__).resolve().parent.parent


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records():
    """Records reaching a handler on the ``conndiag`` logger (opened to DEBUG)."""
    logger = logging.getLogger("conndiag")
    handler = _Records()
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(old)


@pytest.mark.django_db(transaction=True)
def test_stdlib_records_carry_the_fields_as_attributes(records):
    """Without structlog configured, a query is a record of logger ``conndiag.query`` whose
    attributes are the event's fields and whose message reads as a sentence of them."""
    assert not structlog.is_configured()
    Item.objects.count()
    (record,) = [r for r in records if getattr(r, "event", None) == ev.QUERY]
    assert record.name == "conndiag.query"
    assert record.levelno == logging.DEBUG
    assert record.alias == "default"  # type: ignore[attr-defined]
    assert record.vendor == "sqlite"  # type: ignore[attr-defined]
    assert record.outcome == "ok"  # type: ignore[attr-defined]
    assert record.connection_queries >= 1  # type: ignore[attr-defined]
    message = record.getMessage()
    assert message.startswith("conndiag.query: alias='default' vendor='sqlite' ")
    assert "outcome='ok'" in message
    # a plain formatter renders it; the record's own thread/process attributes are intact
    line = logging.Formatter("%(name)s %(levelname)s %(threadName)s %(message)s").format(record)
    assert line.startswith("conndiag.query DEBUG MainThread conndiag.query: ")
    assert record.process == os.getpid()


@pytest.mark.django_db(transaction=True, databases=["default", "mysql"])
def test_connection_events_use_their_own_logger(records):
    """Connection events go to ``conndiag.connection``: LOGGING can route them apart."""
    connections["mysql"].close()
    Item.objects.using("mysql").count()
    opened = [r for r in records if getattr(r, "event", None) == ev.CONNECTION_OPENED]
    assert [r.name for r in opened] == ["conndiag.connection"]
    assert {r.name for r in records} <= {f"conndiag.{f}" for f in FAMILIES}


@pytest.mark.django_db(transaction=True, databases=["default", "mysql"])
def test_logger_levels_filter_each_family(records):
    """``conndiag.query`` at INFO drops routine query events, not connection events."""
    query_logger = logging.getLogger("conndiag.query")
    query_logger.setLevel(logging.INFO)
    try:
        connections["mysql"].close()
        Item.objects.using("mysql").count()
    finally:
        query_logger.setLevel(logging.NOTSET)
    events = {r.event for r in records}  # type: ignore[attr-defined]
    assert ev.QUERY not in events
    assert ev.CONNECTION_OPENED in events


def test_no_documented_field_collides_with_logrecord_attributes():
    """Every documented field can be a record attribute: ``message`` is the only name
    LogRecord already uses, and it becomes the record's message."""
    config = generate.load_config()
    fields = {f for group in ("events", "server_facts") for f in config["log_fields"][group]}
    assert fields & RECORD_ATTRIBUTES == {"message"}
    assert "event" not in RECORD_ATTRIBUTES


def test_message_field_becomes_the_record_message(records):
    """A flagged or refused query's explanation is the stdlib record's message."""
    from conndiag.logbackend import Backend

    Backend("conndiag").emit(
        "query", logging.ERROR, ev.QUERY_REFUSED, {"alias": "default", "message": "why and fix"}
    )
    (record,) = records
    assert record.getMessage() == "conndiag.query.refused: why and fix"
    assert record_fields(record) == {"alias": "default", "event": ev.QUERY_REFUSED}


def test_message_is_rendered_only_when_formatted():
    """The summary is built when a handler formats the record, from the fields it has."""
    message = EventMessage(ev.CONNECTION_CLOSED, None, {"alias": "a", "reason": "explicit"})
    assert str(message) == "conndiag.connection.closed: alias='a' reason='explicit'"
    assert repr(message) == repr(str(message))


@pytest.mark.django_db(transaction=True)
def test_backend_follows_structlog_configured_after_the_runtime_was_built(records):
    """structlog configured after conndiag's runtime was built takes over at once (the
    choice is made per event); reset, the stdlib loggers get the events again."""
    Item.objects.count()
    assert of([record_fields(r) for r in records], ev.QUERY)
    records.clear()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_events() as captured:
            Item.objects.count()
    finally:
        structlog.reset_defaults()
    assert of(captured, ev.QUERY)
    assert records == []
    Item.objects.count()
    assert of([record_fields(r) for r in records], ev.QUERY)


# -- the set-ups of docs/logging.md, each in a fresh process ---------------------------------

SETUPS = ("nothing", "stdlib-json", "structlog-json", "django-structlog")


def run_setup(setup: str, tmp: Path, level: str = "DEBUG") -> tuple[str, str]:
    """Run ``tests.logsetups.drive`` under ``setup``; returns (stdout, stderr)."""
    env = {
        **os.environ,
        "CONNDIAG_LOG_SETUP": setup,
        "CONNDIAG_LOG_LEVEL": level,
        "CONNDIAG_SETUP_DB": str(tmp / "db.sqlite3"),
        "DJANGO_SETTINGS_MODULE": "tests.logsetups.settings",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.logsetups.drive"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, done.stderr


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    return {s: run_setup(s, tmp_path_factory.mktemp(s)) for s in SETUPS}


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_nothing_configured_prints_only_anomalies_on_stderr(outputs):
    """A fresh project that configured no logging: nothing of conndiag on stdout; on
    stderr exactly one line per refused query (one WSGI, one ASGI), readable, and no
    routine event."""
    stdout, stderr = outputs["nothing"]
    assert stdout == ""
    ours = [line for line in stderr.splitlines() if "conndiag." in line]
    assert len(ours) == 2, stderr
    for line in ours:
        assert line.startswith("conndiag.query.refused: a query on database 'default'")
        assert "request GET /thread/ (view thread)" in line
        assert "Fix: " in line


@pytest.mark.parametrize("setup", SETUPS[1:])
def test_configured_setups_get_every_event_as_json(outputs, setup):
    """stdlib LOGGING with python-json-logger, structlog, and django-structlog's stdlib
    way: stdout is JSON lines only, with routine and anomaly events from WSGI and ASGI
    requests, their fields and request data."""
    stdout, stderr = outputs[setup]
    assert "conndiag." not in stderr
    lines = json_lines(stdout)
    queries = [e for e in lines if e["event"] == ev.QUERY and e["request_path"] == "/sync/"]
    assert {e["view"] for e in queries} == {"sync"}
    assert {e["context"] for e in queries} == {"request"}
    assert len({e["request_id"] for e in queries}) == 2  # one WSGI, one ASGI request
    refused = of(lines, ev.QUERY_REFUSED)
    assert len(refused) == 2
    assert all(e["context"] == "detached" and "Fix: " in e["message"] for e in refused)
    assert all(str(e["level"]).lower() in ("debug", "info", "warning", "error") for e in lines)
    assert all("timestamp" in e for e in lines)


def test_setup_at_info_drops_routine_events(tmp_path):
    """The production level (INFO) keeps connection events and anomalies only."""
    stdout, _ = run_setup("stdlib-json", tmp_path, level="INFO")
    names = {e["event"] for e in json_lines(stdout)}
    assert ev.QUERY not in names
    assert {ev.QUERY_REFUSED, ev.CONNECTION_OPENED} <= names


def _keys_by_event(lines: list[dict[str, Any]]) -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    for line in lines:
        keys.setdefault(line["event"], set()).update(line)
    return keys


def test_stdlib_json_has_the_same_fields_as_structlog_json(outputs):
    """Every field of every event in structlog's JSON has the same name in the stdlib JSON
    (python-json-logger, configured as docs/logging.md says)."""
    structlog_keys = _keys_by_event(json_lines(outputs["structlog-json"][0]))
    stdlib_keys = _keys_by_event(json_lines(outputs["stdlib-json"][0]))
    assert set(structlog_keys) == set(stdlib_keys)
    for event, keys in structlog_keys.items():
        # request_id on connection events comes from the application's merge_contextvars
        keys = keys - {"request_id"} if event != ev.QUERY else keys
        assert keys <= stdlib_keys[event], (event, keys - stdlib_keys[event])


def test_loki_rules_and_logs_dashboard_read_the_stdlib_json(outputs):
    """Every field the Loki rules and the logs dashboard filter, group or format on is in
    the stdlib JSON lines of the events they select."""
    node = require_tool("node", "nodejs")
    checks.ensure_logql_parser()
    keys = _keys_by_event(json_lines(outputs["stdlib-json"][0]))
    exprs = [e for _, e in checks.rule_exprs(generate.LOKI_RULES)]
    exprs += [e for _, e in checks.dashboard_exprs("loki")]
    stream_labels = set(generate.load_config()["loki"]["stream_labels"])
    checked = 0
    for parsed in checks.logql_check(exprs, node):
        emitted = [keys[e] for e in checks.logql_event_names(parsed["expr"]) if e in keys]
        if not emitted:
            continue
        have = set().union(*emitted)
        fields = {i["name"] for i in parsed["identifiers"] if not i["stream"]}
        fields |= checks.logql_template_fields(parsed["expr"])
        fields -= stream_labels | {"__error__"}
        assert fields <= have, f"{parsed['expr']}: {fields - have} not in the stdlib lines"
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize(
    "wrapper",
    ["filtering", "stdlib", "uncached"],
    ids=["filtering-bound-logger", "stdlib-bound-logger", "no-logger-cache"],
)
def test_structlog_emitter_gives_what_keyword_arguments_give(wrapper: str, tmp_path: Path) -> None:
    """The backend hands the fields to structlog as a bound logger's context (no keyword
    copies); the processors receive exactly the event dict ``log.<level>(event, **fields)``
    gives them, in the same key order, for structlog's own bound loggers, the django-structlog
    (stdlib) one, and without logger caching."""
    from conndiag.logbackend import Backend

    seen: list[dict[str, Any]] = []

    def keep(logger: Any, method_name: str, event_dict: dict[str, Any]) -> str:
        seen.append({"method": method_name, **event_dict})
        return "x"

    wrapper_class: Any = (
        structlog.stdlib.BoundLogger
        if wrapper == "stdlib"
        else structlog.make_filtering_bound_logger(logging.DEBUG)
    )
    sink = (tmp_path / "out.log").open("w")
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, keep],
        wrapper_class=wrapper_class,
        logger_factory=structlog.PrintLoggerFactory(sink),
        cache_logger_on_first_use=wrapper != "uncached",
    )
    try:
        fields = {"alias": "default", "duration_s": 0.001, "request_id": None}
        structlog.contextvars.bind_contextvars(request_id="r-1")
        try:
            Backend("conndiag").emit("query", logging.INFO, "conndiag.query", dict(fields))
            Backend("conndiag").emit("query", logging.INFO, "conndiag.query", dict(fields))
            structlog.get_logger("conndiag.query").info("conndiag.query", **fields)
        finally:
            structlog.contextvars.clear_contextvars()
    finally:
        structlog.reset_defaults()
        sink.close()
    assert len(seen) == 3
    assert seen[0] == seen[1] == seen[2]
    assert list(seen[0]) == list(seen[2])
    assert seen[0]["method"] == "info"
    assert seen[0]["request_id"] is None  # the event's own field wins over the context's
