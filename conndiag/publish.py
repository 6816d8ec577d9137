"""Publish this process's open connections for the inspector (``manage.py conndiag connections``).

:class:`Publisher` is a recorder. It keeps the set of this process's open connections and
writes it, as one small JSON file per process, into the inspector directory
(:func:`directory`), where every process of the deployment on this host can read it:

- on every connect (with the server facts that follow it, else at its first query) and
  close, at once;
- otherwise at most once a second: the per-query cost is one attribute read and one
  comparison (:meth:`Publisher.query`), and the write happens on the query that first
  finds the second elapsed. The file therefore lags the process by at most a second of
  queries (``last_used``, ``queries``), never by a connect or a close.

Each file is written atomically (a private temporary file, then ``os.replace``), with
``0600`` permissions in a ``0700`` directory owned by this user, and bounded
(:data:`MAX_CONNECTIONS` entries, strings cut to :data:`MAX_STRING`). A process removes its
file at exit; the files of processes that died without exiting (``kill -9``, OOM) are
ignored by readers and removed by them (:mod:`conndiag.inspector`).

After a ``fork()``, a connection the child inherited is published by the child only once the
child has run a query on it: that is exactly a connection shared by two processes.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import stat
import tempfile
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from . import process
from .records import Recorder

if TYPE_CHECKING:
    from .conf import Config
    from .records import Query
    from .scope import RequestScope
    from .state import ConnState
    from .threads import ThreadInfo

#: format version of the files (readers skip other versions)
VERSION = 1
#: seconds between two writes caused by queries (connects and closes write at once)
PUBLISH_INTERVAL = 1.0
#: connections listed per process file (the rest are counted in ``truncated``)
MAX_CONNECTIONS = 256
#: longest string written (thread names, request paths)
MAX_STRING = 200
#: file name suffix of the published files
SUFFIX = ".json"
#: memory-backed and shared by the host's processes (Linux): writes cost no disk I/O
SHM = "/dev/shm"  # noqa: S108 - only a private 0700 subdirectory, checked by ensure_directory
#: the sub-directory used inside prometheus_client's multi-process directory
MULTIPROC_SUBDIR = "conndiag-connections"


def _pid() -> int:
    """This process's id, right after any fork (:func:`conndiag.process.pid`)."""
    return process.pid()


def directory(config: Config) -> str:
    """Where the processes of this deployment (on this host) publish their connections.

    ``CONNDIAG['INSPECTOR_DIR']`` when set; else ``conndiag-connections/`` inside
    ``PROMETHEUS_MULTIPROC_DIR`` when that names a directory (it is shared by the deployment's
    processes already, and emptied with them at deploy time); else ``conndiag-<uid>`` in the
    system's temporary directory.
    """
    if config.inspector_dir is not None:
        return config.inspector_dir
    from .metrics import multiprocess_dir

    multiproc = multiprocess_dir()
    if multiproc and os.path.isdir(multiproc):
        return os.path.join(multiproc, MULTIPROC_SUBDIR)
    uid = os.getuid() if hasattr(os, "getuid") else 0
    base = SHM if os.path.isdir(SHM) and os.access(SHM, os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, f"conndiag-{uid}")


class UnsafeDirectoryError(OSError):
    """The inspector directory exists but is not private to this user."""


