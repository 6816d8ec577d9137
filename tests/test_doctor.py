"""The doctor, ``manage.py conndiag``: settings, server facts, checks, metrics, exit status."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections

from conndiag.management.commands.conndiag import live_picture

pytestmark = pytest.mark.django_db(databases=["default", "mysql"])

HEALTHY_METRICS = """\
# TYPE conndiag_connections_open gauge
conndiag_connections_open{alias="mysql",vendor="mysql"} 3.0
# TYPE conndiag_connections_opened_total counter
conndiag_connections_opened_total{alias="mysql",context="request",vendor="mysql"} 12.0
conndiag_connections_opened_created{alias="mysql",context="request",vendor="mysql"} 1.7e9
# TYPE conndiag_connections_closed_total counter
conndiag_connections_closed_total{alias="mysql",reason="request_end",vendor="mysql"} 9.0
# TYPE conndiag_server_max_connections gauge
conndiag_server_max_connections{alias="mysql",vendor="mysql"} 151.0
# TYPE conndiag_server_wait_timeout_seconds gauge
conndiag_server_wait_timeout_seconds{alias="mysql",vendor="mysql"} 28800.0
# TYPE conndiag_oldest_connection_opened_timestamp_seconds gauge
conndiag_oldest_connection_opened_timestamp_seconds{alias="mysql",vendor="mysql"} 1000.0
# TYPE conndiag_queries_total counter
conndiag_queries_total{action="observed",alias="mysql",context="request",vendor="mysql"} 40.0
"""
SICK_METRICS = (
    HEALTHY_METRICS
    + """\
# TYPE conndiag_connection_errors_total counter
conndiag_connection_errors_total{alias="mysql",code="2006",error_class="gone_away",vendor="mysql"} 2.0
# TYPE conndiag_stale_connections_total counter
conndiag_stale_connections_total{alias="mysql",context="background",replaced="false",vendor="mysql"} 2.0
# TYPE conndiag_connections_closed_total counter
conndiag_connections_closed_total{alias="mysql",reason="abandoned",vendor="mysql"} 5.0
# TYPE conndiag_connection_open_failures_total counter
conndiag_connection_open_failures_total{alias="mysql",error_class="refused",vendor="mysql"} 1.0
# TYPE conndiag_internal_errors_total counter
conndiag_internal_errors_total{component="events"} 1.0
"""
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir", "WEB_CONCURRENCY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def mysql_db() -> Iterator[dict[str, Any]]:
    """The ``mysql`` alias's settings dict, restored afterwards."""
    sd = connections["mysql"].settings_dict
    saved = {key: sd.get(key) for key in ("OPTIONS", "CONN_MAX_AGE", "CONN_HEALTH_CHECKS", "PORT")}
    yield sd
    sd.update(saved)


def doctor(*args: str) -> tuple[int, str]:
    """Run the command; returns (exit status, stdout)."""
    out = StringIO()
    try:
        call_command("conndiag", *args, stdout=out, stderr=StringIO())
    except CommandError as exc:
        return exc.returncode, out.getvalue()
    return 0, out.getvalue()


@pytest.fixture
def metrics_server() -> Iterator[tuple[str, dict[str, Any]]]:
    """A local HTTP server serving ``state["text"]``; records the Authorization header."""
    state: dict[str, Any] = {"text": HEALTHY_METRICS, "auth": None}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["auth"] = self.headers.get("Authorization")
            body = state["text"].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_clean_site_exits_zero_with_the_facts() -> None:
    """A correctly configured site: exit 0; the JSON report carries each alias's settings,
    the server facts and the effective CONNDIAG settings."""
    status, out = doctor("--json")
    assert status == 0, out
    report = json.loads(out)
    assert report["exit_status"] == 0
    assert report["summary"] == {"errors": 0, "warnings": 0}
    mysql = report["databases"]["mysql"]
    assert mysql["settings"]["vendor"] == "mysql"
    assert mysql["settings"]["conn_max_age_state"] == "per_request"
    assert mysql["server"]["wait_timeout_s"] == 28800.0
    assert mysql["server"]["max_connections"] > 0
    assert report["databases"]["default"]["server"] is None
    assert report["conndiag"]["SERVER_FACTS"] == "cached"  # the default
    assert "PASSWORD" not in json.dumps(report)


def test_human_output_names_every_section() -> None:
    """The default output is for people: settings, checks, each database, a summary."""
    status, out = doctor("--database", "mysql")
    assert status == 0
    for text in (
        "conndiag settings",
        "Checks",
        "Database 'mysql' (mysql)",
        "wait_timeout_s=",
        "0 error(s), 0 warning(s)",
    ):
        assert text in out
    assert "Database 'default'" not in out


