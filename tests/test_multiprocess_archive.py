"""conndiag.multiprocess: dead workers' files are archived exactly, under churn and crashes.

Most tests write prometheus_client's per-process files directly (its own ``MmapedDict``
format) for pids that do not exist, then read the directory with prometheus_client's
``MultiProcessCollector`` logic; the hammer test runs real forked worker processes and
concurrent scrapers (``tests/multiproc/churn.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from conndiag import multiprocess
from conndiag.multiprocess import Manifest, alive, collector_class, sweep, visible_files

ROOT = Path(__file__).resolve().parent.parent


def _dead_pid(start: int) -> int:
    pid = start
    while alive(pid):
        pid += 1
    return pid


DEAD = [_dead_pid(4_190_000 + 10 * i) for i in range(3)]


def _write(path: Path, prefix: str, pid: int | str, values: dict[tuple[str, str], float]) -> None:
    """A per-process file: ``values`` maps (metric name, sample name) -> value, label w=x."""
    d = MmapedDict(str(path / f"{prefix}_{pid}.db"))
    for (metric, sample), value in values.items():
        d.write_value(mmap_key(metric, sample, ["w"], ["x"], "help"), value, 0.0)
    d.close()


def _populate(path: Path, pid: int, n: float) -> None:
    _write(path, "counter", pid, {("jobs", "jobs_total"): n})
    _write(
        path,
        "histogram",
        pid,
        {("lat", "lat_bucket"): n, ("lat", "lat_sum"): 0.5 * n},
    )
    _write(path, "gauge_livesum", pid, {("busy", "busy"): 1.0})
    _write(path, "gauge_max", pid, {("peak", "peak"): n})


def _samples(path: Path, collector: Any = None) -> dict[str, float]:
    registry = CollectorRegistry()
    (collector or MultiProcessCollector)(registry, path=str(path))
    return {
        s.name + json.dumps(s.labels, sort_keys=True): s.value
        for family in registry.collect()
        for s in family.samples
    }


def test_dead_pids_are_found_and_live_ones_kept(tmp_path: Path) -> None:
    """Files of a pid that does not exist are dead; this process's are alive."""
    _populate(tmp_path, DEAD[0], 1)
    _populate(tmp_path, os.getpid(), 1)
    assert multiprocess.dead_pids(str(tmp_path)) == {DEAD[0]}


def test_a_zombie_is_dead() -> None:
    """A child that exited but was not reaped yet still answers kill(pid, 0): it is dead."""
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive(child.pid)
    child.wait()


def test_sweep_archives_dead_processes_exactly(tmp_path: Path) -> None:
    """Three dead processes and a live one: after the sweep every counter and histogram
    total is unchanged, the dead ones' live gauges are gone, max gauges are combined, and
    the directory holds the live process's files plus one archive per type."""
    path = str(tmp_path)
    for i, pid in enumerate(DEAD):
        _populate(tmp_path, pid, i + 1)
    _populate(tmp_path, os.getpid(), 10)
    before = _samples(tmp_path)
    assert sweep(path) == 3
    after = _samples(tmp_path, collector_class())
    busy = 'busy{"w": "x"}'
    assert before.pop(busy) == 4 and after.pop(busy) == 1  # only the live process's
    assert after == before
    assert after['jobs_total{"w": "x"}'] == 16
    assert after['peak{"w": "x"}'] == 10
    names = sorted(os.listdir(path))
    pid = os.getpid()
    assert names == sorted(
        [
            "conndiag-archive.manifest",
            "conndiag.lock",
            "counter_archive1.db",
            "gauge_max_archive1.db",
            "histogram_archive1.db",
            f"counter_{pid}.db",
            f"gauge_livesum_{pid}.db",
            f"gauge_max_{pid}.db",
            f"histogram_{pid}.db",
        ]
    )
    # The plain collector (another exporter) reads the same totals from the archive.
    assert {k: v for k, v in _samples(tmp_path).items() if k != busy} == after
    assert sweep(path) == 0  # nothing left to do


def test_successive_sweeps_accumulate(tmp_path: Path) -> None:
    """Each sweep adds the newly dead to the archive of the previous ones: no loss."""
    path = str(tmp_path)
    for i, pid in enumerate(DEAD):
        _populate(tmp_path, pid, i + 1)
        assert sweep(path) == 1
        assert _samples(tmp_path, collector_class())['jobs_total{"w": "x"}'] == sum(range(1, i + 2))
    assert Manifest.read(path).generation == 3
    assert len(list(tmp_path.glob("counter_*.db"))) == 1


