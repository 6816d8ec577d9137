"""Smoke tests of the demo site: the real thing, under gunicorn (and uvicorn), on SQLite and
MariaDB, driven in subprocesses with the demo's own settings (``demo.settings``).

They read what conndiag logged (the site's JSON log file) and exported (``/metrics``), and
check that the demo stops cleanly. The fast tests at the end cover the load generator's
argument checks without starting anything.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from tests.conftest import require_tool, unavailable

REPO = Path(__file__).resolve().parent.parent
SITE = REPO / "demo_site"


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


runner = _load("conndiag_demo_runner", SITE / "demo" / "runner.py")
loadgen = _load("conndiag_demo_loadgen", SITE / "jobs" / "loadgen.py")

OPS = (
    "/ops/trigger-job",
    "/ops/trigger-job-in-thread",
    "/ops/trigger-job-in-pool",
    "/ops/trigger-job-background",
)


def _mysql_url(name: str) -> str:
    db = settings.DATABASES["mysql"]
    auth = str(db["USER"]) + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"mysql://{auth}@{db['HOST']}:{db['PORT']}/{name}"


def _wait_for(predicate: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return bool(predicate())


def _named(events: list[dict[str, Any]], name: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
    ]


class Run:
    """A demo that served one round of every endpoint: its log events and its /metrics."""

    def __init__(self, demo: Any, responses: dict[str, tuple[int, str]]) -> None:
        self.demo = demo
        self.responses = responses
        self.events: list[dict[str, Any]] = []
        self.metrics = ""
        self.metrics_status = 0

    def refresh(self) -> None:
        self.events = self.demo.events()
        self.metrics_status, self.metrics = self.demo.get("/metrics")


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)],
)
def demo_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Run]:
    """The demo under gunicorn (2 workers x 4 threads), after one request to every endpoint."""
    from tests.conftest import mysql_unavailable_reason

    database_url = None
    if request.param == "mysql":
        reason = mysql_unavailable_reason()
        if reason is not None:
            unavailable(reason)
        database_url = _mysql_url(f"conndiag_demo_test{os.getpid()}")
    var = tmp_path_factory.mktemp(f"demo-{request.param}")
    demo = runner.Demo(
        python=sys.executable,
        database_url=database_url,
        var_dir=var,
        workers=2,
        threads=4,
        server_output=var / "gunicorn.log",
    )
    try:
        with demo:
            demo.prepare()
            demo.start(ready_timeout=30)
            responses = {}
            for path in OPS:
                responses[path] = demo.get(path, method="POST")
            responses["GET /ops/trigger-job"] = demo.get("/ops/trigger-job")
            responses["/async/jobs"] = demo.get("/async/jobs")
            run = Run(demo, responses)
            # The threads answer after the response: wait until all three have logged.
            assert _wait_for(
                lambda: (
                    len(_named(demo.events(), "jobs.job.lost")) >= 2
                    and _named(demo.events(), "jobs.job.done", runner="background")
                )
            ), "the threads of the broken and background endpoints did not log in time"
            run.responses["/jobs/"] = demo.get("/jobs/")

            # Other workers' numbers reach /metrics within conndiag's flush interval (1 s).
            def counted() -> bool:
                run.refresh()
                if run.metrics_status != 200:
                    return False
                samples = runner.parse_metrics(run.metrics)
                minimum = {"detached": 2, "request": 8, "background": 4}  # what tests assert
                return all(
                    runner.metric_sum(samples, "conndiag_queries_total", context=context) >= n
                    for context, n in minimum.items()
                )

            _wait_for(counted, 10)
            yield run
    finally:
        if database_url is not None:
            runner.drop_mysql_database(database_url)


@pytest.mark.slow
def test_every_endpoint_answers_success(demo_run: Run) -> None:
    """Every ops endpoint says "Task run success", the broken ones included (that is the bug)."""
    for path in OPS:
        assert demo_run.responses[path] == (200, "Task run success"), path
    assert demo_run.responses["GET /ops/trigger-job"] == (200, "Task run success")
    status, body = demo_run.responses["/async/jobs"]
    assert status == 200
    assert '"status": "done"' in body


@pytest.mark.slow
def test_job_list_shows_only_the_jobs_that_ran(demo_run: Run) -> None:
    """/jobs/ lists the sync, background and async jobs, none from the broken thread or pool."""
    status, body = demo_run.responses["/jobs/"]
    assert status == 200
    runners = re.findall(r"<td>(sync|thread|pool|background|async)</td>", body)
    assert sorted(set(runners)) == ["async", "background", "sync"]
    assert runners.count("sync") == 2


@pytest.mark.slow
def test_thread_endpoint_query_refused_as_detached(demo_run: Run) -> None:
    """The original report's thread: its first query is refused, as detached, naming the request."""
    refused = _named(
        demo_run.events, "conndiag.query.refused", request_path="/ops/trigger-job-in-thread"
    )
    assert len(refused) == 1
    event = refused[0]
    assert event["context"] == "detached"
    assert event["action"] == "raised"
    assert event["thread_name"] == "jobs-thread"
    assert event["request_method"] == "POST"
    assert event["level"] == "error"
    assert "conndiag.background_db_work()" in event["message"]
    lost = _named(demo_run.events, "jobs.job.lost", runner="thread")
    assert len(lost) == 1
    assert lost[0]["error"] == "DetachedQueryError"
    assert lost[0]["origin_request_id"] == event["request_id"]