def test_warnings_exit_one(mysql_db: dict[str, Any]) -> None:
    """A warning (CONN_MAX_AGE >= wait_timeout: conndiag.W005) makes the exit status 1."""
    mysql_db["OPTIONS"] = {**mysql_db["OPTIONS"], "init_command": "SET SESSION wait_timeout=5"}
    mysql_db.update(CONN_MAX_AGE=600, CONN_HEALTH_CHECKS=False)
    status, out = doctor("--json", "--database", "mysql")
    assert status == 1
    report = json.loads(out)
    assert [c["id"] for c in report["databases"]["mysql"]["checks"]] == ["conndiag.W005"]
    assert report["databases"]["mysql"]["settings"]["init_command"].endswith("wait_timeout=5")


def test_static_check_warnings_are_reported(settings: Any) -> None:
    """Static checks (here the missing middleware, conndiag.W001) are part of the report."""
    settings.MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
    status, out = doctor("--json", "--database", "default")
    assert status == 1
    assert [c["id"] for c in json.loads(out)["checks"]] == ["conndiag.W001"]


def test_errors_exit_two(mysql_db: dict[str, Any]) -> None:
    """An unreachable server (conndiag.E003) makes the exit status 2, with the diagnosis."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        mysql_db["PORT"] = str(s.getsockname()[1])
    status, out = doctor("--database", "mysql")
    assert status == 2
    assert "conndiag.E003" in out
    assert "HOST/PORT" in out


def test_unknown_alias_is_refused() -> None:
    """A typo in --database is an error, not an empty report."""
    with pytest.raises(CommandError, match="nope"):
        call_command("conndiag", "--database", "nope", stdout=StringIO())


def test_healthy_metrics_give_the_live_picture(
    metrics_server: tuple[str, dict[str, Any]], settings: Any
) -> None:
    """--metrics-url: the live picture per alias; healthy numbers keep exit 0; the configured
    METRICS_TOKEN is sent as a bearer token."""
    url, state = metrics_server
    settings.CONNDIAG = {"METRICS_TOKEN": "s3cret"}
    status, out = doctor("--json", "--database", "mysql", "--metrics-url", url)
    assert status == 0, out
    metrics = json.loads(out)["metrics"]
    mysql = metrics["aliases"]["mysql"]
    assert mysql["open"]["now"] == 3
    assert mysql["opened"] == {"request": 12}
    assert mysql["closed"] == {"request_end": 9}
    assert mysql["server"] == {"max_connections": 151, "wait_timeout_s": 28800}
    assert metrics["findings"] == []
    assert state["auth"] == "Bearer s3cret"


def test_sick_metrics_are_findings(metrics_server: tuple[str, dict[str, Any]]) -> None:
    """Errors, stale queries, abandoned connections, failed connects and internal errors in
    the metrics are findings, and make the exit status 1."""
    url, state = metrics_server
    state["text"] = SICK_METRICS
    status, out = doctor("--database", "mysql", "--metrics-url", url, "--metrics-token", "t")
    assert status == 1
    for text in (
        "2 connection errors (gone_away/2006: 2)",
        "2 queries ran on stale",
        "5 connections abandoned",
        "1 failed connects",
        "1 failures of conndiag's",
    ):
        assert text in out
    assert state["auth"] == "Bearer t"


def test_unreadable_metrics_exit_two() -> None:
    """A metrics URL nobody answers is an error (exit 2), reported in the output."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    status, out = doctor(
        "--json",
        "--database",
        "default",
        "--metrics-url",
        f"http://127.0.0.1:{port}/metrics",
        "--timeout",
        "1",
    )
    assert status == 2
    assert "error" in json.loads(out)["metrics"]


def test_live_picture_warns_near_max_connections() -> None:
    """Connections open at 80 % or more of max_connections are a finding; ages are computed
    from the exported timestamps."""
    text = HEALTHY_METRICS.replace('vendor="mysql"} 3.0', 'vendor="mysql"} 130.0')
    picture = live_picture(text, now=1060.0)
    assert picture["aliases"]["mysql"]["open"]["oldest_age_s"] == 60.0
    assert picture["findings"] == ["mysql: 130 connections open of max_connections=151"]


def test_effective_config_shows_every_setting_key():
    """The doctor's settings section names every CONNDIAG key (SQL_MAX_LENGTH and
    LOGGER_NAME included), with its effective value, and never the token itself."""
    from django.test import override_settings

    from conndiag import conf
    from conndiag.management.commands.conndiag import effective_config

    with override_settings(
        CONNDIAG={"SQL_MAX_LENGTH": 200, "LOGGER_NAME": "app.db", "METRICS_TOKEN": "s3cret"}
    ):
        shown = effective_config()
    assert set(shown) == set(conf._KEYS)
    assert shown["SQL_MAX_LENGTH"] == 200
    assert shown["LOGGER_NAME"] == "app.db"
    assert shown["METRICS_TOKEN"] == "(set)"
    assert "s3cret" not in json.dumps(shown, default=str)
