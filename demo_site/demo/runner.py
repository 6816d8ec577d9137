"""Run the demo: migrate, serve under gunicorn (several workers x threads, multi-process
metrics), drive a burst of traffic, summarize what conndiag saw, serve until interrupted.

``scripts/demo`` prepares a virtualenv and then runs ``python demo_site/demo/runner.py``; the
smoke tests (``tests/test_demo.py``) use :class:`Demo` directly. This module imports neither
Django nor the site: it drives them in subprocesses, with the interpreter it is given.

Stopping is clean: gunicorn runs in its own process group, which is sent SIGTERM (then
SIGKILL after a grace period), and the ``PROMETHEUS_MULTIPROC_DIR`` is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

SITE_DIR = Path(__file__).resolve().parent.parent  # demo_site/
REPO_DIR = SITE_DIR.parent
sys.path.insert(0, str(SITE_DIR))

from demo import dburl  # noqa: E402

DEFAULT_MYSQL_URL = "mysql://root@127.0.0.1:3306/conndiag_demo"
REFUSED = "conndiag.query.refused"
FLAGGED = "conndiag.query.flagged"


class DemoError(RuntimeError):
    """The demo could not start or run; the message says what to look at."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (TIME_WAIT leftovers do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _mysql_server(url: str) -> tuple[Any, str]:
    """A connection to the server of ``url`` (no database selected) and the quoted name."""
    import MySQLdb  # only in MySQL mode: SQLite needs no driver

    db = dburl.database_from_url(url)
    conn = MySQLdb.connect(
        host=str(db["HOST"]),
        port=int(str(db["PORT"])),
        user=str(db["USER"]),
        passwd=str(db["PASSWORD"]),
        charset="utf8mb4",
    )
    return conn, str(db["NAME"]).replace("`", "``")


