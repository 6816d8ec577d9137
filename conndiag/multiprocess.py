"""Dead workers in prometheus_client's multi-process directory: archived, without user wiring.

prometheus_client keeps one set of files per process that ever lived
(``counter_<pid>.db``, ``histogram_<pid>.db``, ``gauge_<mode>_<pid>.db``, ...). Under worker
churn (``max-requests``, ``harakiri``, OOM kills) the directory grows without end and every
scrape reads all of it, and a dead worker's ``live*`` gauges stay counted until someone calls
``mark_process_dead``. :func:`sweep` fixes both, from any process, at any time:

- it finds the pids whose files are in the directory and whose process is gone (no such
  process, or a zombie nobody reaped yet);
- their ``live*`` gauges are dropped; their counters, histograms and summaries are summed,
  and their ``min``/``max``/``sum``/``mostrecent`` gauges combined, into one archive file per
  type (``counter_archive<N>.db``, ...), which the ordinary ``MultiProcessCollector`` reads
  like any other process's file; their own files are deleted.

So the directory holds the live processes' files plus the archive (one file per type), and
a scrape reads only those. Gauges in mode ``all`` keep a ``pid`` label, which an archive
cannot keep: their files are left as prometheus_client leaves them.

Safety (no double count, no loss):

- every sweep holds an exclusive ``flock`` on :data:`LOCK_NAME` in the directory, and
  :class:`ArchiveCollector` (what conndiag's view serves) holds a shared one while it reads,
  so a scrape never sees a half-done sweep;
- the commit point is one atomic ``rename`` of the manifest (:data:`MANIFEST_NAME`), which
  names the archive's generation and the pids it absorbed. A sweep killed half-way (``kill
  -9``, harakiri of the scraping worker) leaves files the manifest explains: the next sweep
  finishes the job, and :class:`ArchiveCollector` reads the directory as the manifest says
  meanwhile (never a dead pid's file and the archive that contains it);
- a pid is only archived once its process is gone; liveness is checked again under the lock,
  and its files are listed only after that (a process that was still creating files when
  the directory was first read has them all once it is dead).

Limits: every process writing the directory must share one pid namespace (a server and its
workers do). A dead worker whose pid is reused, before a sweep saw it dead, by a new process
keeps its files until that process ends too: a new conndiag worker then continues the dead
one's counters (prometheus_client reopens the file), which is exact, and its own gauges are
set absolutely. A collector other than :class:`ArchiveCollector` (django-prometheus' view,
``start_http_server``) takes no lock: a scrape that overlaps a sweep can miss a file that
was just deleted, or, within the microseconds between the renames, see a dead pid twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: the lock file in the directory (never deleted)
LOCK_NAME = "conndiag.lock"
#: the manifest (JSON): the archive's generation, its types, the pids it absorbed
MANIFEST_NAME = "conndiag-archive.manifest"

#: a live process's file: ``<prefix>_<pid>.db``
_PID_FILE = re.compile(r"^(?P<prefix>counter|histogram|summary|gauge_[a-z]+)_(?P<pid>\d+)\.db$")
#: an archive file: ``<prefix>_archive<generation>.db`` (``.tmp`` until committed)
_ARCHIVE_FILE = re.compile(
    r"^(?P<prefix>counter|histogram|summary|gauge_[a-z]+)_archive(?P<gen>\d+)\.(?P<ext>db|tmp)$"
)
#: summed across processes (the collector sums them too)
_SUMMED = {"counter", "histogram", "summary", "gauge_sum"}
#: combined the way the collector combines them
_COMBINED = {"gauge_min": min, "gauge_max": max}
_MOSTRECENT = "gauge_mostrecent"
#: a dead process's values of these are dropped (what mark_process_dead does)
_LIVE = {"gauge_livesum", "gauge_livemin", "gauge_livemax", "gauge_liveall"}
_LIVE.add("gauge_livemostrecent")
#: left alone: the ``pid`` label is part of the value
_KEPT = {"gauge_all"}


def _handled(prefix: str) -> bool:
    return prefix not in _KEPT


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux ``/proc``; elsewhere
    ``kill(pid, 0)`` only)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


class Manifest:
    """What the archive holds: its generation, its files' prefixes, the pids it absorbed
    whose own files may still exist (a sweep was interrupted)."""

    __slots__ = ("absorbed", "generation", "prefixes")

    def __init__(
        self,
        generation: int = 0,
        prefixes: list[str] | None = None,
        absorbed: list[int] | None = None,
    ) -> None:
        self.generation = generation
        self.prefixes = sorted(prefixes or [])
        self.absorbed = sorted(absorbed or [])

    @classmethod
    def read(cls, path: str) -> Manifest:
        try:
            with open(os.path.join(path, MANIFEST_NAME), encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return cls()
        return cls(int(data["generation"]), list(data["prefixes"]), list(data["absorbed"]))

    def write(self, path: str) -> None:
        """Replace the manifest atomically (the commit point of a sweep)."""
        data = {
            "generation": self.generation,
            "prefixes": self.prefixes,
            "absorbed": self.absorbed,
        }
        tmp = os.path.join(path, f".{MANIFEST_NAME}.{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        # No fsync: the rename is what concurrent readers need, and the directory does not
        # outlive the server (it must be emptied at every start).
        os.replace(tmp, os.path.join(path, MANIFEST_NAME))

    def archive_file(self, path: str, prefix: str) -> str | None:
        """The committed archive file of ``prefix`` (renamed to ``.db`` or not yet)."""
        for ext in ("db", "tmp"):
            name = os.path.join(path, f"{prefix}_archive{self.generation}.{ext}")
            if os.path.exists(name):
                return name
        return None


@contextmanager
def locked(path: str, exclusive: bool) -> Iterator[None]:
    """Hold conndiag's ``flock`` on the directory (shared: readers; exclusive: a sweep)."""
    fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def _pid_files(path: str) -> dict[int, list[tuple[str, str]]]:
    """pid -> [(prefix, file name)] of the per-process files conndiag archives."""
    found: dict[int, list[tuple[str, str]]] = {}
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return found  # no directory (check conndiag.E002 says so): nothing to sweep
    for name in names:
        m = _PID_FILE.match(name)
        if m is not None and _handled(m["prefix"]):
            found.setdefault(int(m["pid"]), []).append((m["prefix"], name))
    return found


