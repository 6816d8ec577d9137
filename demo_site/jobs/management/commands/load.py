"""``manage.py load``: drive a bounded burst of requests through the demo's endpoints."""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs import loadgen


class Command(BaseCommand):
    help = (
        "Send a bounded number of requests, for a bounded time, to the demo site running on "
        "this machine (loopback addresses only), and print requests, errors, latency "
        "percentiles and counts per endpoint."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--url",
            default="http://127.0.0.1:8000",
            help="base URL of the site, on a loopback address",
        )
        parser.add_argument("--requests", type=int, default=200, help="how many requests")
        parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
        parser.add_argument(
            "--endpoints",
            nargs="+",
            metavar="ENDPOINT",
            help="paths to drive, e.g. /jobs/ 'POST /ops/trigger-job' (default: all of them)",
        )
        parser.add_argument(
            "--timeout", type=float, default=60.0, help="stop after this many seconds in all"
        )
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            endpoints = loadgen.parse_endpoints(options["endpoints"])
            result = loadgen.run(
                options["url"],
                requests=options["requests"],
                concurrency=options["concurrency"],
                endpoints=endpoints,
                timeout=options["timeout"],
                progress=None if options["no_progress"] else sys.stderr,
            )
        except loadgen.LoadError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(result.summary())
