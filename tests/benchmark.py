"""Per-query and per-request overhead of conndiag against bare Django, in one process.

    python tests/benchmark.py [--rounds 41] [--queries 500] [--requests 100] [--vendors sqlite,mysql]
    nox -s bench   (the same, in the main environment)

Every round runs every variant once, in a shuffled order (interleaved), and the report gives
the median per-query / per-request time of each variant and its overhead over bare Django:

- ``bare``: conndiag's wrapper, signals and middleware removed (plain Django);
- ``filtered``: conndiag on, metrics on, per-query events filtered out by level (the
  production default: structlog's filtering logger at INFO, query events at DEBUG);
- ``no-metrics``: as ``filtered`` with ``METRICS=False``;
- ``json-log``: every query logged as a JSON line to a file (structlog JSONRenderer).

Workloads: a bare ``cursor.execute("SELECT 1")`` through Django's cursor (the wrapper's own
cost, with the least noise around it), an ORM query outside a request
(``Item.objects.filter(pk=1).first()``), the same query inside a request through the WSGI
handler (a view running 10 of them), and an empty request. Many short rounds keep the
machine's drift out of the comparison. MySQL needs the server of ``CONNDIAG_TEST_MYSQL_URL`` (default 127.0.0.1:3306).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

VARIANTS = ("bare", "filtered", "no-metrics", "json-log")
QUERIES_PER_REQUEST = 10


def setup_django(vendors: list[str]) -> None:
    import django
    from django.conf import settings

    if "mysql" in vendors:
        import MySQLdb

        db = settings.DATABASES["mysql"]
        conn = MySQLdb.connect(
            host=db["HOST"], port=int(db["PORT"]), user=db["USER"], password=db["PASSWORD"]
        )
        conn.cursor().execute("CREATE DATABASE IF NOT EXISTS conndiag_bench")
        conn.close()
        db["NAME"] = "conndiag_bench"
    django.setup()
    from django.core.management import call_command

    for alias in ("default", "mysql") if "mysql" in vendors else ("default",):
        call_command("migrate", run_syncdb=True, database=alias, verbosity=0)


class Switch:
    """Turns conndiag on and off in this process, for interleaved comparison."""

    def __init__(self, log_path: str) -> None:
        from django.core.handlers.wsgi import WSGIHandler
        from django.test.utils import override_settings

        from conndiag.middleware import ConnDiagMiddleware  # noqa: F401 - import check

        self.log_file = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self.with_mw = WSGIHandler()
        mw = [m for m in __import__("django.conf").conf.settings.MIDDLEWARE if "conndiag" not in m]
        with override_settings(MIDDLEWARE=mw):
            self.without_mw = WSGIHandler()

    def apply(self, variant: str) -> Callable[..., object]:
        import logging

        import structlog
        from django.core.signals import request_finished, request_started
        from django.db import connections

        from conndiag import conf, runtime, scope
        from conndiag.wrapper import EXECUTE_WRAPPER

        on = variant != "bare"
        for alias in connections:
            wrappers = connections[alias].execute_wrappers
            if on and EXECUTE_WRAPPER not in wrappers:
                wrappers.insert(0, EXECUTE_WRAPPER)
            if not on and EXECUTE_WRAPPER in wrappers:
                wrappers.remove(EXECUTE_WRAPPER)
        if on:
            request_started.connect(scope.on_request_started, dispatch_uid="conndiag.started")
            request_finished.connect(scope.on_request_finished, dispatch_uid="conndiag.finished")
        else:
            request_started.disconnect(dispatch_uid="conndiag.started")
            request_finished.disconnect(dispatch_uid="conndiag.finished")
        if variant == "json-log":
            structlog.configure(
                processors=[
                    structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso"),
                    structlog.processors.JSONRenderer(),
                ],
                wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
                logger_factory=structlog.WriteLoggerFactory(self.log_file),
                cache_logger_on_first_use=True,
            )
        else:
            structlog.configure(
                processors=[structlog.processors.JSONRenderer()],
                wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
                logger_factory=structlog.WriteLoggerFactory(self.log_file),
                cache_logger_on_first_use=True,
            )
        conf._cached = conf.parse({"METRICS": variant != "no-metrics"})
        runtime.reset()
        return self.with_mw if on else self.without_mw

    def close(self) -> None:
        self.log_file.close()


def cursor_loop(alias: str, n: int) -> float:
    from django.db import connections

    with connections[alias].cursor() as cursor:
        start = time.perf_counter()
        for _ in range(n):
            cursor.execute("SELECT 1")
        return (time.perf_counter() - start) / n


def query_loop(alias: str, n: int) -> float:
    from tests.testapp.models import Item

    manager = Item.objects.using(alias)
    start = time.perf_counter()
    for _ in range(n):
        manager.filter(pk=1).first()
    return (time.perf_counter() - start) / n


def request_loop(handler: Callable[..., object], path: str, query: str, n: int) -> float:
    from wsgiref.util import setup_testing_defaults

    def start_response(status: str, headers: object, exc_info: object = None) -> None:
        return None

    start = time.perf_counter()
    for _ in range(n):
        environ = {"PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": "GET"}
        setup_testing_defaults(environ)
        response = handler(environ, start_response)  # type: ignore[operator]
        for _chunk in response:  # type: ignore[attr-defined]
            pass
        response.close()  # type: ignore[attr-defined]
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--vendors", default="sqlite,mysql")
    args = parser.parse_args()
    vendors = args.vendors.split(",")
    setup_django(vendors)

    from django.db import connections

    from tests.testapp import views

    views.BENCH_QUERIES = QUERIES_PER_REQUEST
    log_path = os.path.join(tempfile.mkdtemp(prefix="conndiag-bench-"), "queries.jsonl")
    switch = Switch(log_path)
    workloads: dict[str, Callable[[Callable[..., object]], float]] = {}
    for vendor in vendors:
        alias = "default" if vendor == "sqlite" else "mysql"
        connections[alias].settings_dict["CONN_MAX_AGE"] = None  # keep one connection
        workloads[f"{vendor}: cursor.execute, no request (per query)"] = lambda h, a=alias: (
            cursor_loop(a, args.queries * 4)
        )
        workloads[f"{vendor}: ORM query, no request (per query)"] = lambda h, a=alias: query_loop(
            a, args.queries
        )
        workloads[f"{vendor}: ORM query in a WSGI request (per query)"] = lambda h, a=alias: (
            request_loop(h, "/bench/", f"db={a}", args.requests) / QUERIES_PER_REQUEST
        )
    workloads["empty WSGI request (per request)"] = lambda h: request_loop(
        h, "/nothing/", "", args.requests
    )
    results: dict[tuple[str, str], list[float]] = {}
    for handler_name, _ in [(v, None) for v in VARIANTS]:
        switch.apply(handler_name)
        for workload in workloads.values():  # warm up every variant once
            workload(switch.with_mw if handler_name != "bare" else switch.without_mw)
    for r in range(args.rounds):
        order = list(VARIANTS)
        random.shuffle(order)
        for variant in order:
            handler = switch.apply(variant)
            for name, workload in workloads.items():
                results.setdefault((name, variant), []).append(workload(handler))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    switch.close()

    print(f"\nconndiag benchmark: {args.rounds} interleaved rounds, medians in microseconds")
    print(f"Python {sys.version.split()[0]}, Django {__import__('django').get_version()}\n")
    header = f"{'workload':<48}" + "".join(f"{v:>12}" for v in VARIANTS)
    print(header + "   overhead vs bare: " + ", ".join(VARIANTS[1:]))
    for name in workloads:
        medians = {v: statistics.median(results[(name, v)]) * 1e6 for v in VARIANTS}
        row = f"{name:<48}" + "".join(f"{medians[v]:>12.2f}" for v in VARIANTS)
        over = ", ".join(f"{medians[v] - medians['bare']:+.2f}" for v in VARIANTS[1:])
        print(row + "   " + over)


if __name__ == "__main__":
    main()