@pytest.mark.slow
def test_pool_endpoint_query_refused_as_detached(demo_run: Run) -> None:
    """A task submitted to a ThreadPoolExecutor from a view is detached too."""
    refused = _named(
        demo_run.events, "conndiag.query.refused", request_path="/ops/trigger-job-in-pool"
    )
    assert len(refused) == 1
    assert refused[0]["context"] == "detached"
    assert refused[0]["thread_name"].startswith("jobs-pool")


@pytest.mark.slow
def test_sync_endpoint_queries_are_request_context(demo_run: Run) -> None:
    """The safe pattern: every query of /ops/trigger-job is logged as request, none refused."""
    queries = _named(demo_run.events, "conndiag.query", request_path="/ops/trigger-job")
    # create + 2 updates + read back, for each of the two requests (POST and GET)
    assert len(queries) >= 8
    assert {q["context"] for q in queries} == {"request"}
    assert {q["outcome"] for q in queries} == {"ok"}
    assert {q["action"] for q in queries} == {"observed"}
    assert all(q["request_id"] and q["thread_name"] for q in queries)
    problems = [
        e
        for e in demo_run.events
        if e.get("request_path") == "/ops/trigger-job"
        and e.get("event")
        in ("conndiag.query.refused", "conndiag.query.flagged", "conndiag.query.failed")
    ]
    assert problems == []


@pytest.mark.slow
def test_background_endpoint_allowed_and_connection_closed(demo_run: Run) -> None:
    """background_db_work(): the thread's queries are background and allowed, its connection
    closed on the way out."""
    done = _named(demo_run.events, "jobs.job.done", runner="background")
    assert len(done) == 1
    queries = [
        e
        for e in _named(demo_run.events, "conndiag.query")
        if e.get("thread_name") == "jobs-background"
    ]
    assert len(queries) >= 4
    assert {q["context"] for q in queries} == {"background"}
    assert all(q["allowed"] for q in queries)
    closed = [
        e
        for e in _named(demo_run.events, "conndiag.connection.closed", reason="background_work")
        if e.get("connection_thread") == "jobs-background"
    ]
    assert len(closed) == 1


@pytest.mark.slow
def test_async_view_under_wsgi_has_no_false_alarm(demo_run: Run) -> None:
    """The async ORM view, served by gunicorn: its queries are request context, nothing flagged."""
    events = [e for e in demo_run.events if e.get("request_path") == "/async/jobs"]
    queries = _named(events, "conndiag.query")
    assert len(queries) >= 3  # acreate, aget, acount
    assert {q["context"] for q in queries} == {"request"}
    assert [e for e in events if e["event"].startswith("conndiag.query.")] == []


@pytest.mark.slow
def test_log_lines_are_structured(demo_run: Run) -> None:
    """Every log line is JSON with an ISO timestamp, level, logger, pid and a request_id key."""
    assert demo_run.events
    for event in demo_run.events:
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", event["timestamp"]), event
        assert event["level"] in ("debug", "info", "warning", "error", "critical"), event
        assert event["logger"], event
        assert isinstance(event["pid"], int), event
        assert "request_id" in event, event
    # the site's own lines carry the request id that conndiag's middleware bound
    sync_done = _named(demo_run.events, "jobs.job.done", runner="sync")
    assert sync_done
    assert all(e["request_id"] for e in sync_done)
    assert {e["pid"] for e in _named(demo_run.events, "conndiag.query")} <= {
        e["pid"] for e in demo_run.events
    }