def test_interrupted_sweep_is_neither_lost_nor_double_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep killed right after its commit (the manifest renamed, the dead files still
    there, the new archive not renamed yet): the manifest-aware collector reads exact
    totals meanwhile, and the next sweep finishes the job."""
    path = str(tmp_path)
    _populate(tmp_path, DEAD[0], 1)
    assert sweep(path) == 1
    _populate(tmp_path, DEAD[1], 2)
    expected = 3.0

    calls = {"n": 0}
    original = multiprocess._finish

    def killed_after_commit(p: str, manifest: Manifest) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the call right after the new manifest was written
            raise KeyboardInterrupt
        original(p, manifest)

    monkeypatch.setattr(multiprocess, "_finish", killed_after_commit)
    with pytest.raises(KeyboardInterrupt):
        sweep(path)
    monkeypatch.setattr(multiprocess, "_finish", original)
    names = os.listdir(path)
    assert f"counter_{DEAD[1]}.db" in names  # absorbed, not deleted yet
    assert "counter_archive2.tmp" in names and "counter_archive1.db" in names
    assert _samples(tmp_path, collector_class())['jobs_total{"w": "x"}'] == expected
    assert multiprocess._unfinished(path)
    assert sweep(path) == 0  # finishes the interrupted one; nobody new is dead
    assert not multiprocess._unfinished(path)
    assert sorted(n for n in os.listdir(path) if n.startswith("counter")) == ["counter_archive2.db"]
    assert _samples(tmp_path, collector_class())['jobs_total{"w": "x"}'] == expected
    assert _samples(tmp_path)['jobs_total{"w": "x"}'] == expected


def test_gauges_in_mode_all_are_left_alone(tmp_path: Path) -> None:
    """A dead process's gauge in mode ``all`` keeps its file (its pid label is the point)."""
    _write(tmp_path, "gauge_all", DEAD[0], {("temp", "temp"): 3.0})
    _populate(tmp_path, DEAD[0], 1)
    assert sweep(str(tmp_path)) == 1
    assert (tmp_path / f"gauge_all_{DEAD[0]}.db").exists()
    assert _samples(tmp_path, collector_class())[f'temp{{"pid": "{DEAD[0]}", "w": "x"}}'] == 3


def test_an_empty_file_being_created_is_skipped(tmp_path: Path) -> None:
    """prometheus_client creates a file, then sizes it: a scrape in between skips it, and a
    process killed in between leaves a file the sweep archives as empty."""
    (tmp_path / f"counter_{DEAD[0]}.db").touch()
    (tmp_path / f"counter_{os.getpid()}.db").touch()
    assert str(tmp_path / f"counter_{os.getpid()}.db") not in visible_files(str(tmp_path))
    assert sweep(str(tmp_path)) == 1
    assert _samples(tmp_path, collector_class()) == {}


def test_concurrent_churn_and_scrapes_keep_exact_totals(tmp_path: Path) -> None:
    """100 real worker processes (6 at a time, every third killed with SIGKILL), each
    sweeping at its start, while two scrapers sweep and collect in a loop: no scrape ever
    goes down or above the total, the final totals are exact, and the directory ends with
    the archive only."""
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp_dir), "PYTHONPATH": str(ROOT)}
    options = {"workers": 100, "concurrency": 6, "scrapers": 2, "kill_every": 3}
    result = subprocess.run(
        [sys.executable, "-m", "tests.multiproc.churn", json.dumps(options)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert out["jobs"] == out["observed"] == out["expected"] == 395
    assert out["busy"] == 0
    assert len(out["scrapers"]) == 2
    assert all(s["scrapes"] > 0 and s["bad"] == 0 for s in out["scrapers"]), out["scrapers"]
    assert sorted(out["files"])[:2] == ["conndiag-archive.manifest", "conndiag.lock"]
    assert len(out["files"]) == 4, out["files"]


FORKED_WORKERS = textwrap.dedent("""
    import os, sys
    import django
    django.setup()
    from django.db import connections
    from conndiag import metrics
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]

    def query():
        with connections["default"].cursor() as c:  # in-memory SQLite: kept across fork
            c.execute("SELECT 1")

    query()
    metrics.flush_all_quietly()
    pids = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            query()
            metrics.flush_all_quietly()  # the worker's first full flush: its start sweep
            os._exit(0)
        os.waitpid(pid, 0)
        pids.append(pid)
    import re
    left = {int(m[1]) for n in os.listdir(path) if (m := re.search(r"_(\\d+)\\.db$", n))}
    print(sorted(left & set(pids)), len(pids))
""")


def test_a_forked_worker_sweeps_at_its_first_flush(tmp_path: Path) -> None:
    """Workers forked from a master that already built the metrics, whose first query uses
    a connection they did not open (in-memory SQLite): each one sweeps its dead
    predecessors at its first full flush, so only the last one's files remain."""
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        [sys.executable, "-c", FORKED_WORKERS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    left, forked = result.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert int(forked) == 3
    assert len(json.loads(left)) == 1  # the last worker's: nobody swept after it


def test_files_a_process_created_just_before_dying_are_archived(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that creates its histogram file after the sweep first listed the directory
    and dies before the liveness check: its histogram is archived, not deleted unmerged
    (found by the hammer test under load: a worker's histogram, or all its files, lost)."""
    _write(tmp_path, "gauge_livesum", DEAD[0], {("busy", "busy"): 1.0})  # created first
    real_alive = multiprocess.alive
    checks = {"n": 0}

    def dies_after_writing(pid: int) -> bool:
        checks["n"] += 1
        if checks["n"] == 2:  # the check under the lock, after the directory was listed
            _write(tmp_path, "counter", pid, {("jobs", "jobs_total"): 5.0})
            _write(tmp_path, "histogram", pid, {("lat", "lat_bucket"): 5.0})
        return real_alive(pid)

    monkeypatch.setattr(multiprocess, "alive", dies_after_writing)
    assert sweep(str(tmp_path)) == 1
    samples = _samples(tmp_path, collector_class())
    assert samples['jobs_total{"w": "x"}'] == 5
    assert samples['lat_bucket{"w": "x"}'] == 5
