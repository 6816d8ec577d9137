"""What ``SERVER_FACTS`` costs per request when every request opens a connection.

    python tests/benchmark_server_facts.py [--rounds 15] [--requests 40] [--vendors mysql,postgres]

At ``CONN_MAX_AGE = 0`` Django opens a connection for every request that queries and closes
it at the end. ``SERVER_FACTS = "connect"`` probes each new connection (one extra round trip
per request); ``"cached"`` (the default) probes once per alias and process and reuses the
answer for ``SERVER_FACTS_TTL`` seconds; ``"off"`` never probes. Each round runs every mode
once, in a shuffled order (interleaved, so the machine's drift is shared), ``--requests``
requests of a view running one ORM query through Django's WSGI handler; the report gives the
median wall time per request of each mode, its difference from ``off``, and the probes sent.
Wall time, not CPU time: the probe's cost is mostly the round trip to the server.

The servers are those of ``tests/settings.py`` (``CONNDIAG_TEST_MYSQL_URL``,
``CONNDIAG_TEST_POSTGRES_URL``); the script uses databases of its own
(``conndiag_bench_facts``), created if missing.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

MODES = ("off", "cached", "connect")
BENCH_DB = "conndiag_bench_facts"


def _create_databases(vendors: list[str]) -> None:
    from django.conf import settings

    if "mysql" in vendors:
        import MySQLdb

        db = settings.DATABASES["mysql"]
        conn = MySQLdb.connect(
            host=db["HOST"], port=int(db["PORT"]), user=db["USER"], password=db["PASSWORD"]
        )
        conn.cursor().execute(f"CREATE DATABASE IF NOT EXISTS {BENCH_DB}")
        conn.close()
        db["NAME"] = BENCH_DB
    if "postgres" in vendors:
        import psycopg

        db = settings.DATABASES["postgres"]
        with psycopg.connect(
            host=db["HOST"], port=int(db["PORT"]), user=db["USER"], dbname="postgres"
        ) as conn:
            conn.autocommit = True
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (BENCH_DB,))
            if found.fetchone() is None:
                conn.execute(f"CREATE DATABASE {BENCH_DB}")
        db["NAME"] = BENCH_DB


def setup_django(vendors: list[str]) -> None:
    import django
    from django.conf import settings

    _create_databases(vendors)
    for alias in ("mysql", "postgres"):
        settings.DATABASES[alias]["CONN_MAX_AGE"] = 0
    django.setup()
    from django.core.management import call_command

    for alias in vendors:
        call_command("migrate", run_syncdb=True, database=alias, verbosity=0)


def request_loop(alias: str, n: int) -> float:
    """Wall seconds per request of ``n`` requests of ``/bench/?db=alias`` (one query each)."""
    from wsgiref.util import setup_testing_defaults

    from django.core.handlers.wsgi import WSGIHandler

    handler = WSGIHandler()

    def start_response(status: str, headers: object, exc_info: object = None) -> None:
        assert status.startswith("200"), status

    start = time.perf_counter()
    for _ in range(n):
        environ = {"PATH_INFO": "/bench/", "QUERY_STRING": f"db={alias}", "REQUEST_METHOD": "GET"}
        setup_testing_defaults(environ)
        response = handler(environ, start_response)
        b"".join(response)  # type: ignore[arg-type]
        response.close()  # type: ignore[attr-defined]  # request_finished closes the connection
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--vendors", default="mysql,postgres")
    args = parser.parse_args()
    vendors = [v for v in args.vendors.split(",") if v]
    setup_django(vendors)

    from django.test import override_settings

    from conndiag import serverfacts
    from tests.testapp import views

    views.BENCH_QUERIES = 1
    probes = {mode: 0 for mode in MODES}
    mode_now = ["off"]
    original_probe = serverfacts.probe

    def counting_probe(db):  # type: ignore[no-untyped-def]
        probes[mode_now[0]] += 1
        return original_probe(db)

    serverfacts.probe = counting_probe  # type: ignore[assignment]
    print(f"{args.rounds} rounds x {args.requests} requests, CONN_MAX_AGE=0, one query each")
    print(f"{'vendor':<10} {'mode':<8} {'ms/request':>11} {'vs off':>9} {'probes':>7}")
    for alias in vendors:
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        serverfacts.clear_cache()
        request_loop(alias, 5)  # warm up: imports, URL resolver, first connect
        probes.update(dict.fromkeys(MODES, 0))
        for _ in range(args.rounds):
            order = list(MODES)
            random.shuffle(order)
            for mode in order:
                mode_now[0] = mode
                with override_settings(CONNDIAG={"SERVER_FACTS": mode}):
                    times[mode].append(request_loop(alias, args.requests))
        base = statistics.median(times["off"])
        for mode in MODES:
            median = statistics.median(times[mode])
            print(
                f"{alias:<10} {mode:<8} {median * 1e3:>11.3f} {(median - base) * 1e6:>+7.0f}µs "
                f"{probes[mode]:>7}"
            )


if __name__ == "__main__":
    main()