@pytest.mark.slow
def test_metrics_count_detached_queries(demo_run: Run) -> None:
    """/metrics (merged from every gunicorn worker) counts the refused detached queries."""
    assert demo_run.metrics_status == 200, demo_run.metrics[:500]
    samples = runner.parse_metrics(demo_run.metrics)
    raised = runner.metric_sum(
        samples, "conndiag_queries_total", context="detached", action="raised"
    )
    assert raised >= 2
    assert runner.metric_sum(samples, "conndiag_queries_total", context="request") >= 8
    assert runner.metric_sum(samples, "conndiag_queries_total", context="background") >= 4


@pytest.mark.slow
def test_load_command_drives_every_endpoint(demo_run: Run) -> None:
    """``manage.py load`` sends the requested burst, round-robin, and prints the summary."""
    out = demo_run.demo.load(requests=24, concurrency=4, timeout=30, progress=False)
    assert "requests: 24 " in out
    assert "errors:   0" in out
    assert re.search(r"p50 .* ms, p90 .* ms, p99 .* ms", out), out
    for method, path in loadgen.ENDPOINTS:
        assert re.search(rf"{re.escape(method)} {re.escape(path)}\s+4\b", out), out


@pytest.mark.slow
def test_runner_summary_reports_what_conndiag_saw(demo_run: Run) -> None:
    """The summary the demo command prints: queries by context, refusals, one example."""
    assert _wait_for(lambda: len(_named(demo_run.demo.events(), "jobs.job.lost")) >= 2)
    summary = demo_run.demo.summary()
    text = summary.render()
    assert summary.metrics_error is None
    assert summary.detached_raised >= 2
    assert summary.refused_events >= 2
    assert summary.refused_example is not None
    assert summary.refused_example["context"] == "detached"
    assert "detached queries caught" in text
    assert "Fix:" in text


@pytest.mark.slow
def test_async_view_under_uvicorn_has_no_false_alarm(tmp_path: Path) -> None:
    """Served by uvicorn (ASGI), the async and sync endpoints run as request, nothing refused."""
    demo = runner.Demo(python=sys.executable, var_dir=tmp_path)
    demo.prepare()
    with (tmp_path / "uvicorn.log").open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "demo.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(demo.port),
                "--no-access-log",
            ],
            env=demo.env(),
            cwd=str(SITE),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            demo.process = proc
            demo.wait_ready(30)
            demo.process = None
            assert demo.get("/async/jobs")[0] == 200
            assert demo.get("/async/jobs")[0] == 200
            assert demo.get("/ops/trigger-job", method="POST") == (200, "Task run success")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
    events = runner.read_log(demo.log_file)
    queries = [
        e
        for e in _named(events, "conndiag.query")
        if e.get("request_path") in ("/async/jobs", "/ops/trigger-job")
    ]
    assert len(queries) >= 2 * 3 + 4
    assert {q["context"] for q in queries} == {"request"}
    assert [e for e in events if str(e.get("event")).startswith("conndiag.query.")] == []


@pytest.mark.slow
@pytest.mark.mysql
def test_pool_thread_gone_away_on_mysql_when_only_logged(tmp_path: Path) -> None:
    """With the policy at "log", the pool's thread reuses its connection after it idled past
    wait_timeout and fails with "gone away" (the original report); conndiag says why."""
    from tests.conftest import mysql_unavailable_reason

    reason = mysql_unavailable_reason()
    if reason is not None:
        unavailable(reason)
    database_url = _mysql_url(f"conndiag_demo_gone{os.getpid()}")
    demo = runner.Demo(
        python=sys.executable,
        database_url=database_url,
        var_dir=tmp_path,
        workers=1,
        threads=2,
        extra_env={"DEMO_DETACHED_POLICY": "log", "DEMO_MYSQL_WAIT_TIMEOUT": "1"},
    )
    try:
        with demo:
            demo.prepare()
            demo.start(ready_timeout=30)
            assert demo.get("/ops/trigger-job-in-pool", method="POST")[0] == 200
            assert _wait_for(lambda: _named(demo.events(), "jobs.job.done", runner="pool"))
            time.sleep(2.5)  # the pool thread's connection idles past wait_timeout (1 s)
            assert demo.get("/ops/trigger-job-in-pool", method="POST")[0] == 200
            assert _wait_for(lambda: _named(demo.events(), "jobs.job.failed", runner="pool"))
            events = demo.events()
    finally:
        runner.drop_mysql_database(database_url)
    failed = _named(events, "conndiag.query.failed", error_class="gone_away")
    assert failed
    assert failed[0]["thread_name"].startswith("jobs-pool")
    assert "wait_timeout" in failed[0]["cause"]
    stale = _named(events, "conndiag.connection.stale")
    assert stale
    assert stale[0]["connection_idle_s"] > stale[0]["wait_timeout_s"] == 1
    assert _named(events, "conndiag.query.flagged", context="detached")