def dead_pids(path: str) -> set[int]:
    """The pids with files in ``path`` whose process is gone."""
    return {pid for pid in _pid_files(path) if not alive(pid)}


def _read(filename: str) -> Iterator[tuple[str, float, float]]:
    from prometheus_client.mmap_dict import MmapedDict

    if os.path.getsize(filename) == 0:
        return  # created, never written: a process killed while opening its file

    for key, value, timestamp, _pos in MmapedDict.read_all_values_from_file(filename):  # type: ignore[no-untyped-call]
        yield key, value, timestamp


def _combine(prefix: str, into: dict[str, tuple[float, float]], filename: str) -> None:
    combine = _COMBINED.get(prefix)
    for key, value, timestamp in _read(filename):
        old = into.get(key)
        if old is None:
            into[key] = (value, timestamp)
        elif prefix in _SUMMED:
            into[key] = (old[0] + value, 0.0)
        elif combine is not None:
            into[key] = (combine(old[0], value), 0.0)
        elif prefix == _MOSTRECENT and timestamp > old[1]:
            into[key] = (value, timestamp)


def _write(filename: str, values: dict[str, tuple[float, float]]) -> None:
    from prometheus_client.mmap_dict import MmapedDict

    if os.path.exists(filename):
        os.unlink(filename)  # a leftover of an interrupted sweep of this generation
    d = MmapedDict(filename)  # type: ignore[no-untyped-call]
    try:
        for key, (value, timestamp) in values.items():
            d.write_value(key, value, timestamp)  # type: ignore[no-untyped-call]
    finally:
        d.close()  # type: ignore[no-untyped-call]


def _finish(path: str, manifest: Manifest) -> None:
    """Bring the directory to what ``manifest`` says (idempotent; exclusive lock held)."""
    gen = manifest.generation
    for prefix in manifest.prefixes:
        tmp = os.path.join(path, f"{prefix}_archive{gen}.tmp")
        if os.path.exists(tmp):
            os.replace(tmp, os.path.join(path, f"{prefix}_archive{gen}.db"))
    for name in os.listdir(path):
        m = _ARCHIVE_FILE.match(name)
        if m is not None and int(m["gen"]) != gen:
            _unlink(os.path.join(path, name))
    if manifest.absorbed:
        absorbed = set(manifest.absorbed)
        for pid, files in _pid_files(path).items():
            if pid in absorbed:
                for _prefix, name in files:
                    _unlink(os.path.join(path, name))
        manifest.absorbed = []
        manifest.write(path)


