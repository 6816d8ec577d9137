"""Run a real server (uWSGI, gunicorn, uvicorn) against a test site, for the slow tests.

::

    with servers.running("uwsgi", "tests.multiproc.wsgi:application", tmp_path,
                         processes=4, lazy_apps=True, env={...}) as server:
        server.get("/item-count/")
        server.workers()      # the worker pids (children of the master)
        server.log()          # everything the server printed so far

The server listens on a free port of 127.0.0.1; :func:`running` returns once it answers
HTTP on ``ready_path`` with every worker forked, and stops it on exit (SIGTERM, then SIGKILL
after ``stop_timeout``), so a test never leaves a server behind. Its output (stdout and
stderr) goes to ``<tmp_path>/<kind>.log``, and a failure to start reports it.

uWSGI is the binary the PyPI ``uwsgi`` package installs next to ``sys.executable`` (it
forks its workers from C: Python's at-fork hooks do not run in them unless
``py_call_osafterfork``). gunicorn and uvicorn run as ``python -m``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from django.conf import settings

from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("uwsgi", "gunicorn", "uvicorn")
T = TypeVar("T")


def free_port() -> int:
    """A TCP port of 127.0.0.1 nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    what: str, probe: Callable[[], T], ok: Callable[[T], bool], timeout: float = 20.0
) -> T:
    """Poll ``probe()`` until ``ok(value)``; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}; last: {value!r}")
        time.sleep(0.1)


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name{labels}`` in a Prometheus exposition (labels: exact set)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return None


def uwsgi_binary() -> str:
    """The ``uwsgi`` of this virtualenv (PyPI package), or :func:`unavailable`."""
    path = Path(sys.executable).with_name("uwsgi")
    if not path.exists():
        unavailable(f"no uwsgi next to {sys.executable} (pip install uwsgi)")
    return str(path)


def children(pid: int) -> set[int]:
    """The pids of ``pid``'s child processes (Linux)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return set()
    return {int(p) for p in text.split()}


