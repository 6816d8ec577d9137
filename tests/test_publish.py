"""The publisher: each process's open connections in a small private file, written cheaply."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connections
from django.test import override_settings

from conndiag import inspector, publish, runtime

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "mysql"])


@pytest.fixture
def pubdir(tmp_path: Path) -> Iterator[Path]:
    """A private inspector directory for this test (CONNDIAG['INSPECTOR_DIR'])."""
    path = tmp_path / "inspector"
    with override_settings(CONNDIAG={"INSPECTOR_DIR": str(path)}):
        yield path


def publisher() -> publish.Publisher:
    return next(r for r in runtime.get().recorders if isinstance(r, publish.Publisher))


def my_file(path: Path) -> dict[str, Any]:
    return json.loads((path / f"{os.getpid()}.json").read_text())  # type: ignore[no-any-return]


def entry_of(document: dict[str, Any], db: Any) -> list[dict[str, Any]]:
    """The published entries of ``db``'s connection (the process may hold others)."""
    from conndiag.state import state_of

    state = state_of(db)
    assert state is not None
    return [c for c in document["connections"] if c["opened_at"] == state.opened_wall]


def in_thread(fn: Any) -> None:
    thread = threading.Thread(target=fn, name="publish-test")
    thread.start()
    thread.join()


def test_connect_and_close_are_written_at_once(pubdir: Path) -> None:
    """A connection appears in the process's file when it opens, and leaves it when it closes."""
    seen: dict[str, Any] = {}

    def work() -> None:
        db = connections["mysql"]
        with db.cursor() as cursor:
            cursor.execute("SELECT 1")
        seen["open"] = my_file(pubdir)
        db.close()
        seen["closed"] = my_file(pubdir)

    in_thread(work)
    document = seen["open"]
    assert document["pid"] == os.getpid()
    assert document["start_time"] == publish.process_start_time(os.getpid())
    [conn] = [c for c in document["connections"] if c["thread"] == "publish-test"]
    assert conn["alias"] == "mysql"
    assert conn["vendor"] == "mysql"
    assert conn["target"] == "mysql://{HOST}:{PORT}/{NAME}".format(
        **connections["mysql"].settings_dict
    )
    assert isinstance(conn["server_id"], int)
    assert conn["wait_timeout"] > 0
    assert conn["thread_alive"] is True
    assert conn["context_opened"] == "background"
    assert conn["conn_max_age"] == 0
    assert conn["inherited"] is False
    assert [c for c in seen["closed"]["connections"] if c["thread"] == "publish-test"] == []


def test_queries_write_at_most_once_a_second(pubdir: Path) -> None:
    """Queries within a second of the last write leave the file alone; the next one after it
    writes (the per-query cost is one comparison)."""
    db = connections.create_connection("default")
    try:
        with db.cursor() as cursor:
            cursor.execute("SELECT 1")
            before = (pubdir / f"{os.getpid()}.json").stat().st_mtime_ns
            for _ in range(50):
                cursor.execute("SELECT 1")
            [conn] = entry_of(my_file(pubdir), db)
            assert conn["queries"] <= 1  # the write was at connect, before the queries
            assert (pubdir / f"{os.getpid()}.json").stat().st_mtime_ns == before
            publisher()._next = 0.0  # as if a second had passed
            cursor.execute("SELECT 1")
        [conn] = entry_of(my_file(pubdir), db)
        assert conn["queries"] == 52
        assert conn["last_used_at"] >= conn["opened_at"]
    finally:
        db.close()