def _size(filename: str) -> int:
    try:
        return os.path.getsize(filename)
    except FileNotFoundError:
        return 0  # a live gauge file a mark_process_dead hook removed


def _unlink(filename: str) -> None:
    try:
        os.unlink(filename)
    except FileNotFoundError:
        pass


def sweep(path: str) -> int:
    """Archive the files of every dead process in ``path``; returns how many it archived.

    Cheap when there is nothing to do (a directory listing and one liveness check per
    process with files, no lock).
    """
    if not dead_pids(path) and not _unfinished(path):
        return 0
    with locked(path, exclusive=True):
        manifest = Manifest.read(path)
        _finish(path, manifest)
        dead = sorted(pid for pid in _pid_files(path) if not alive(pid))
        if not dead:
            return 0
        # Listed again, after the liveness checks: a process that was still creating its
        # files when the directory was first read has them all now that it is dead (the
        # files merged must be exactly the files deleted).
        files = _pid_files(path)
        merged: dict[str, dict[str, tuple[float, float]]] = {}
        for prefix in manifest.prefixes:
            current = manifest.archive_file(path, prefix)
            if current is not None:
                _combine(prefix, merged.setdefault(prefix, {}), current)
        for pid in dead:
            for prefix, name in files[pid]:
                if prefix in _LIVE:
                    continue
                try:
                    _combine(prefix, merged.setdefault(prefix, {}), os.path.join(path, name))
                except FileNotFoundError:
                    continue  # a live gauge file a mark_process_dead hook removed
        new = Manifest(manifest.generation + 1, list(merged), dead)
        for prefix, values in merged.items():
            _write(os.path.join(path, f"{prefix}_archive{new.generation}.tmp"), values)
        new.write(path)  # the commit point
        _finish(path, new)
        return len(dead)


def _unfinished(path: str) -> bool:
    """Whether an interrupted sweep left work (absorbed pids' files, a stale generation)."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return False
    if MANIFEST_NAME not in names:
        return any(_ARCHIVE_FILE.match(n) for n in names)
    manifest = Manifest.read(path)
    if manifest.absorbed:
        return True
    for name in names:
        m = _ARCHIVE_FILE.match(name)
        if m is not None and (int(m["gen"]) != manifest.generation or m["ext"] == "tmp"):
            return True
    return False


def visible_files(path: str) -> list[str]:
    """The ``.db`` files a scrape must read, as the manifest says (lock held by the caller)."""
    manifest = Manifest.read(path)
    absorbed = set(manifest.absorbed)
    files = []
    for name in os.listdir(path):
        m = _PID_FILE.match(name)
        if m is not None:
            if int(m["pid"]) not in absorbed or not _handled(m["prefix"]):
                files.append(os.path.join(path, name))
        elif name.endswith(".db") and _ARCHIVE_FILE.match(name) is None:
            files.append(os.path.join(path, name))  # a file conndiag does not know: read it
    # A file a process is creating right now is empty for a moment (prometheus_client
    # opens it, then sizes it): it holds no value yet, and reading it would fail.
    files = [f for f in files if _size(f) > 0]
    for prefix in manifest.prefixes:
        current = manifest.archive_file(path, prefix)
        if current is not None:
            files.append(current)
    return files


def collector_class() -> Any:
    """:class:`ArchiveCollector`, built on first use (prometheus_client imported late)."""
    global _collector_class
    if _collector_class is None:
        from prometheus_client.multiprocess import MultiProcessCollector

        class ArchiveCollector(MultiProcessCollector):  # type: ignore[misc]
            """``MultiProcessCollector`` that reads the directory as the manifest says,
            under conndiag's shared lock (a concurrent sweep never shows half-done)."""

            def collect(self) -> Any:
                with locked(self._path, exclusive=False):
                    return self.merge(visible_files(self._path), accumulate=True)  # type: ignore[no-untyped-call]

        _collector_class = ArchiveCollector
    return _collector_class


_collector_class: Any = None