def _demo_processes(port: int) -> list[int]:
    """Pids of live processes whose environment says they serve the demo on ``port``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        if "State:\tZ" in status:
            continue
        if f"DEMO_PORT={port}".encode() in environ:
            pids.append(int(entry.name))
    return pids


def _runner_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.pop("DATABASE_URL", None)
    env.update(DEMO_VAR_DIR=str(tmp_path / "var"), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return env


def _run_once(tmp_path: Path, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``runner.py [args] --once`` with 2 workers and a burst of 24 requests on ``port``."""
    return subprocess.run(
        [
            sys.executable,
            str(SITE / "demo" / "runner.py"),
            *args,
            "--once",
            "--port",
            str(port),
            "--workers",
            "2",
            "--requests",
            "24",
        ],
        env=_runner_env(tmp_path),
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.mark.slow
def test_demo_once_cleans_up(tmp_path: Path) -> None:
    """``--once`` prints the summary and exits; no process and no metrics dir are left behind."""
    port = runner.free_port()
    proc = _run_once(tmp_path, port)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"http://127.0.0.1:{port}/metrics" in proc.stdout
    assert "conndiag.query.refused in the log:" in proc.stdout
    assert "detached queries caught" in proc.stdout
    assert str(tmp_path / "var" / "demo.log") in proc.stdout
    # The connection inspector: its page, its command, and the export endpoint's leak flagged.
    assert f"http://127.0.0.1:{port}/conndiag/connections" in proc.stdout
    assert "manage.py conndiag connections" in proc.stdout
    table = proc.stdout[proc.stdout.index("Every worker's connections") :]
    assert "opened in GET /ops/export-report" in table, table
    assert "past_max_age" in table, table
    assert _demo_processes(port) == []
    assert list((tmp_path / "tmp").glob("conndiag-demo-prom-*")) == []
    assert not runner.port_in_use(port)


@pytest.mark.slow
def test_demo_uwsgi_behind_nginx_once(tmp_path: Path) -> None:
    """``--server uwsgi --once``: uWSGI (master, 2 lazy-apps workers) behind Nginx over the
    uwsgi protocol serves the burst; the printed summary (from /metrics, merged over the
    workers) agrees with the log's refusals; every process and temporary directory is gone."""
    require_tool("nginx", "nginx")
    port = runner.free_port()
    proc = _run_once(tmp_path, port, "--server", "uwsgi")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "starting uWSGI (2 processes x 4 threads, master, lazy-apps) behind Nginx" in out
    assert "errors:   0" in out, out
    uwsgi_log = (tmp_path / "var" / "uwsgi.log").read_text()
    assert "spawned uWSGI worker 2" in uwsgi_log, uwsgi_log
    assert "goodbye to uWSGI" in uwsgi_log, uwsgi_log  # stopped by SIGTERM (die-on-term)
    caught = re.search(r"detached queries caught:\s+(\d+)", out)
    refused = re.search(
        r"conndiag\.query\.refused in the log: (\d+) \(jobs lost by the broken endpoints: (\d+)\)",
        out,
    )
    assert caught and refused, out
    events = runner.read_log(tmp_path / "var" / "demo.log")
    in_log = len(_named(events, "conndiag.query.refused"))
    # 24 requests round-robin over 6 endpoints: 4 to each of the two broken ones
    assert int(caught.group(1)) == int(refused.group(1)) == in_log >= 8, out
    assert int(refused.group(2)) == len(_named(events, "jobs.job.lost")) == in_log
    table = out[out.index("Every worker's connections") :]
    assert "2 live process(es)" in table, table  # both uWSGI workers publish
    assert "opened in GET /ops/export-report" in table, table
    assert "past_max_age" in table, table
    assert _demo_processes(port) == []
    assert list((tmp_path / "tmp").glob("conndiag-demo-*")) == []
    assert not runner.port_in_use(port)


@pytest.mark.slow
def test_demo_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    """Serving mode stops on SIGINT (Ctrl-C): exit 0, gunicorn's workers gone, temp dir removed."""
    port = runner.free_port()
    out_path = tmp_path / "out.txt"
    with out_path.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(SITE / "demo" / "runner.py"),
                "--port",
                str(port),
                "--workers",
                "2",
                "--requests",
                "12",
            ],
            env=_runner_env(tmp_path),
            cwd=str(REPO),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            assert _wait_for(lambda: "Serving until interrupted" in out_path.read_text(), 120), (
                out_path.read_text()
            )
            assert len(_demo_processes(port)) >= 3  # gunicorn master and 2 workers
            assert list((tmp_path / "tmp").glob("conndiag-demo-prom-*"))
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0, out_path.read_text()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
    assert _wait_for(lambda: _demo_processes(port) == [], 5), _demo_processes(port)
    assert list((tmp_path / "tmp").glob("conndiag-demo-prom-*")) == []
    assert not runner.port_in_use(port)


