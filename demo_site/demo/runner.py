"""Run the demo: migrate, serve under gunicorn (several workers x threads, multi-process
metrics), drive a burst of traffic, summarize what conndiag saw, serve until interrupted.
``--server uwsgi`` serves it on the original report's stack instead: uWSGI (prefork,
``--master --processes N --lazy-apps``) behind Nginx speaking the uwsgi protocol.

``scripts/demo`` prepares a virtualenv and then runs ``python demo_site/demo/runner.py``; the
smoke tests (``tests/test_demo.py``) use :class:`Demo` directly. This module imports neither
Django nor the site: it drives them in subprocesses, with the interpreter it is given.

Stopping is clean: gunicorn (or uWSGI, with ``--die-on-term``) runs in its own process group,
which is sent SIGTERM (then SIGKILL after a grace period); Nginx, in its own group too, gets
SIGQUIT (graceful shutdown); the ``PROMETHEUS_MULTIPROC_DIR`` and Nginx's prefix are removed.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

SITE_DIR = Path(__file__).resolve().parent.parent  # demo_site/
REPO_DIR = SITE_DIR.parent
sys.path.insert(0, str(SITE_DIR))

from demo import dburl  # noqa: E402

DEFAULT_MYSQL_URL = "mysql://root@127.0.0.1:3306/conndiag_demo"
SERVERS = ("gunicorn", "uwsgi")
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


# -- uWSGI behind Nginx -------------------------------------------------------------------

# The request variables uWSGI needs (Debian's /etc/nginx/uwsgi_params, inlined: the demo's
# Nginx reads nothing of the system's configuration).
UWSGI_PARAMS = (
    "QUERY_STRING $query_string",
    "REQUEST_METHOD $request_method",
    "CONTENT_TYPE $content_type",
    "CONTENT_LENGTH $content_length",
    "REQUEST_URI $request_uri",
    "PATH_INFO $document_uri",
    "DOCUMENT_ROOT $document_root",
    "SERVER_PROTOCOL $server_protocol",
    "REQUEST_SCHEME $scheme",
    "HTTPS $https if_not_empty",
    "REMOTE_ADDR $remote_addr",
    "REMOTE_PORT $remote_port",
    "SERVER_PORT $server_port",
    "SERVER_NAME $server_name",
)


def nginx_binary() -> str:
    """Debian's ``nginx`` (``scripts/demo --server uwsgi`` installs it when missing)."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        msg = "nginx is not installed (apt-get install nginx; scripts/demo does it as root)"
        raise DemoError(msg)
    return found