@dataclass
class Server:
    """A started server: its process, address and log."""

    kind: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    #: how many worker processes it was asked for (0: the server process serves)
    processes: int
    _log_file: object = field(repr=False, default=None)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def get(
        self, path: str, timeout: float = 10.0, headers: Mapping[str, str] | None = None
    ) -> bytes:
        """The body of ``GET path`` (raises ``urllib.error.HTTPError`` on 4xx/5xx)."""
        request = urllib.request.Request(self.url(path), headers=dict(headers or {}))
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return bytes(response.read())

    def log(self) -> str:
        """Everything the server printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def workers(self) -> set[int]:
        """The pids of the worker processes (the server's children)."""
        return children(self.proc.pid)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` s; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for worker in self.workers():
                    try:
                        os.kill(worker, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.kill()
                self.proc.wait(10)
        close = getattr(self._log_file, "close", None)
        if close is not None:
            close()
        return int(self.proc.returncode)


def command(
    kind: str,
    app: str,
    port: int,
    *,
    processes: int = 1,
    threads: int | None = None,
    lazy_apps: bool = False,
    enable_threads: bool = False,
    py_call_osafterfork: bool = False,
    preload: bool = False,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command line that serves ``app`` (``module:callable``) on ``port``.

    ``lazy_apps``, ``enable_threads`` and ``py_call_osafterfork`` are uWSGI's options of the
    same names; ``preload`` is gunicorn's ``--preload``. ``threads`` is uWSGI's ``--threads``
    or gunicorn's gthread worker with that many threads. Options a server does not have
    are refused, so a test cannot believe it tested something it did not.
    """
    if kind not in KINDS:
        msg = f"unknown server {kind!r}: one of {', '.join(KINDS)}"
        raise ValueError(msg)
    uwsgi_only = {"lazy_apps": lazy_apps, "enable_threads": enable_threads}
    uwsgi_only["py_call_osafterfork"] = py_call_osafterfork
    if kind != "uwsgi" and any(uwsgi_only.values()):
        msg = f"{kind} has none of uWSGI's options {sorted(k for k, v in uwsgi_only.items() if v)}"
        raise ValueError(msg)
    if preload and kind != "gunicorn":
        msg = f"{kind} has no --preload"
        raise ValueError(msg)
    if kind == "uwsgi":
        module, _, callable_ = app.partition(":")
        cmd = [
            uwsgi_binary(),
            "--http-socket",
            f"127.0.0.1:{port}",
            "--master",
            "--processes",
            str(processes),
            "--module",
            module,
            "--callable",
            callable_ or "application",
            "--home",
            sys.prefix,
            "--chdir",
            str(ROOT),
            "--pythonpath",
            str(ROOT),
            "--need-app",
            "--die-on-term",  # SIGTERM stops uWSGI 2.0 (without it, it reloads)
            "--strict",
            "--disable-logging",  # no request log lines: the test reads the application's
        ]
        if threads:
            cmd += ["--threads", str(threads)]
        if lazy_apps:
            cmd.append("--lazy-apps")
        if enable_threads:
            cmd.append("--enable-threads")
        if py_call_osafterfork:
            cmd.append("--py-call-osafterfork")
    elif kind == "gunicorn":
        cmd = [sys.executable, "-m", "gunicorn", app, "--bind", f"127.0.0.1:{port}"]
        cmd += ["--workers", str(processes), "--graceful-timeout", "5"]
        if threads:
            cmd += ["--worker-class", "gthread", "--threads", str(threads)]
        if preload:
            cmd.append("--preload")
    else:
        cmd = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
        if processes > 1:
            cmd += ["--workers", str(processes)]
        cmd += ["--lifespan", "off", "--no-access-log"]
    return cmd + list(extra_args)


@contextmanager
def running(
    kind: str,
    app: str,
    tmp_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    ready_path: str = "/",
    timeout: float = 30.0,
    stop_timeout: float = 10.0,
    **options: Any,
) -> Iterator[Server]:
    """Start ``kind`` serving ``app``; yield the :class:`Server` once ready; stop it.

    ``options`` are :func:`command`'s (``processes``, ``threads``, ``lazy_apps``,
    ``enable_threads``, ``py_call_osafterfork``, ``preload``, ``extra_args``). Ready:
    ``GET ready_path`` got an HTTP answer (any status) and, for a server with more than one
    process, that many workers exist. ``env`` is added to this process's environment
    (``PYTHONPATH`` gets the repository root).
    """
    port = free_port()
    cmd = command(kind, app, port, **options)
    processes = int(options.get("processes", 1))
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p
    )
    log_path = tmp_path / f"{kind}.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(kind, proc, port, log_path, processes, log_file)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"{kind} exited with {proc.returncode}:\n{server.log()}")
            try:
                server.get(ready_path, timeout=5)
            except urllib.error.HTTPError:
                pass  # an answer: the application is loaded
            except OSError:
                return False
            return processes <= 1 or len(server.workers()) >= processes

        wait_for(f"{kind} to serve on port {port} ({' '.join(cmd)})", ready, bool, timeout)
        yield server
    finally:
        server.stop(stop_timeout)


# -- the test sites' databases -------------------------------------------------------------


def mysql_admin() -> Any:
    """A raw autocommit connection to the tests' MariaDB server (no database selected)."""
    import MySQLdb

    db = settings.DATABASES["mysql"]
    return MySQLdb.connect(
        host=db["HOST"],
        port=int(db["PORT"]),
        user=db["USER"],
        password=db["PASSWORD"],
        autocommit=True,
    )


@contextmanager
def mysql_site_database(name: str) -> Iterator[Any]:
    """A fresh MariaDB database ``name`` with ``tests.testapp``'s table, dropped after.

    Yields an admin connection (for ``SHOW PROCESSLIST``, ``KILL``).
    """
    admin = mysql_admin()
    with admin.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
        cursor.execute(f"CREATE DATABASE `{name}`")
        cursor.execute(
            f"CREATE TABLE `{name}`.testapp_item "
            "(id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(100) NOT NULL)"
        )
    try:
        yield admin
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


def mysql_site_env(name: str) -> dict[str, str]:
    """Environment that serves ``tests.multiproc`` against the MariaDB database ``name``."""
    db = settings.DATABASES["mysql"]
    return {
        "DJANGO_SETTINGS_MODULE": "tests.multiproc.settings",
        "CONNDIAG_MP_DB": name,
        "CONNDIAG_TEST_MYSQL_URL": f"mysql://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:"
        f"{db['PORT']}/{name}",
    }
