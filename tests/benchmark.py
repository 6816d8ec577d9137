"""Per-query and per-request overhead of conndiag against bare Django, in one process.

    python tests/benchmark.py [--rounds 41] [--queries 500] [--requests 100]
                              [--vendors sqlite,mysql] [--clock cpu|wall]
    nox -s bench   (the same, in the main environment)

Times are the measuring thread's CPU time by default (``--clock cpu``: conndiag's cost is
CPU work on the querying thread; a shared machine's preemptions and the database server's
own work do not count); ``--clock wall`` measures elapsed time instead.

Every round runs every variant once, in a shuffled order (interleaved), and the report gives
the median per-query / per-request time of each variant and its overhead over bare Django:

- ``bare``: conndiag's wrapper, request receivers, middleware and per-connection hooks
  removed (plain Django);
- ``noop-wrapper``: bare Django plus a trivial execute wrapper (``return execute(...)``):
  the floor any execute wrapper pays;
- ``defaults``: conndiag as a project that configured nothing gets it (no structlog
  configuration, no ``LOGGING``: events go to stdlib logging and routine ones are dropped
  by level; metrics on);
- ``no-metrics``: as ``defaults`` with ``METRICS=False``;
- ``structlog-info``: production structlog (JSON lines to a file, INFO and up);
- ``stdlib-info``: stdlib ``LOGGING`` at INFO (python-json-logger lines to a file);
- ``json-stock``: every query logged as a JSON line, stock structlog (``add_log_level``,
  ISO ``TimeStamper``, ``JSONRenderer`` with the json module, ``WriteLoggerFactory``);
- ``json-orjson``: the same with ``JSONRenderer(serializer=orjson.dumps)`` and
  ``BytesLoggerFactory``;
- ``json-fast``: the fast path of docs/logging.md: orjson, ``BytesLoggerFactory``, an epoch
  ``TimeStamper``;
- ``json-stdlib``: every query logged through stdlib logging (python-json-logger, a
  ``FileHandler``).

Workloads: a bare ``cursor.execute("SELECT 1")`` through Django's cursor (the wrapper's own
cost, with the least noise around it), an ORM query outside a request
(``Item.objects.filter(pk=1).first()``), the same query inside a request through the WSGI
handler (a view running 10 of them), and an empty request. Many short rounds keep the
machine's drift out of the comparison. MySQL needs the server of ``CONNDIAG_TEST_MYSQL_URL``
(default 127.0.0.1:3306).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

VARIANTS = (
    "bare",
    "noop-wrapper",
    "defaults",
    "no-metrics",
    "structlog-info",
    "stdlib-info",
    "json-stock",
    "json-orjson",
    "json-fast",
    "json-stdlib",
)
#: variants with conndiag's wrapper, signals and middleware on
CONNDIAG_VARIANTS = frozenset(VARIANTS) - {"bare", "noop-wrapper"}
QUERIES_PER_REQUEST = 10


def noop_wrapper(
    execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: Any
) -> Any:
    """The trivial execute wrapper: what any wrapper costs in Django."""
    return execute(sql, params, many, context)


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


def _structlog_json(level: int, fast: bool, orjson_bytes: bool, sink: Any) -> None:
    import structlog

    if orjson_bytes:
        import orjson

        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory: Any = structlog.BytesLoggerFactory(sink)
    else:
        renderer = structlog.processors.JSONRenderer()
        factory = structlog.WriteLoggerFactory(sink)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper()
            if fast
            else structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


class Switch:
    """Turns conndiag and the logging set-ups on and off in this process."""

    def __init__(self, log_dir: str) -> None:
        from django.conf import settings
        from django.core.handlers.wsgi import WSGIHandler
        from django.test.utils import override_settings
        from pythonjsonlogger.json import JsonFormatter

        self.text_file = open(os.path.join(log_dir, "structlog.jsonl"), "w")  # noqa: SIM115
        self.bytes_file = open(os.path.join(log_dir, "orjson.jsonl"), "wb")  # noqa: SIM115
        self.stdlib_handler = logging.FileHandler(os.path.join(log_dir, "stdlib.jsonl"))
        self.stdlib_handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "timestamp", "levelname": "level"},
            )
        )
        #: conndiag's instance hooks of each connection, put back for conndiag's variants
        self.hooks: dict[str, dict[str, object]] = {}
        self.with_mw = WSGIHandler()
        mw = [m for m in settings.MIDDLEWARE if "conndiag" not in m]
        with override_settings(MIDDLEWARE=mw):
            self.without_mw = WSGIHandler()

    def apply(self, variant: str) -> Callable[..., object]:
        import structlog
        from django.core.signals import request_finished, request_started
        from django.db import connections

        from conndiag import conf, runtime, scope
        from conndiag.wrapper import EXECUTE_WRAPPER

        on = variant in CONNDIAG_VARIANTS
        for alias in connections:
            wrappers = connections[alias].execute_wrappers
            for wrapper, wanted in (
                (EXECUTE_WRAPPER, on),
                (noop_wrapper, variant == "noop-wrapper"),
            ):
                if wanted and wrapper not in wrappers:
                    wrappers.insert(0, wrapper)
                if not wanted and wrapper in wrappers:
                    wrappers.remove(wrapper)
            # conndiag's instance hooks (conndiag/lifecycle.py), all of them off in bare
            db = connections[alias]
            hooks = self.hooks.setdefault(alias, {})
            for name, value in list(vars(db).items()):
                if getattr(value, "__module__", None) == "conndiag.lifecycle" and hasattr(
                    value, "__wrapped__"
                ):
                    hooks[name] = value
            for name, value in hooks.items():
                if on:
                    setattr(db, name, value)
                else:
                    vars(db).pop(name, None)  # the class's method again
        # conndiag's request receivers (conndiag/install.py), all of them off in bare
        if on:
            request_started.connect(scope.on_request_started, dispatch_uid="conndiag.started")
            request_finished.connect(scope.on_request_finished, dispatch_uid="conndiag.finished")
        else:
            request_started.disconnect(dispatch_uid="conndiag.started")
            request_finished.disconnect(dispatch_uid="conndiag.finished")

        # logging: nothing configured, then what the variant configures
        structlog.reset_defaults()
        logger = logging.getLogger("conndiag")
        logger.removeHandler(self.stdlib_handler)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
        if variant == "structlog-info":
            _structlog_json(logging.INFO, fast=False, orjson_bytes=False, sink=self.text_file)
        elif variant == "json-stock":
            _structlog_json(logging.DEBUG, fast=False, orjson_bytes=False, sink=self.text_file)
        elif variant == "json-orjson":
            _structlog_json(logging.DEBUG, fast=False, orjson_bytes=True, sink=self.bytes_file)
        elif variant == "json-fast":
            _structlog_json(logging.DEBUG, fast=True, orjson_bytes=True, sink=self.bytes_file)
        elif variant in ("stdlib-info", "json-stdlib"):
            logger.addHandler(self.stdlib_handler)
            logger.setLevel(logging.INFO if variant == "stdlib-info" else logging.DEBUG)
            logger.propagate = False
        conf._cached = conf.parse({"METRICS": variant != "no-metrics"})
        runtime.reset()
        return self.with_mw if on else self.without_mw

    def close(self) -> None:
        self.text_file.close()
        self.bytes_file.close()
        self.stdlib_handler.close()


#: the clock of every measurement (``--clock``): ``cpu`` is this thread's CPU time (user and
#: system: conndiag's cost is CPU work on the querying thread, and a busy shared machine's
#: preemptions do not count), ``wall`` is ``time.perf_counter``
clock: Callable[[], float] = time.thread_time


def cursor_loop(alias: str, n: int) -> float:
    from django.db import connections

    with connections[alias].cursor() as cursor:
        start = clock()
        for _ in range(n):
            cursor.execute("SELECT 1")
        return (clock() - start) / n


def query_loop(alias: str, n: int) -> float:
    from tests.testapp.models import Item

    manager = Item.objects.using(alias)
    start = clock()
    for _ in range(n):
        manager.filter(pk=1).first()
    return (clock() - start) / n


def request_loop(handler: Callable[..., object], path: str, query: str, n: int) -> float:
    from wsgiref.util import setup_testing_defaults

    def start_response(status: str, headers: object, exc_info: object = None) -> None:
        return None

    start = clock()
    for _ in range(n):
        environ = {"PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": "GET"}
        setup_testing_defaults(environ)
        response = handler(environ, start_response)  # type: ignore[operator]
        for _chunk in response:  # type: ignore[attr-defined]
            pass
        response.close()  # type: ignore[attr-defined]
    return (clock() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--vendors", default="sqlite,mysql")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    global clock
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    vendors = args.vendors.split(",")
    setup_django(vendors)

    from django.db import connections

    from tests.testapp import views

    views.BENCH_QUERIES = QUERIES_PER_REQUEST
    switch = Switch(tempfile.mkdtemp(prefix="conndiag-bench-"))
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
    for variant in VARIANTS:
        handler = switch.apply(variant)
        for workload in workloads.values():  # warm up every variant once
            workload(handler)
    for r in range(args.rounds):
        order = list(VARIANTS)
        random.shuffle(order)
        for variant in order:
            handler = switch.apply(variant)
            for name, workload in workloads.items():
                results.setdefault((name, variant), []).append(workload(handler))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    switch.close()

    print(
        f"\nconndiag benchmark: {args.rounds} interleaved rounds, medians in microseconds "
        f"({args.clock} time)"
    )
    print(f"Python {sys.version.split()[0]}, Django {__import__('django').get_version()}\n")
    print("per workload: bare Django's median, then each variant's overhead over bare\n")
    for name in workloads:
        medians = {v: statistics.median(results[(name, v)]) * 1e6 for v in VARIANTS}
        bare = medians["bare"]
        over = ", ".join(f"{v} {medians[v] - bare:+.2f}" for v in VARIANTS[1:])
        print(f"{name:<48} bare {bare:8.2f}   {over}")


if __name__ == "__main__":
    main()
