"""Memory of conndiag under many short-lived threads and many queries (not a timed test).

    python tests/benchmark_memory.py [--threads 10000] [--queries 1000000] [--vendors sqlite,mysql]

Two phases, in one process, with conndiag installed as a project would (metrics on, the
production logging default: structlog's filtering logger at INFO, here into /dev/null):

1. ``--threads`` short-lived threads, one after another, each running one query on its own
   connection and ending *without closing it* (the pattern that leaks: nothing recycles a
   thread's connection). Their connections die with the threads, at the next garbage
   collection, and are reported ``abandoned``.
2. ``--queries`` queries (``cursor.execute("SELECT 1")``) on one persistent connection.

At each checkpoint (after ``gc.collect()`` and a metrics flush, as a scrape would run one)
it prints the live conndiag state (``ConnState``, ``ThreadInfo`` and ``RequestScope``
objects), the ``conndiag_connections_open`` gauge, Python's allocated memory blocks
(``sys.getallocatedblocks()``) and the process's resident memory. Flat means: the state
counts stay at what the live threads and connections need (one connection, one thread), and
the memory figures stop growing after the first checkpoint. It also times one metrics flush
right after the threads ended (the pruning of their accumulators) and the next one.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

CHECKPOINTS = 10


def rss_mb() -> float:
    """Resident memory of this process, in MB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def live(cls: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is cls)


class Probe:
    """Takes the checkpoint figures."""

    def __init__(self, alias: str) -> None:
        from django.db import connections

        from conndiag.scope import RequestScope
        from conndiag.state import ConnState
        from conndiag.threads import ThreadInfo

        self.alias = alias
        self.vendor = connections[alias].vendor
        self.classes = (ConnState, ThreadInfo, RequestScope)
        self.rows: list[dict[str, Any]] = []

    def open_gauge(self) -> float | None:
        from prometheus_client import REGISTRY

        labels = {"alias": self.alias, "vendor": self.vendor}
        return REGISTRY.get_sample_value("conndiag_connections_open", labels)

    def take(self, phase: str, done: int) -> dict[str, Any]:
        from conndiag import metrics
        from conndiag.lifecycle import report_abandoned

        gc.collect()
        report_abandoned()  # the next safe point (a query, a connect) would do it
        metrics.flush()
        gc.collect()
        row = {
            "phase": phase,
            "done": done,
            "ConnState": live(self.classes[0]),
            "ThreadInfo": live(self.classes[1]),
            "RequestScope": live(self.classes[2]),
            "open": self.open_gauge(),
            "blocks": sys.getallocatedblocks(),
            "rss_mb": rss_mb(),
        }
        # Keep the first checkpoint after start-up and the latest (so the probe's own
        # bookkeeping does not grow with the run).
        self.rows[2:] = []
        self.rows.append(row)
        print(
            f"{phase:<8}{done:>10}{row['ConnState']:>11}{row['ThreadInfo']:>12}"
            f"{row['RequestScope']:>14}{row['open'] or 0:>7.0f}{row['blocks']:>12}"
            f"{row['rss_mb']:>10.1f}",
            flush=True,
        )
        return row


def setup(vendors: list[str]) -> None:
    import logging

    import structlog

    from tests.benchmark import setup_django

    setup_django(vendors)
    structlog.configure(
        processors=[structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.WriteLoggerFactory(open(os.devnull, "w")),  # noqa: SIM115
        cache_logger_on_first_use=True,
    )


def run_threads(probe: Probe, n: int) -> tuple[float, float]:
    """Phase 1; returns the durations of the first two metrics flushes afterwards (ms)."""
    from django.db import connections

    from conndiag import metrics

    def work() -> None:
        with connections[probe.alias].cursor() as cursor:
            cursor.execute("SELECT 1")

    step = max(1, n // CHECKPOINTS)
    flushes: list[float] = []
    for i in range(1, n + 1):
        t = threading.Thread(target=work, name=f"short-{i}")
        t.start()
        t.join()
        if i == n:
            for _ in range(2):  # the first prunes every dead thread's numbers
                start = time.perf_counter()
                metrics.flush()
                flushes.append((time.perf_counter() - start) * 1e3)
        if i % step == 0 or i == n:
            probe.take("threads", i)
    return flushes[0], flushes[1]


def run_queries(probe: Probe, n: int) -> None:
    from django.db import connections

    db = connections[probe.alias]
    db.settings_dict["CONN_MAX_AGE"] = None
    step = max(1, n // CHECKPOINTS)
    with db.cursor() as cursor:
        done = 0
        while done < n:
            for _ in range(min(step, n - done)):
                cursor.execute("SELECT 1")
            done += min(step, n - done)
            probe.take("queries", done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=1_000_000)
    parser.add_argument("--vendors", default="sqlite")
    args = parser.parse_args()
    vendors = args.vendors.split(",")
    setup(vendors)
    import django
    from django.db import connections

    print(f"Python {sys.version.split()[0]}, Django {django.get_version()}")
    for vendor in vendors:
        alias = "default" if vendor == "sqlite" else "mysql"
        probe = Probe(alias)
        print(f"\n{vendor}: {args.threads} short-lived threads, then {args.queries} queries")
        print(
            f"{'phase':<8}{'done':>10}{'ConnState':>11}{'ThreadInfo':>12}{'RequestScope':>14}"
            f"{'open':>7}{'blocks':>12}{'rss_mb':>10}"
        )
        probe.take("start", 0)
        first, second = run_threads(probe, args.threads)
        print(
            f"metrics flush after {args.threads} dead threads: {first:.2f} ms, next {second:.2f} ms"
        )
        run_queries(probe, args.queries)
        rows = probe.rows
        base = rows[1]  # the first checkpoint after start-up allocations
        last = rows[-1]
        live_connections = sum(1 for c in connections.all() if c.connection is not None)
        print(
            f"{vendor} summary: {live_connections} connections open on the main thread; state "
            f"at the end {last['ConnState']} ConnState, "
            f"{last['ThreadInfo']} ThreadInfo, {last['RequestScope']} RequestScope; open gauge "
            f"{last['open'] or 0:.0f}; blocks {last['blocks'] - base['blocks']:+d} and RSS "
            f"{last['rss_mb'] - base['rss_mb']:+.1f} MB since the first checkpoint"
        )
        connections_close(alias)


def connections_close(alias: str) -> None:
    from django.db import connections

    connections[alias].close()


if __name__ == "__main__":
    main()