def ensure_directory(path: str) -> str:
    """Create ``path`` (mode 0700) if needed; refuse one that others could write or read."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        msg = f"{path} is not a directory (a symbolic link?)"
        raise UnsafeDirectoryError(msg)
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        msg = f"{path} belongs to uid {st.st_uid}, not to this user ({os.getuid()})"
        raise UnsafeDirectoryError(msg)
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def process_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), else None.

    A file's pid plus this value identify a process even after its pid is reused.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def _cut(value: object) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if len(text) <= MAX_STRING else text[:MAX_STRING] + "..."


def database_target(vendor: str, settings_dict: dict[str, Any]) -> str:
    """Which database a connection goes to (vendor, host, port, name; never credentials).

    Readers join published connections with a server's process list by this and the
    server-side connection id, so two deployments sharing a directory never mix.
    """
    host = settings_dict.get("HOST") or ""
    port = settings_dict.get("PORT") or ""
    return f"{vendor}://{host}:{port}/{settings_dict.get('NAME') or ''}"


def _request(rs: RequestScope | None) -> dict[str, Any] | None:
    if rs is None:
        return None
    return {
        "id": rs.request_id,
        "method": rs.method,
        "path": _cut(rs.path),
        "finished": rs.finished is not None,
    }


class _Entry:
    """What the publisher keeps about one open connection besides its :class:`ConnState`."""

    __slots__ = ("opening_request", "pid", "queries_at_fork", "target")

    def __init__(self, target: str, opening_request: RequestScope | None) -> None:
        self.target = target
        self.opening_request = opening_request
        #: the process that opened it (read here, not from ConnState: right after any fork)
        self.pid = _pid()
        #: in a child that inherited it: its query count when the fork was first seen
        self.queries_at_fork: int | None = None


class Publisher(Recorder):
    """The recorder that publishes this process's open connections (see the module doc)."""

    __slots__ = (
        "_dir",
        "_dir_checked",
        "_failed",
        "_next",
        "_open",
        "_path",
        "_pid",
        "_start",
        "host",
    )

    def __init__(self, config: Config) -> None:
        self._dir = directory(config)
        #: every publisher of the process shares the registry (a runtime rebuilt after a
        #: settings change keeps publishing the connections opened before)
        self._open = _OPEN
        #: perf_counter time from which a query may cause a write
        self._next = 0.0
        self._pid = 0
        self._start: int | None = None
        self._path = ""
        #: the directory was checked (created, ours, private) once
        self._dir_checked = False
        #: the directory could not be used: stop trying (reported once, as an internal error)
        self._failed = False
        self.host = socket.gethostname()
        _publishers.add(self)
        _install_fork_hook()

    # -- the recorder interface --------------------------------------------------------------

    def query(self, q: Query) -> None:
        # The whole per-query cost: an attribute read and a comparison.
        last = q.state.last_used
        if last is not None and last >= self._next:
            self.publish(blocking=False)

    def connection_opened(self, state: ConnState, info: ThreadInfo) -> None:
        from django.db import connections

        from .scope import current_scope

        settings_dict = connections.settings[state.alias]
        entry = _Entry(database_target(state.vendor, settings_dict), info.scope or current_scope())
        self._open[state] = entry
        # Written by the server facts that follow at once (MySQL, PostgreSQL), else by the
        # connection's first query: one write per connect, with its wait_timeout.
        self._next = 0.0

    def connection_closed(self, state: ConnState, reason: str) -> None:
        found = self._open.pop(state, None)
        if found is not None:
            self.publish()

    def server_facts(self, state: ConnState, facts: dict[str, Any]) -> None:
        # Right after the connect, wait_timeout known: the connect's write.
        if state in self._open:
            self.publish()

    # -- writing ---------------------------------------------------------------------------------

    def publish(self, blocking: bool = True) -> None:
        """Write this process's file now (``blocking=False``: skip if a write is under way)."""
        if self._failed:
            return
        pid = _pid()
        if pid != self._pid:
            self._forked(pid)
        lock = _LOCK[0]
        if not lock.acquire(blocking):
            return
        try:
            self._next = time.perf_counter() + PUBLISH_INTERVAL
            self._write(pid)
        except UnsafeDirectoryError:
            self._failed = True
            raise
        finally:
            lock.release()

    def after_fork(self) -> None:
        """In a child process: a new lock (the parent's may be held by a thread that is gone),
        a write at the next query, and the inherited connections' query counts, so that the
        child claims only those it uses itself."""
        _LOCK[0] = threading.Lock()
        self._next = 0.0
        pid = _pid()
        for state, entry in self._items():
            if entry.pid != pid and entry.queries_at_fork is None:
                entry.queries_at_fork = state.queries

    def _items(self) -> list[tuple[ConnState, _Entry]]:
        for _ in range(3):  # a garbage-collected connection may close while we iterate
            try:
                return list(self._open.items())
            except RuntimeError:
                continue
        return []

    def _forked(self, pid: int) -> None:
        """First write in this process, or in a child the fork hook did not run in."""
        if self._pid:
            self.after_fork()
        self._pid = pid
        self._start = _start_time(pid)
        self._path = os.path.join(self._dir, f"{pid}{SUFFIX}")
        _install_atexit()

    def snapshot(self) -> dict[str, Any]:
        """This process's published document (also what tests compare with the file)."""
        now_wall = time.time()
        now = time.perf_counter()
        pid = self._pid or _pid()
        rows: list[dict[str, Any]] = []
        truncated = 0
        for state, entry in self._items():
            if state.closed:
                self._open.pop(state, None)  # closed while no publisher listened
                continue
            inherited = entry.pid != pid
            if inherited and (
                entry.queries_at_fork is None or state.queries <= entry.queries_at_fork
            ):
                continue  # inherited and never used here: the parent's, not ours
            if len(rows) >= MAX_CONNECTIONS:
                truncated += 1
                continue
            rows.append(self._row(state, entry, inherited, now, now_wall))
        return {
            "version": VERSION,
            "host": self.host,
            "pid": pid,
            "start_time": self._start,
            "written_at": now_wall,
            "connections": rows,
            "truncated": truncated,
        }

    @staticmethod
    def _row(
        state: ConnState, entry: _Entry, inherited: bool, now: float, now_wall: float
    ) -> dict[str, Any]:
        info = state.opened_by
        thread = info.thread
        live = info.scope
        if live is None:
            live = info.task_origin or info.origin
        last = state.last_used
        return {
            "alias": state.alias,
            "vendor": state.vendor,
            "target": entry.target,
            "server_id": state.server_id,
            "opened_pid": entry.pid,
            "inherited": inherited,
            "thread": _cut(thread.name),
            "thread_native_id": info.native_id,
            "thread_alive": thread.is_alive(),
            "context_opened": state.context_opened,
            "opened_at": state.opened_wall,
            "last_used_at": None if last is None else now_wall - (now - last),
            "queries": state.queries,
            "conn_max_age": state.conn_max_age,
            "health_checks": state.health_checks,
            "wait_timeout": state.wait_timeout,
            "broken": None if state.broken is None else state.broken[0],
            # the request the owning thread serves now (or, for a thread or task a request
            # started, that request)
            "request": _request(live),
            # the request during which the connection was opened
            "opening_request": _request(entry.opening_request),
        }

    def _write(self, pid: int) -> None:
        document = self.snapshot()
        data = json.dumps(document, separators=(",", ":"), default=str).encode("utf-8")
        tmp = os.path.join(self._dir, f".{pid}.tmp")
        if not self._dir_checked:
            ensure_directory(self._dir)
            self._dir_checked = True
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except FileNotFoundError:  # removed since (a deploy emptied it): make it again
            ensure_directory(self._dir)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, self._path)

    def remove(self) -> None:
        """Remove this process's file (at exit; only the process that wrote it)."""
        if self._path and self._pid == _pid():
            try:
                os.unlink(self._path)
            except OSError:
                pass


