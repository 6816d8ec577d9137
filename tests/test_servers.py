"""The server harness of ``tests/servers.py``: real uWSGI, gunicorn and uvicorn start, serve
from the number of worker processes asked for, and stop (no process left behind)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import servers

pytestmark = pytest.mark.slow

SITE = {"DJANGO_SETTINGS_MODULE": "tests.multiproc.settings"}


def _pids_serving(server: servers.Server, requests: int = 40) -> set[int]:
    return {int(json.loads(server.get("/pid/"))["pid"]) for _ in range(requests)}


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("uwsgi", {}),
        ("uwsgi", {"lazy_apps": True, "enable_threads": True, "py_call_osafterfork": True}),
        ("gunicorn", {"preload": True}),
        ("uvicorn", {}),
    ],
    ids=["uwsgi", "uwsgi-lazy-threads-osafterfork", "gunicorn-preload", "uvicorn"],
)
def test_server_serves_from_its_workers_and_stops(
    kind: str, options: dict[str, bool], tmp_path: Path
) -> None:
    """Every request is answered by one of the server's own worker processes, and stopping
    it leaves no process behind; the log is captured."""
    processes = 1 if kind == "uvicorn" else 2
    with servers.running(
        kind,
        "tests.multiproc.wsgi:application"
        if kind != "uvicorn"
        else "tests.multiproc.asgi:application",
        tmp_path,
        processes=processes,
        env=SITE,
        ready_path="/pid/",
        **options,
    ) as server:
        workers = server.workers()
        served = _pids_serving(server)
        pids = {server.proc.pid, *workers}
    if processes > 1:
        assert len(workers) == processes
        assert served <= workers
    else:
        assert served == {server.proc.pid}
    assert server.proc.returncode is not None
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    assert server.log_path == tmp_path / f"{kind}.log"
    assert server.log_path.exists()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_options_a_server_does_not_have_are_refused() -> None:
    """Asking gunicorn for lazy-apps (a uWSGI option) is an error, not a silent no-op."""
    with pytest.raises(ValueError, match="lazy_apps"):
        servers.command("gunicorn", "x:y", 1, lazy_apps=True)
    with pytest.raises(ValueError, match="--preload"):
        servers.command("uwsgi", "x:y", 1, preload=True)


def test_env_reaches_the_server_and_its_workers(tmp_path: Path) -> None:
    """Variables passed as ``env`` are in the environment of the server and its workers."""
    with servers.running(
        "uwsgi",
        "tests.multiproc.wsgi:application",
        tmp_path,
        processes=2,
        env={**SITE, "CONNDIAG_SERVERS_TEST": "42"},
        ready_path="/pid/",
    ) as server:
        for pid in {server.proc.pid, *server.workers()}:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert b"CONNDIAG_SERVERS_TEST=42" in environ
