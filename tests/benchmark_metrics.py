"""Cost of conndiag's metrics machinery: scrape time under worker churn, flushes, pushes.

    python tests/benchmark_metrics.py [--lifetimes 100,1000] [--threads 10000]

Reports, medians in milliseconds or microseconds:

- **scrape time against the number of dead workers**, before (prometheus_client's own
  ``MultiProcessCollector`` over the directory as it leaves it: one set of files per worker
  that ever lived) and after (conndiag's view: sweep, then its ``ArchiveCollector``). Each
  worker lifetime is a real forked process that runs queries through conndiag on SQLite
  and exits; "after" workers sweep at their start, as conndiag workers do;
- **one metrics flush with 10^4 ended threads** (each ran one query and ended);
- the recorder's cost per query, and the push at the end of a request.

MySQL is not needed. Run it on a quiet machine: the figures are medians of a few rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHURN = r"""
import json, os, sys, time
import django
django.setup()
from django.db import connections
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from conndiag import metrics
from conndiag.multiprocess import collector_class, sweep

lifetimes, sweeping = int(sys.argv[1]), sys.argv[2] == "after"
path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
if not sweeping:
    metrics.sweep_dead_workers = lambda: None  # prometheus_client's behaviour: keep all
with connections["default"].cursor() as c:
    c.execute("SELECT 1")  # the runtime and metrics exist before the forks (a master)
connections["default"].close()
metrics.flush_all_quietly()
for _ in range(lifetimes):
    pid = os.fork()
    if pid == 0:
        db = connections["default"]
        for _ in range(5):
            with db.cursor() as c:
                c.execute("SELECT 1")
        db.close()
        metrics.flush_all_quietly()
        os._exit(0)
    os.waitpid(pid, 0)

def scrape():
    start = time.perf_counter()
    registry = CollectorRegistry()
    if sweeping:
        sweep(path)
        collector_class()(registry, path=path)
    else:
        MultiProcessCollector(registry, path=path)
    text = generate_latest(registry)
    return (time.perf_counter() - start) * 1e3, text

first, text = scrape()
times = sorted(scrape()[0] for _ in range(5))
queries = sum(
    float(line.rsplit(" ", 1)[1])
    for line in text.decode().splitlines()
    if line.startswith("conndiag_queries_total{")
)
print(json.dumps({
    "first_ms": first, "median_ms": times[2], "files": len(os.listdir(path)),
    "queries": queries, "expected": 5 * lifetimes + 1,
}))
"""


def churn(lifetimes: int, mode: str) -> dict[str, float]:
    path = tempfile.mkdtemp(prefix="conndiag-bench-mp-")
    try:
        env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": path,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "PYTHONPATH": str(ROOT),
        }
        out = subprocess.run(
            [sys.executable, "-c", CHURN, str(lifetimes), mode],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]
    finally:
        shutil.rmtree(path, ignore_errors=True)


def threads_and_pushes(n_threads: int) -> dict[str, float]:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.db import connections
    from prometheus_client import CollectorRegistry

    from conndiag import conf, threads
    from conndiag.metrics import MetricsRecorder, request_ended
    from conndiag.records import Query
    from conndiag.state import state_of

    db = connections["default"]
    with db.cursor() as cursor:
        cursor.execute("SELECT 1")
    state = state_of(db)
    registry = CollectorRegistry()
    recorder = MetricsRecorder(conf.get_config(), registry=registry)
    metrics = recorder.metrics

    def query() -> Query:
        q = Query(db, state, threads.current(), "background", None, "ignore", "SELECT 1", None,
                  False, 0.5)  # fmt: skip
        q.duration = 0.0003
        return q

    results: dict[str, float] = {}
    flushes = []
    for _ in range(3):
        metrics.flush()
        started = [
            threading.Thread(target=lambda: recorder.query(query())) for _ in range(n_threads)
        ]
        for t in started:
            t.start()
        for t in started:
            t.join()
        del started
        t0 = time.perf_counter()
        metrics.flush()
        flushes.append((time.perf_counter() - t0) * 1e3)
    results["flush_ms_after_dead_threads"] = statistics.median(flushes)
    results["live_holders_after"] = len(metrics._live)
    counted = registry.get_sample_value(
        "conndiag_queries_total",
        {"alias": "default", "vendor": "sqlite", "context": "background", "action": "observed"},
    )
    results["counted"] = counted or 0.0
    results["expected"] = 3.0 * n_threads

    q = query()
    n = 200_000
    rounds = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            recorder.query(q)
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    results["recorder_query_us"] = statistics.median(rounds)
    metrics.flush()
    rounds = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n // 10):
            request_ended(time.perf_counter())
        rounds.append((time.perf_counter() - t0) / (n // 10) * 1e6)
    results["request_end_nothing_pending_us"] = statistics.median(rounds)
    rounds = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n // 10):
            recorder.query(q)
            request_ended(time.perf_counter())
        rounds.append((time.perf_counter() - t0) / (n // 10) * 1e6)
    results["request_end_one_query_pending_us"] = (
        statistics.median(rounds) - results["recorder_query_us"]
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lifetimes", default="100,1000")
    parser.add_argument("--threads", type=int, default=10_000)
    args = parser.parse_args()
    print("conndiag metrics benchmark")
    print(f"Python {sys.version.split()[0]}\n")
    print(
        f"{'dead workers':>12} {'mode':>7} {'first scrape':>13} {'scrape':>9} {'files':>6}  exact"
    )
    for lifetimes in (int(x) for x in args.lifetimes.split(",")):
        for mode in ("before", "after"):
            r = churn(lifetimes, mode)
            exact = "yes" if r["queries"] == r["expected"] else f"NO ({r['queries']})"
            print(
                f"{lifetimes:>12} {mode:>7} {r['first_ms']:>10.1f} ms {r['median_ms']:>6.1f} ms "
                f"{int(r['files']):>6}  {exact}"
            )
    r = threads_and_pushes(args.threads)
    print()
    print(f"one flush after {args.threads} threads ran a query and ended: "
          f"{r['flush_ms_after_dead_threads']:.2f} ms (counted {r['counted']:.0f} of "
          f"{r['expected']:.0f}; live holders left: {r['live_holders_after']:.0f})")  # fmt: skip
    print(f"recorder, per query: {r['recorder_query_us']:.2f} µs")
    print(f"request end, nothing pending: {r['request_end_nothing_pending_us']:.2f} µs")
    print(f"request end, one query pending (push): {r['request_end_one_query_pending_us']:.2f} µs")


if __name__ == "__main__":
    main()