def test_file_and_directory_are_private(pubdir: Path) -> None:
    """The directory is 0700 and the file 0600; no temporary file is left behind."""
    db = connections.create_connection("default")
    with db.cursor() as cursor:
        cursor.execute("SELECT 1")
    db.close()
    assert stat.S_IMODE(pubdir.stat().st_mode) == 0o700
    assert stat.S_IMODE((pubdir / f"{os.getpid()}.json").stat().st_mode) == 0o600
    assert sorted(p.name for p in pubdir.iterdir()) == [f"{os.getpid()}.json"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_a_directory_of_another_user_is_refused_and_the_query_still_runs(tmp_path: Path) -> None:
    """A directory someone else owns is never written to; conndiag reports it once and the
    application's queries go on."""
    path = tmp_path / "theirs"
    path.mkdir(mode=0o700)
    os.chown(path, 12345, 12345)
    with override_settings(CONNDIAG={"INSPECTOR_DIR": str(path)}):
        db = connections.create_connection("default")
        with db.cursor() as cursor:
            cursor.execute("SELECT 1")
            assert cursor.fetchone() == (1,)
        db.close()
        assert list(path.iterdir()) == []
        assert runtime.get().internal_errors == 1  # refused once, then publishing stops


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    """A symbolic link where the directory should be is not followed."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(publish.UnsafeDirectoryError):
        publish.ensure_directory(str(tmp_path / "link"))


def test_the_file_is_bounded(pubdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_CONNECTIONS, connections are counted, not listed."""
    monkeypatch.setattr(publish, "MAX_CONNECTIONS", 2)
    dbs = [connections.create_connection("default") for _ in range(3)]
    try:
        for db in dbs:
            with db.cursor() as cursor:
                cursor.execute("SELECT 1")
        document = my_file(pubdir)
        assert len(document["connections"]) == 2
        assert document["truncated"] >= 1
    finally:
        for db in dbs:
            db.close()


def test_long_strings_are_cut(pubdir: Path) -> None:
    """A thread name longer than MAX_STRING is cut (the file stays small)."""
    seen = {}

    def work() -> None:
        db = connections["default"]
        with db.cursor() as cursor:
            cursor.execute("SELECT 1")
        seen["doc"] = my_file(pubdir)
        db.close()

    thread = threading.Thread(target=work, name="x" * 1000)
    thread.start()
    thread.join()
    [conn] = [c for c in seen["doc"]["connections"] if c["thread"].startswith("xxx")]
    assert len(conn["thread"]) == publish.MAX_STRING + 3


def test_a_forked_child_claims_an_inherited_connection_only_once_it_uses_it(
    tmp_path: Path,
) -> None:
    """After a real fork, a child that runs a query on the inherited connection publishes it
    (inherited, opened by the parent); a child that does not, does not."""
    path = tmp_path / "inspector"
    conf = {"INSPECTOR_DIR": str(path), "POLICY": {"forked": "ignore"}}
    with override_settings(CONNDIAG=conf):
        db = connections.create_connection("default")
        with db.cursor() as cursor:
            cursor.execute("SELECT 1")
        try:
            children = [_fork_child(db, use=True), _fork_child(db, use=False)]
            documents = {}
            for pid, _done, _ in children:
                documents[pid] = json.loads((path / f"{pid}.json").read_text())
            user, idle = children[0][0], children[1][0]
            [conn] = documents[user]["connections"]
            assert conn["inherited"] is True
            assert conn["opened_pid"] == os.getpid()
            assert documents[idle]["connections"] == []
        finally:
            for pid, done, _ in children:
                os.write(done, b"x")
                os.close(done)
                os.waitpid(pid, 0)
            db.close()
        # Both children exited: their files are ignored and removed by the next reader.
        live = [d["pid"] for d in inspector.read_published(str(path))]
        assert live == [os.getpid()]
        assert sorted(p.name for p in path.iterdir()) == [f"{os.getpid()}.json"]


def _fork_child(db: Any, use: bool) -> tuple[int, int, int]:
    """Fork a child that (maybe) queries ``db``, publishes, then waits for the parent."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "process is multi-threaded"
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            if use:
                with db.cursor() as cursor:
                    cursor.execute("SELECT 1")
            publisher().publish()
            os.write(ready_w, b"x")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    os.read(ready_r, 1)
    os.close(ready_r)
    return pid, done_w, ready_r


SCRIPT = """
import os, sys, time
import django
from django.conf import settings
settings.configure(
    INSTALLED_APPS=["conndiag"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    CONNDIAG={"INSPECTOR_DIR": sys.argv[1]},
)
django.setup()
from django.db import connection
with connection.cursor() as cursor:
    cursor.execute("SELECT 1")
print("published", flush=True)
if sys.argv[2] == "wait":
    time.sleep(60)
"""


def _publishing_process(path: Path, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(path), mode],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # structlog's unconfigured output comes first
        if line.strip() == "published":
            return proc
    pytest.fail(f"the publishing process exited with {proc.wait()}")


def test_a_process_removes_its_file_at_exit(tmp_path: Path) -> None:
    """A process that exits normally leaves no file behind."""
    with _publishing_process(tmp_path, "exit") as proc:
        assert proc.wait(timeout=30) == 0
    assert list(tmp_path.iterdir()) == []


def test_a_killed_process_is_ignored_and_its_file_removed(tmp_path: Path) -> None:
    """kill -9 leaves the file; readers skip it (the pid is dead) and remove it."""
    with _publishing_process(tmp_path, "wait") as proc:
        try:
            [document] = inspector.read_published(str(tmp_path))
            assert document["pid"] == proc.pid
            assert len(document["connections"]) == 1
        finally:
            proc.kill()
            proc.wait(timeout=30)
    assert (tmp_path / f"{proc.pid}.json").exists()
    assert inspector.read_published(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


def test_a_reused_pid_is_not_mistaken_for_the_writer(tmp_path: Path) -> None:
    """A file whose pid now belongs to another process (another start time) is ignored."""
    document = {
        "version": publish.VERSION,
        "host": publish.socket.gethostname(),
        "pid": os.getpid(),  # alive, but started at another time than the file says
        "start_time": (publish.process_start_time(os.getpid()) or 0) + 1,
        "connections": [],
    }
    (tmp_path / f"{os.getpid()}.json").write_text(json.dumps(document))
    assert inspector.read_published(str(tmp_path), clean=False) == []


def test_default_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Inside PROMETHEUS_MULTIPROC_DIR when set, else conndiag-<uid> in /dev/shm (memory),
    else in the temporary directory."""
    from conndiag.conf import parse

    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert publish.directory(parse({})) == str(tmp_path / "conndiag-connections")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    assert publish.directory(parse({})) == f"/dev/shm/conndiag-{os.getuid()}"  # Linux: tmpfs
    monkeypatch.setattr(publish, "SHM", str(tmp_path / "no-shm"))
    assert publish.directory(parse({})).endswith(f"conndiag-{os.getuid()}")
    assert publish.directory(parse({})).startswith(publish.tempfile.gettempdir())
    assert publish.directory(parse({"INSPECTOR_DIR": "/run/x"})) == "/run/x"


def test_publishing_can_be_turned_off(tmp_path: Path) -> None:
    """CONNDIAG['INSPECTOR'] = False: no publisher, no file."""
    with override_settings(CONNDIAG={"INSPECTOR": False, "INSPECTOR_DIR": str(tmp_path)}):
        assert not any(isinstance(r, publish.Publisher) for r in runtime.get().recorders)
        db = connections.create_connection("default")
        db.ensure_connection()
        db.close()
    assert list(tmp_path.iterdir()) == []


def test_readers_skip_broken_files(tmp_path: Path) -> None:
    """Truncated JSON, another format version, entries without the fields the join needs:
    skipped, never a crash."""
    alive = {
        "version": publish.VERSION,
        "host": publish.socket.gethostname(),
        "pid": os.getpid(),
        "start_time": publish.process_start_time(os.getpid()),
    }
    (tmp_path / "1.json").write_text('{"version": 1, "conn')
    (tmp_path / "2.json").write_text(json.dumps({**alive, "version": 99, "connections": []}))
    broken = [{"server_id": 5}, "junk", {"opened_at": "x", "target": "t", "server_id": 6}]
    (tmp_path / f"{os.getpid()}.json").write_text(json.dumps({**alive, "connections": broken}))
    documents = inspector.read_published(str(tmp_path), clean=False)
    assert [d["pid"] for d in documents] == [os.getpid()]
    assert inspector.owned(documents) == {}


def test_a_removed_directory_is_made_again(pubdir: Path) -> None:
    """A deploy that empties the directory under a running process: the next write recreates
    it (private again)."""
    import shutil

    db = connections.create_connection("default")
    try:
        with db.cursor() as cursor:
            cursor.execute("SELECT 1")
        shutil.rmtree(pubdir)
        publisher().publish()
        assert stat.S_IMODE(pubdir.stat().st_mode) == 0o700
        assert entry_of(my_file(pubdir), db)
    finally:
        db.close()