#: this process's open connections, shared by its publishers
_OPEN: dict[ConnState, _Entry] = {}
#: the lock of the writes (in a list: replaced in a child after fork)
_LOCK = [threading.Lock()]
#: every live publisher (a runtime rebuilt after a settings change makes a new one)
_publishers: weakref.WeakSet[Publisher] = weakref.WeakSet()
_fork_hook = False


_start_times: dict[int, int | None] = {}
_atexit_installed = False


def _start_time(pid: int) -> int | None:
    """:func:`process_start_time` of this process, read once per pid."""
    if pid not in _start_times:
        _start_times[pid] = process_start_time(pid)
    return _start_times[pid]


def _remove_files_at_exit() -> None:
    for publisher in list(_publishers):
        publisher.remove()


def _install_atexit() -> None:
    """One ``atexit`` handler per process, for every publisher (never one per runtime)."""
    global _atexit_installed
    if not _atexit_installed:
        atexit.register(_remove_files_at_exit)
        _atexit_installed = True


def _after_fork_in_child() -> None:
    for publisher in list(_publishers):
        try:
            publisher.after_fork()
        except Exception:  # noqa: S110 - never break a fork; the first write retries it
            pass


def _install_fork_hook() -> None:
    """Run :func:`_after_fork_in_child` in every child, as soon as conndiag notices the fork
    (before the child's first query runs, even when uWSGI forked it from C)."""
    global _fork_hook
    if not _fork_hook:
        process.on_fork(_after_fork_in_child)
        _fork_hook = True
