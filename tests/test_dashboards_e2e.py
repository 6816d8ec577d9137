"""End to end: a real Prometheus scrapes a real site under load, with the rules loaded.

gunicorn serves ``tests/e2e_site`` (persistent MariaDB connections, conndiag installed, JSON
logs to a file); Debian's ``prometheus`` scrapes its ``/metrics`` every second and evaluates
the generated rule file every second. Load runs the safe view, the broken endpoint (a thread
started from a view does database work: refused as detached) and a forced wait_timeout
expiry (the view shrinks its persistent connection's wait_timeout to 1 s, idles past it and
queries: 2006). Then every dashboard query and every rule expression is evaluated through
Prometheus's HTTP API, the key panels must return data, and the detached-query and
connection-lost alerts must be pending or firing. Every wait is bounded; the whole test takes
about 30 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.conf import settings

from dashboards import checks, generate
from tests.conftest import require_tool

pytestmark = [pytest.mark.slow, pytest.mark.mysql]

ROOT = Path(__file__).resolve().parents[1]
E2E_DB = "conndiag_e2e" + os.environ.get("CONNDIAG_TEST_DB_SUFFIX", "")

#: panels that must return data after the load (title -> refIds that must)
KEY_PANELS = {
    "Queries by context": {"A"},
    "Detached and forked queries caught": {"A"},
    "Connections open": {"A"},
    "Connections opened by context": {"A"},
    "Connection errors by class and code": {"A"},
    "Query duration percentiles": {"A"},
    "Connection idle time at query": {"W"},
    "CONN_MAX_AGE configuration per instance": {"A", "B", "C", "D"},
    "Query policy per context": {"A"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def _wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def _process(args: list[str], log: Path, **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _mysql_url() -> str:
    db = settings.DATABASES["mysql"]
    user = urllib.parse.quote(str(db["USER"]))
    password = urllib.parse.quote(str(db["PASSWORD"]))
    auth = f"{user}:{password}" if password else user
    return f"mysql://{auth}@{db['HOST']}:{db['PORT']}/{E2E_DB}"


def _create_database() -> None:
    import MySQLdb

    db = settings.DATABASES["mysql"]
    conn = MySQLdb.connect(
        host=str(db["HOST"]),
        port=int(db["PORT"]),
        user=str(db["USER"]),
        password=str(db["PASSWORD"]),
    )
    try:
        conn.cursor().execute(f"CREATE DATABASE IF NOT EXISTS {E2E_DB}")
    finally:
        conn.close()


class Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

    def api(self, path: str, **params: str) -> dict[str, Any]:
        query = urllib.parse.urlencode(params)
        status, body = _get(f"{self.base}/api/v1/{path}?{query}", timeout=10)
        data: dict[str, Any] = json.loads(body) if body else {"status": f"http {status}"}
        return data

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=checks.substitute(expr))

    def alert_states(self) -> dict[str, set[str]]:
        states: dict[str, set[str]] = {}
        for alert in self.api("alerts").get("data", {}).get("alerts", []):
            states.setdefault(alert["labels"]["alertname"], set()).add(alert["state"])
        return states


def _load(site: str, stop: threading.Event) -> None:
    """Safe views and the broken endpoint, round after round, until stopped."""
    while not stop.is_set():
        for path in ("work/", "work/", "detached/"):
            _get(f"{site}/{path}", timeout=5)
        stop.wait(0.1)


def _rule_file_for_test(tmp_path: Path) -> Path:
    """The generated rule file, evaluated every second (its groups say every 30 s)."""
    data = checks.rule_file(generate.PROM_RULES)
    for group in data["groups"]:
        group["interval"] = "1s"
    path = tmp_path / "conndiag-rules.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_dashboards_and_alerts_against_real_prometheus(tmp_path: Path) -> None:
    """Every dashboard query and rule expression evaluates without error against a real
    Prometheus scraping a loaded site; key panels return data; the detached-query and
    connection-lost alerts go pending or firing; the fields the Loki rules use appear in the
    JSON log lines the site emitted."""
    prometheus_bin = require_tool("prometheus", "prometheus")
    _create_database()
    site_port, prom_port = _free_port(), _free_port()
    site = f"http://127.0.0.1:{site_port}"
    log_file = tmp_path / "conndiag.jsonl"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.e2e_site.settings",
        "CONNDIAG_TEST_MYSQL_URL": _mysql_url(),
        "CONNDIAG_E2E_DB": E2E_DB,
        "CONNDIAG_E2E_LOG": str(log_file),
        "PYTHONPATH": str(ROOT),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    gunicorn = [
        sys.executable,
        "-m",
        "gunicorn",
        "tests.e2e_site.wsgi:application",
        "--bind",
        f"127.0.0.1:{site_port}",
        "--workers",
        "1",
        "--worker-class",
        "sync",
        "--timeout",
        "30",
    ]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(_rule_file_for_test(tmp_path))],
                "scrape_configs": [
                    {
                        "job_name": "django",
                        "metrics_path": "/metrics",
                        "static_configs": [{"targets": [f"127.0.0.1:{site_port}"]}],
                    }
                ],
            }
        )
    )
    prometheus_cmd = [
        prometheus_bin,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        "--log.level=warn",
    ]

    with (
        _process(gunicorn, tmp_path / "gunicorn.log", cwd=ROOT, env=env) as site_proc,
        _process(prometheus_cmd, tmp_path / "prometheus.log", cwd=tmp_path),
    ):
        _wait_for(
            "the site's /metrics",
            lambda: site_proc.poll() is None and _get(f"{site}/metrics")[0] == 200,
            30,
        )
        prom = Prometheus(f"http://127.0.0.1:{prom_port}")
        _wait_for("Prometheus to be ready", lambda: _get(f"{prom.base}/-/ready")[0] == 200, 30)

        stop = threading.Event()
        loader = threading.Thread(target=_load, args=(site, stop), daemon=True)
        loader.start()
        try:
            # the broken endpoint answers, and its thread was refused as detached
            status, body = _get(f"{site}/detached/")
            assert status == 200
            assert json.loads(body)["thread"] == "refused:detached"
            # force a wait_timeout expiry on the (single) worker's persistent connection
            assert _get(f"{site}/arm/")[0] == 200
            status, body = _get(f"{site}/gone-away/?sleep=2.5", timeout=15)
            assert status == 200
            error = json.loads(body)["error"]
            assert error is not None and ("2006" in error or "2013" in error), error

            _wait_for(
                "the gone-away error in Prometheus",
                lambda: (
                    prom.query('conndiag_connection_errors_total{error_class=~"gone_away|lost"}')
                    .get("data", {})
                    .get("result")
                ),
                15,
            )
            _wait_for(
                "rate data",
                lambda: (
                    prom.query("sum(rate(conndiag_queries_total[1m])) > 0")
                    .get("data", {})
                    .get("result")
                ),
                15,
            )
            alerts = _wait_for(
                "ConnDiagDetachedQueries and ConnDiagConnectionLost to be pending or firing",
                lambda: (
                    lambda s: (
                        s
                        if {"ConnDiagDetachedQueries", "ConnDiagConnectionLost"}
                        <= {n for n, st in s.items() if st & {"pending", "firing"}}
                        else None
                    )
                )(prom.alert_states()),
                20,
            )
        finally:
            stop.set()
            loader.join(10)

        # every dashboard query and every rule expression evaluates without error
        failures = []
        results: dict[str, dict[str, list[Any]]] = {}
        for name, dash in checks.dashboards().items():
            if checks.datasource_kind(dash) != "prometheus":
                continue
            for panel in checks.panels(dash):
                for target in panel["targets"]:
                    answer = prom.query(target["expr"])
                    if answer.get("status") != "success":
                        failures.append(f"{name}: {panel['title']}: {answer}")
                        continue
                    results.setdefault(panel["title"], {})[target["refId"]] = answer["data"][
                        "result"
                    ]
        for where, expr in checks.rule_exprs(generate.PROM_RULES):
            answer = prom.query(expr)
            if answer.get("status") != "success":
                failures.append(f"rule {where}: {answer}")
        assert failures == []

        empty = [
            f"{title} [{ref}]"
            for title, refs in KEY_PANELS.items()
            for ref in refs
            if not results[title][ref]
        ]
        assert empty == []
        contexts = {r["metric"].get("context") for r in results["Queries by context"]["A"]}
        assert "detached" in contexts
        caught = results["Detached and forked queries caught"]["A"]
        assert {(r["metric"]["context"], r["metric"]["action"]) for r in caught} >= {
            ("detached", "raised")
        }
        errors = results["Connection errors by class and code"]["A"]
        assert {r["metric"]["error_class"] for r in errors} & {"gone_away", "lost"}
        assert alerts["ConnDiagDetachedQueries"] & {"pending", "firing"}

    # the JSON lines carry the fields the Loki rules filter and group on
    lines = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    keys_by_event: dict[str, set[str]] = {}
    for line in lines:
        keys_by_event.setdefault(line["event"], set()).update(line)
    assert {"conndiag.query.refused", "conndiag.query.failed", "conndiag.connection.opened"} <= set(
        keys_by_event
    )
    node = require_tool("node", "nodejs")
    checks.ensure_logql_parser()
    loki_exprs = [expr for _, expr in checks.rule_exprs(generate.LOKI_RULES)]
    stream_labels = set(generate.load_config()["loki"]["stream_labels"])
    checked = 0
    for parsed in checks.logql_check(loki_exprs, node):
        emitted = [
            keys_by_event[e] for e in checks.logql_event_names(parsed["expr"]) if e in keys_by_event
        ]
        if not emitted:
            continue
        keys = set().union(*emitted)
        fields = {i["name"] for i in parsed["identifiers"] if not i["stream"]}
        fields -= stream_labels | {"__error__"}
        assert fields <= keys, f"{parsed['expr']}: {fields - keys} not in the log lines"
        checked += 1
    assert checked >= 4