def nginx_config(prefix: Path, port: int, upstream_port: int) -> str:
    """A foreground Nginx on 127.0.0.1:``port`` passing every request to uWSGI's socket on
    127.0.0.1:``upstream_port``; every path it writes is under ``prefix``."""
    params = "\n".join(f"            uwsgi_param {p};" for p in UWSGI_PARAMS)
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / (kind + '_temp')};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process on;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} notice;
events {{
    worker_connections 512;
}}
http {{
    access_log off;
{temp}
    upstream conndiag_demo {{
        server 127.0.0.1:{upstream_port};
    }}
    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        location / {{
{params}
            uwsgi_pass conndiag_demo;
            uwsgi_read_timeout 60s;
        }}
    }}
}}
"""


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

    def agrees(self) -> bool:
        """The metrics' refused (raised) detached queries are the log's refusal events."""
        return self.metrics_error is None and int(self.detached_raised) == self.refused_events

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
    """One run of the demo site under gunicorn, or (``server="uwsgi"``) under uWSGI behind
    Nginx. Use as a context manager: it always stops."""

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
        server: str = "gunicorn",
    ) -> None:
        if server not in SERVERS:
            msg = f"unknown server {server!r}: one of {', '.join(SERVERS)}"
            raise DemoError(msg)
        self.server = server
        self.python = python
        self.port = port if port is not None else free_port()
        self.database_url = database_url or None
        self.var_dir = var_dir or SITE_DIR / "var"
        self.log_file = log_file or self.var_dir / "demo.log"
        self.workers = workers
        self.threads = threads
        self.server_output = (
            server_output if server_output is not None else (self.var_dir / f"{server}.log")
        )
        self.extra_env = extra_env or {}
        self.url = f"http://127.0.0.1:{self.port}"
        self.multiproc_dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None  # gunicorn's or uWSGI's master
        self.proxy: subprocess.Popen[bytes] | None = None  # Nginx's master (uwsgi mode)
        self.nginx_prefix: Path | None = None
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

    def describe(self) -> str:
        """What serves the demo, for the operator."""
        if self.server == "uwsgi":
            return (
                f"uWSGI ({self.workers} processes x {self.threads} threads, master, lazy-apps) "
                f"behind Nginx (uwsgi protocol), multi-process metrics"
            )
        return f"gunicorn ({self.workers} workers x {self.threads} threads, multi-process metrics)"

    def uwsgi_command(self, socket_port: int) -> list[str]:
        """uWSGI as docs/metrics.md's tested configuration: master, prefork, lazy-apps,
        ``die-on-term``; it speaks the uwsgi protocol on 127.0.0.1:``socket_port``."""
        binary = Path(self.python).with_name("uwsgi")
        if not os.access(binary, os.X_OK):
            msg = f"no uwsgi next to {self.python} (pip install uwsgi; scripts/demo does it)"
            raise DemoError(msg)
        return [
            str(binary),
            "--socket",
            f"127.0.0.1:{socket_port}",
            "--master",
            "--processes",
            str(self.workers),
            "--threads",
            str(self.threads),
            "--lazy-apps",  # each worker loads the app: no connection shared across fork
            "--die-on-term",  # SIGTERM stops uWSGI 2.0 (without it, SIGTERM reloads)
            "--need-app",
            "--strict",
            "--module",
            "demo.wsgi:application",
            "--chdir",
            str(SITE_DIR),
            "--pythonpath",
            str(SITE_DIR),
            "--home",
            str(Path(self.python).parent.parent),
            "--procname-prefix-spaced",
            "conndiag-demo",
            "--disable-logging",  # conndiag and the site log every request's queries already
        ]

    def start(self, ready_timeout: float = 30.0) -> None:
        """Start the server in its own process group (uwsgi mode: uWSGI, then Nginx in front,
        each in its own group) and wait until it answers."""
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
        if self.server == "uwsgi":
            nginx = nginx_binary()
            socket_port = free_port()
            command = self.uwsgi_command(socket_port)
        else:
            command = [
                self.python,
                "-m",
                "gunicorn",
                "-c",
                str(SITE_DIR / "demo" / "gunicorn_conf.py"),
            ]
        self.process = subprocess.Popen(
            command,
            env=self.env(),
            cwd=str(SITE_DIR),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() signals all of it
        )
        if self.server == "uwsgi":
            self.nginx_prefix = Path(tempfile.mkdtemp(prefix="conndiag-demo-nginx-"))
            self.nginx_prefix.chmod(0o755)  # Nginx's workers (not root) reach its temp dirs
            conf = self.nginx_prefix / "nginx.conf"
            conf.write_text(nginx_config(self.nginx_prefix, self.port, socket_port))
            self.proxy = subprocess.Popen(
                # -e: the start-up error log too is ours, not /var/log/nginx/error.log
                [nginx, "-p", str(self.nginx_prefix), "-c", str(conf), "-e", "stderr"],
                env=self.env(),
                cwd=str(self.nginx_prefix),
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in ((self.server, self.process), ("nginx", self.proxy)):
                if proc is not None and proc.poll() is not None:
                    msg = (
                        f"{name} exited with status {proc.returncode} before answering; "
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
            f"{self.server} did not answer on {self.url} within {timeout:.0f} s; "
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

    def summary(self, settle: float = 5.0) -> Summary:
        """What the metrics and the log say. A scrape pushes the numbers of every thread of the
        worker that answers it, and the other workers' idle pool threads may still hold their
        last refused query (docs/metrics.md's delay bound): while the metrics count fewer
        refused queries than the log, scrape again, with a concurrent round of scrapes first so
        that every worker answers one (uWSGI's idle worker tends to win every accept), for at
        most ``settle`` seconds."""
        deadline = time.monotonic() + settle
        while True:
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
            summary = summarize(metrics_text, self.events(), error)
            if error or summary.agrees() or time.monotonic() >= deadline:
                return summary
            self._scrape_every_worker()
            time.sleep(0.2)

    def _scrape_every_worker(self) -> None:
        """More concurrent scrapes than the server has threads: each worker serves some."""
        count = 2 * self.workers * self.threads
        with ThreadPoolExecutor(max_workers=count, thread_name_prefix="scrape") as pool:
            for _ in pool.map(lambda _: self._try_get("/metrics"), range(count)):
                pass

    def _try_get(self, path: str) -> int:
        try:
            return self.get(path)[0]
        except (urllib.error.URLError, OSError):
            return 0

    @staticmethod
    def _stop_group(proc: subprocess.Popen[bytes], signum: int, grace: float) -> None:
        """``signum`` to ``proc``'s process group, SIGKILL to what is left after ``grace``."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        # Workers left behind by a master that died get the same treatment.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def stop(self, grace: float = 10.0) -> None:
        """Nginx first (SIGQUIT: graceful), then gunicorn's or uWSGI's process group
        (SIGTERM; uWSGI runs with ``--die-on-term``), SIGKILL after ``grace``; remove the
        temporary directories."""
        if self.proxy is not None:
            self._stop_group(self.proxy, signal.SIGQUIT, grace)
            self.proxy = None
        if self.process is not None:
            self._stop_group(self.process, signal.SIGTERM, grace)
            self.process = None
        if self._output_file is not None:
            self._output_file.close()
            self._output_file = None
        if self.multiproc_dir is not None:
            shutil.rmtree(self.multiproc_dir, ignore_errors=True)
            self.multiproc_dir = None
        if self.nginx_prefix is not None:
            shutil.rmtree(self.nginx_prefix, ignore_errors=True)
            self.nginx_prefix = None

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
    parser.add_argument(
        "--server",
        choices=SERVERS,
        default=os.environ.get("DEMO_SERVER", "gunicorn"),
        help="gunicorn (default), or uwsgi: uWSGI behind Nginx, the original report's stack",
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
        server=args.server,
    )
    db_label = database_url or f"SQLite ({var_dir / 'demo.sqlite3'})"
    try:
        with demo:
            print(f"==> database: {db_label}", flush=True)
            print("==> migrating", flush=True)
            demo.prepare()
            print(f"==> starting {demo.describe()} on {demo.url}", flush=True)
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
            while all(p is None or p.poll() is None for p in (demo.process, demo.proxy)):
                time.sleep(0.5)
            print(f"{args.server} or nginx exited", file=sys.stderr)
            return 1
    except _Stop as stop:
        print(f"\n==> {stop}: stopping {args.server}", flush=True)
        return 0
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
