"""Worker churn against one multi-process directory, for the archive's tests and benchmark.

    PROMETHEUS_MULTIPROC_DIR=<dir> python -m tests.multiproc.churn <json options>

Run in a fresh, single-threaded process (it forks; prometheus_client must see the variable
before it is imported). It forks ``workers`` short-lived worker processes, at most
``concurrency`` at a time: each one sweeps the directory at its start (as a conndiag worker
does), adds a known amount to a counter and a histogram and sets a ``livesum`` gauge, then
exits (every ``kill_every``-th one kills itself with SIGKILL instead). Meanwhile ``scrapers``
processes sweep and collect in a loop, as conndiag's view does, and check that every scrape
is a plausible one: the totals never go down and never exceed what the workers added.
It prints one JSON line: the expected and the final totals, the scrapes, the files left.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from conndiag.multiprocess import collector_class, sweep

PATH = os.environ["PROMETHEUS_MULTIPROC_DIR"]
registry = CollectorRegistry()
JOBS = Counter("churn_jobs_total", "Jobs.", ["kind"], registry=registry)
LATENCY = Histogram("churn_latency_seconds", "Latency.", ["kind"], registry=registry)
BUSY = Gauge("churn_busy", "Busy.", ["kind"], multiprocess_mode="livesum", registry=registry)
KINDS = ("a", "b", "c")


def amount(i: int) -> int:
    return 1 + i % 7


def totals() -> dict[str, float]:
    """Sum of the counter, the histogram's count and the live gauge across the directory."""
    r = CollectorRegistry()
    collector_class()(r, path=PATH)
    out = {"jobs": 0.0, "observed": 0.0, "busy": 0.0}
    for family in r.collect():
        for s in family.samples:
            if s.name == "churn_jobs_total":
                out["jobs"] += s.value
            elif s.name == "churn_latency_seconds_count":
                out["observed"] += s.value
            elif s.name == "churn_busy":
                out["busy"] += s.value
    return out


def worker(i: int, kill: bool) -> None:
    sweep(PATH)
    kind = KINDS[i % len(KINDS)]
    BUSY.labels(kind).set(1)
    for _ in range(amount(i)):
        JOBS.labels(kind).inc()
        LATENCY.labels(kind).observe(0.01 * (i % 5))
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(0)


def scraper(expected: int, stop_file: str, out_fd: int) -> None:
    last = {"jobs": 0.0, "observed": 0.0}
    scrapes = bad = 0
    while not os.path.exists(stop_file):
        sweep(PATH)
        now = totals()
        scrapes += 1
        for key in last:
            if now[key] < last[key] or now[key] > expected:
                bad += 1
            last[key] = now[key]
    os.write(out_fd, json.dumps({"scrapes": scrapes, "bad": bad}).encode() + b"\n")
    os._exit(0)


def _child(fn: Any, *args: Any) -> None:
    """Run ``fn`` in a forked child; it never returns into the parent's code."""
    try:
        fn(*args)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def main(options: dict[str, Any]) -> dict[str, Any]:
    workers = int(options.get("workers", 100))
    concurrency = int(options.get("concurrency", 4))
    scrapers = int(options.get("scrapers", 2))
    kill_every = int(options.get("kill_every", 3))
    sweeping = bool(options.get("sweep", True))
    expected = sum(amount(i) for i in range(workers))
    read_fd, write_fd = os.pipe()
    stop_file = PATH.rstrip("/") + ".stop"
    if os.path.exists(stop_file):
        os.unlink(stop_file)
    scraper_pids = []
    for _ in range(scrapers):
        pid = os.fork()
        if pid == 0:
            _child(scraper, expected, stop_file, write_fd)
        scraper_pids.append(pid)
    running: set[int] = set()
    started = time.perf_counter()
    for i in range(workers):
        while len(running) >= concurrency:
            pid, _ = os.wait()
            running.discard(pid)
            if pid in scraper_pids:
                scraper_pids.remove(pid)  # it failed: its report is missing
        pid = os.fork()
        if pid == 0:
            if not sweeping:
                globals()["sweep"] = lambda path: 0
            _child(worker, i, kill_every > 0 and i % kill_every == 0)
        running.add(pid)
    for pid in running:
        os.waitpid(pid, 0)
    churn_s = time.perf_counter() - started
    with open(stop_file, "w"):
        pass
    os.close(write_fd)
    for pid in scraper_pids:
        os.waitpid(pid, 0)
    with os.fdopen(read_fd) as lines:
        reports = [json.loads(line) for line in lines]
    os.unlink(stop_file)
    result: dict[str, Any] = {"expected": expected, "churn_s": churn_s, "scrapers": reports}
    result["files_before_final_sweep"] = len(os.listdir(PATH))
    scrape_start = time.perf_counter()
    if sweeping:
        sweep(PATH)
    final = totals()
    result["final_scrape_ms"] = (time.perf_counter() - scrape_start) * 1e3
    result.update(final)
    result["files"] = sorted(os.listdir(PATH))
    return result


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