def create_mysql_database(url: str) -> None:
    """``CREATE DATABASE IF NOT EXISTS`` for the database named in ``url``."""
    conn, name = _mysql_server(url)
    try:
        conn.cursor().execute(f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4")
    finally:
        conn.close()


def drop_mysql_database(url: str) -> None:
    conn, name = _mysql_server(url)
    try:
        conn.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()


# -- reading what conndiag saw -------------------------------------------------------------


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """``(sample name, labels, value)`` for every sample of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def metric_sum(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(
        value
        for sname, slabels, value in samples
        if sname == name and all(slabels.get(k) == v for k, v in labels.items())
    )


def metric_by(
    samples: list[tuple[str, dict[str, str], float]], name: str, label: str
) -> dict[str, float]:
    totals: Counter[str] = Counter()
    for sname, slabels, value in samples:
        if sname == name:
            totals[slabels.get(label, "")] += value  # type: ignore[assignment]
    return dict(totals)


def read_log(path: Path, offset: int = 0) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` from byte ``offset`` on (other lines are skipped)."""
    events = []
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return []
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


@dataclass
class Summary:
    queries_by_context: dict[str, float] = field(default_factory=dict)
    detached_raised: float = 0.0
    connections_opened: float = 0.0
    connections_closed: dict[str, float] = field(default_factory=dict)
    refused_events: int = 0
    refused_example: dict[str, Any] | None = None
    events_by_name: dict[str, int] = field(default_factory=dict)
    jobs_lost: int = 0
    metrics_error: str | None = None

    def render(self) -> str:
        lines = ["What conndiag saw:"]
        if self.metrics_error:
            lines.append(f"  /metrics: not available ({self.metrics_error})")
        else:
            by_ctx = ", ".join(f"{k} {int(v)}" for k, v in sorted(self.queries_by_context.items()))
            lines.append(f"  queries by context (metrics):   {by_ctx or 'none yet'}")
            closed = ", ".join(f"{k} {int(v)}" for k, v in sorted(self.connections_closed.items()))
            lines.append(
                f"  connections (metrics):         opened {int(self.connections_opened)}, "
                f"closed {int(sum(self.connections_closed.values()))}"
                + (f" ({closed})" if closed else "")
            )
            lines.append(f"  detached queries caught:       {int(self.detached_raised)}")
        flagged = self.events_by_name.get(FLAGGED, 0)
        if flagged:
            lines.append(f"  {FLAGGED} in the log: {flagged}")
        lines.append(
            f"  {REFUSED} in the log: {self.refused_events} "
            f"(jobs lost by the broken endpoints: {self.jobs_lost})"
        )
        if self.refused_example is not None:
            ex = self.refused_example
            lines.append(
                f"  example: context={ex.get('context')} thread={ex.get('thread_name')} "
                f"request={ex.get('request_method')} {ex.get('request_path')} "
                f"request_id={ex.get('request_id')}"
            )
            message = str(ex.get("message", ""))
            lines.append("  message: " + message)
        return "\n".join(lines)


def summarize(
    metrics_text: str | None, events: list[dict[str, Any]], metrics_error: str | None = None
) -> Summary:
    summary = Summary(metrics_error=metrics_error)
    if metrics_text is not None:
        samples = parse_metrics(metrics_text)
        summary.queries_by_context = metric_by(samples, "conndiag_queries_total", "context")
        summary.detached_raised = metric_sum(
            samples, "conndiag_queries_total", context="detached", action="raised"
        )
        summary.connections_opened = metric_sum(samples, "conndiag_connections_opened_total")
        summary.connections_closed = metric_by(
            samples, "conndiag_connections_closed_total", "reason"
        )
    names: Counter[str] = Counter()
    for event in events:
        name = str(event.get("event", ""))
        names[name] += 1
        if name == REFUSED and summary.refused_example is None:
            summary.refused_example = event
        if name == "jobs.job.lost":
            summary.jobs_lost += 1
    summary.refused_events = names[REFUSED]
    summary.events_by_name = dict(names)
    return summary


# -- the demo ------------------------------------------------------------------------------


class Demo:
    """One run of the demo site under gunicorn. Use as a context manager: it always stops."""

    def __init__(
        self,
        *,
        python: str = sys.executable,
        port: int | None = None,
        database_url: str | None = None,
        var_dir: Path | None = None,
        log_file: Path | None = None,
        workers: int = 3,
        threads: int = 4,
        server_output: IO[Any] | Path | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.python = python
        self.port = port if port is not None else free_port()
        self.database_url = database_url or None
        self.var_dir = var_dir or SITE_DIR / "var"
        self.log_file = log_file or self.var_dir / "demo.log"
        self.workers = workers
        self.threads = threads
        self.server_output = (
            server_output if server_output is not None else (self.var_dir / "gunicorn.log")
        )
        self.extra_env = extra_env or {}
        self.url = f"http://127.0.0.1:{self.port}"
        self.multiproc_dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.log_offset = 0
        self._output_file: IO[Any] | None = None

    # -- environment -----------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("DJANGO_SETTINGS_MODULE", None)  # the site's own settings, never the tests'
        env.update(
            DJANGO_SETTINGS_MODULE="demo.settings",
            PYTHONPATH=os.pathsep.join([str(SITE_DIR), env.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            ),
            DEMO_VAR_DIR=str(self.var_dir),
            DEMO_LOG_FILE=str(self.log_file),
            DEMO_LOG_STDOUT=env.get("DEMO_LOG_STDOUT", "0"),
            DEMO_PORT=str(self.port),
            DEMO_WORKERS=str(self.workers),
            DEMO_THREADS=str(self.threads),
            PYTHONUNBUFFERED="1",
        )
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        else:
            env.pop("DATABASE_URL", None)
        if self.multiproc_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self.multiproc_dir)
        else:
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(self.extra_env)
        return env

    def manage(
        self,
        *args: str,
        timeout: float = 120,
        capture: bool = False,
        check: bool = True,
        stderr: int | None = None,
    ) -> str:
        """Run ``manage.py`` with the demo's environment; raise :class:`DemoError` on failure
        (with ``check``)."""
        proc = subprocess.run(
            [self.python, str(SITE_DIR / "manage.py"), *args],
            env=self.env(),
            cwd=str(REPO_DIR),
            timeout=timeout,
            stdout=subprocess.PIPE if capture else None,
            stderr=stderr,
            text=True,
            check=False,
        )
        if check and proc.returncode != 0:
            msg = f"manage.py {' '.join(args)} failed with exit status {proc.returncode}"
            raise DemoError(msg)
        return proc.stdout or ""

    def connections_command(self) -> str:
        """The command that lists every worker's connections (for the operator to copy)."""
        env = f"DJANGO_SETTINGS_MODULE=demo.settings PYTHONPATH={SITE_DIR}"
        if self.multiproc_dir is not None:
            env += f" PROMETHEUS_MULTIPROC_DIR={self.multiproc_dir}"
        if self.database_url:
            env += f" DATABASE_URL={self.database_url}"
        return f"{env} {self.python} {SITE_DIR / 'manage.py'} conndiag connections"

    def connections(self) -> str:
        """``manage.py conndiag connections`` (exit status 1 when something is flagged)."""
        return self.manage(
            "conndiag", "connections", capture=True, check=False, stderr=subprocess.STDOUT
        )

    # -- lifecycle -------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the database (MySQL) and migrate."""
        self.var_dir.mkdir(parents=True, exist_ok=True)
        if dburl.is_mysql(self.database_url):
            try:
                create_mysql_database(str(self.database_url))
            except Exception as exc:
                msg = f"cannot create the MySQL database of {self.database_url}: {exc}"
                raise DemoError(msg) from exc
        self.manage("migrate", "--no-input", "-v", "0")

    def start(self, ready_timeout: float = 30.0) -> None:
        """Start gunicorn in its own process group and wait until it answers."""
        if port_in_use(self.port):
            msg = f"port {self.port} on 127.0.0.1 is in use: set DEMO_PORT to a free port"
            raise DemoError(msg)
        self.multiproc_dir = Path(tempfile.mkdtemp(prefix="conndiag-demo-prom-"))
        self.log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        if isinstance(self.server_output, Path):
            self._output_file = self.server_output.open("ab")
            output: Any = self._output_file
        else:
            output = self.server_output
        self.process = subprocess.Popen(
            [self.python, "-m", "gunicorn", "-c", str(SITE_DIR / "demo" / "gunicorn_conf.py")],
            env=self.env(),
            cwd=str(SITE_DIR),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() signals all of it
        )
        self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                msg = (
                    f"gunicorn exited with status {self.process.returncode} before answering; "
                    f"see {self.server_output}"
                )
                raise DemoError(msg)
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        msg = (
            f"gunicorn did not answer on {self.url} within {timeout:.0f} s; "
            f"see {self.server_output}"
        )
        raise DemoError(msg)

    def load(
        self,
        requests: int = 60,
        concurrency: int = 6,
        timeout: float = 60,
        endpoints: list[str] | None = None,
        progress: bool = True,
    ) -> str:
        args = [
            "load",
            "--url",
            self.url,
            "--requests",
            str(requests),
            "--concurrency",
            str(concurrency),
            "--timeout",
            str(timeout),
        ]
        if endpoints:
            args += ["--endpoints", *endpoints]
        if not progress:
            args.append("--no-progress")
        return self.manage(*args, timeout=timeout + 30, capture=True)

    def get(self, path: str, method: str = "GET", timeout: float = 10) -> tuple[int, str]:
        data = b"{}" if method == "POST" else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return int(resp.status), resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode("utf-8", "replace")

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written since :meth:`start`."""
        return read_log(self.log_file, self.log_offset)

    def summary(self) -> Summary:
        metrics_text = None
        error = None
        try:
            status, body = self.get("/metrics")
            if status == 200:
                metrics_text = body
            else:
                error = f"HTTP {status}"
        except (urllib.error.URLError, OSError) as exc:
            error = str(exc)
        return summarize(metrics_text, self.events(), error)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM gunicorn's process group, SIGKILL it after ``grace``, remove the temp dir."""
        proc = self.process
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
            # Workers left behind by a master that died get the same treatment.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            self.process = None
        if self._output_file is not None:
            self._output_file.close()
            self._output_file = None
        if self.multiproc_dir is not None:
            shutil.rmtree(self.multiproc_dir, ignore_errors=True)
            self.multiproc_dir = None

    def __enter__(self) -> Demo:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- command line --------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _on_signal(signum: int, frame: object) -> None:
    # One signal is enough: ignore the next ones so they cannot interrupt the clean-up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mysql",
        action="store_true",
        help=f"use MySQL/MariaDB (DATABASE_URL, default {DEFAULT_MYSQL_URL})",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="exit after the summary instead of serving (also DEMO_NO_SERVE=1)",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "8000")))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("DEMO_WORKERS", "3")))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("DEMO_THREADS", "4")))
    parser.add_argument("--requests", type=int, default=120, help="size of the traffic burst")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--follow",
        action="store_true",
        help="print the server's output (and log lines) on this terminal",
    )
    args = parser.parse_args(argv)

    database_url = os.environ.get("DATABASE_URL") or None
    if args.mysql and not dburl.is_mysql(database_url):
        database_url = DEFAULT_MYSQL_URL
    once = args.once or os.environ.get("DEMO_NO_SERVE", "") not in ("", "0")

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    var_dir = Path(os.environ.get("DEMO_VAR_DIR", SITE_DIR / "var"))
    demo = Demo(
        port=args.port,
        database_url=database_url,
        var_dir=var_dir,
        log_file=Path(os.environ["DEMO_LOG_FILE"]) if os.environ.get("DEMO_LOG_FILE") else None,
        workers=args.workers,
        threads=args.threads,
        server_output=sys.stdout if args.follow else None,
        extra_env={"DEMO_LOG_STDOUT": "1"} if args.follow else None,
    )
    db_label = database_url or f"SQLite ({var_dir / 'demo.sqlite3'})"
    try:
        with demo:
            print(f"==> database: {db_label}", flush=True)
            print("==> migrating", flush=True)
            demo.prepare()
            print(
                f"==> starting gunicorn on {demo.url} "
                f"({args.workers} workers x {args.threads} threads, multi-process metrics)",
                flush=True,
            )
            demo.start()
            # The broken export leaks a connection in the worker that serves it; the traffic
            # that follows makes every worker republish its connections.
            print("==> GET /ops/export-report (leaks a connection)", flush=True)
            demo.get("/ops/export-report")
            print(f"==> driving {args.requests} requests through every endpoint", flush=True)
            print(demo.load(requests=args.requests, concurrency=args.concurrency), flush=True)
            # Let the threads the broken endpoints started finish and log (requests push their
            # numbers as they end; a thread's numbers are pushed when it ends or queries again).
            time.sleep(2.0)
            summary = demo.summary()
            print()
            print(f"Site:     {demo.url}/  (jobs: {demo.url}/jobs/)")
            print(f"Metrics:  {demo.url}/metrics")
            print(f"Connections: {demo.url}/conndiag/connections  (every worker's, live)")
            print(f"          or: {demo.connections_command()}")
            print(f"Log file: {demo.log_file}  (server output: {demo.server_output})")
            print(
                f"          try: grep '{REFUSED}' {demo.log_file} | head -1 | python -m json.tool"
            )
            print()
            print(summary.render())
            print()
            print("Every worker's connections (manage.py conndiag connections):")
            print(demo.connections(), flush=True)
            if once:
                return 0
            print("Serving until interrupted (Ctrl-C) ...", flush=True)
            while demo.process is not None and demo.process.poll() is None:
                time.sleep(0.5)
            print("gunicorn exited", file=sys.stderr)
            return 1
    except _Stop as stop:
        print(f"\n==> {stop}: stopping gunicorn", flush=True)
        return 0
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