# -- the load generator's argument checks (fast: nothing is started) ----------------------


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000", "http://localhost:8000/", "http://[::1]:8000", "http://127.1.2.3"],
)
def test_load_accepts_loopback_urls(url: str) -> None:
    """Loopback addresses (and localhost) are accepted; a trailing slash is dropped."""
    assert loadgen.check_url(url) == url.rstrip("/")


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com",
        "http://10.0.0.5:8000",
        "ftp://127.0.0.1",
        "127.0.0.1:8000",
        "http://localhost.example.com",
    ],
)
def test_load_refuses_other_urls(url: str) -> None:
    """Anything but http(s) on a loopback host is refused with a message naming the URL."""
    with pytest.raises(loadgen.LoadError, match=re.escape(repr(url))):
        loadgen.check_url(url)


def test_load_bounds_are_enforced() -> None:
    """The request count, concurrency and timeout are bounded before anything is sent."""
    for kwargs in (
        {"requests": 0},
        {"requests": 10**6},
        {"concurrency": 0},
        {"concurrency": 1000},
        {"timeout": 0},
    ):
        args = {"requests": 1, "concurrency": 1, "timeout": 1.0, **kwargs}
        with pytest.raises(loadgen.LoadError):
            loadgen.run("http://127.0.0.1:9", progress=None, **args)


def test_load_parses_endpoints() -> None:
    """Bare paths take the known endpoint's method; 'POST /x' is explicit; bad items refused."""
    assert loadgen.parse_endpoints(None) == list(loadgen.ENDPOINTS)
    assert loadgen.parse_endpoints(["/jobs/,/ops/trigger-job", "POST /x"]) == [
        ("GET", "/jobs/"),
        ("POST", "/ops/trigger-job"),
        ("POST", "/x"),
    ]
    with pytest.raises(loadgen.LoadError):
        loadgen.parse_endpoints(["DELETE /jobs/"])
    with pytest.raises(loadgen.LoadError):
        loadgen.parse_endpoints(["jobs"])


def test_load_percentiles() -> None:
    """Latency percentiles use the nearest rank, and an empty run has none."""
    result = loadgen.Result(latencies=[i / 100 for i in range(1, 101)])
    assert result.percentile(50) == 0.5
    assert result.percentile(90) == 0.9
    assert result.percentile(99) == 0.99
    assert loadgen.Result().percentile(50) is None


def test_load_command_refuses_remote_url() -> None:
    """``manage.py load --url`` to a remote host exits non-zero with a clear error."""
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.update(DEMO_LOG_FILE="", DEMO_LOG_STDOUT="0", DATABASE_URL="sqlite:///:memory:")
    proc = subprocess.run(
        [sys.executable, str(SITE / "manage.py"), "load", "--url", "http://example.com"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "only drives loopback addresses" in proc.stderr
