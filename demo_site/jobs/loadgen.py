"""A small, bounded load generator (stdlib only: urllib + ThreadPoolExecutor).

Used by the ``load`` management command and the demo runner. It only talks to loopback
addresses: it is a demo tool, not a benchmark, and must never hammer someone else's site.
"""

from __future__ import annotations

import http.client
import ipaddress
import math
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TextIO
from urllib.parse import urlsplit

#: (method, path) of every endpoint of the demo site
ENDPOINTS: tuple[tuple[str, str], ...] = (
    ("POST", "/ops/trigger-job"),
    ("POST", "/ops/trigger-job-in-thread"),
    ("POST", "/ops/trigger-job-in-pool"),
    ("POST", "/ops/trigger-job-background"),
    ("GET", "/async/jobs"),
    ("GET", "/jobs/"),
)
MAX_REQUESTS = 100_000
MAX_CONCURRENCY = 64
REQUEST_TIMEOUT = 10.0


class LoadError(ValueError):
    """A bad argument: the message says what is allowed."""


def check_url(url: str) -> str:
    """Return ``url`` without a trailing slash if it is http(s) on a loopback host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        msg = f"--url {url!r} is not an http(s) URL such as http://127.0.0.1:8000."
        raise LoadError(msg)
    host = parts.hostname
    loopback = host == "localhost"
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if not loopback:
        msg = (
            f"--url {url!r} is not on this machine: the load command only drives loopback "
            "addresses (127.0.0.1, ::1, localhost), so it can never load someone else's site."
        )
        raise LoadError(msg)
    return url.rstrip("/")


def parse_endpoints(values: list[str] | None) -> list[tuple[str, str]]:
    """``["/jobs/", "POST /ops/trigger-job"]`` -> ``[("GET", "/jobs/"), ("POST", ...)]``.

    A bare path takes the method of the known endpoint with that path, else GET.
    """
    if not values:
        return list(ENDPOINTS)
    known = {path: method for method, path in ENDPOINTS}
    result = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            method, _, path = item.partition(" ") if " " in item else ("", "", item)
            method = method.upper() or known.get(path, "GET")
            if method not in ("GET", "POST") or not path.startswith("/"):
                msg = f"--endpoints {item!r} is not valid: expected '/path' or 'POST /path'."
                raise LoadError(msg)
            result.append((method, path))
    if not result:
        msg = "--endpoints names no endpoint."
        raise LoadError(msg)
    return result


@dataclass
class Result:
    requests: int = 0
    errors: int = 0
    elapsed: float = 0.0
    timed_out: bool = False
    latencies: list[float] = field(default_factory=list)
    per_endpoint: Counter[str] = field(default_factory=Counter)
    errors_per_endpoint: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)

    def percentile(self, p: float) -> float | None:
        """Nearest-rank percentile of the latencies, in seconds."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        return ordered[rank - 1]

    def summary(self) -> str:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1000:.1f} ms"

        lines = [
            f"requests: {self.requests} in {self.elapsed:.1f} s"
            + (" (stopped at --timeout)" if self.timed_out else ""),
            f"errors:   {self.errors}",
            f"latency:  p50 {ms(self.percentile(50))}, p90 {ms(self.percentile(90))}, "
            f"p99 {ms(self.percentile(99))}",
            "status:   " + ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items())),
            "per endpoint:",
        ]
        width = max((len(k) for k in self.per_endpoint), default=0)
        for name, count in self.per_endpoint.items():
            errors = self.errors_per_endpoint.get(name, 0)
            lines.append(
                f"  {name:<{width}}  {count:>6}" + (f"  ({errors} errors)" if errors else "")
            )
        return "\n".join(lines)


class Progress:
    """A plain text progress bar on a terminal (or one line per 10% elsewhere)."""

    def __init__(self, total: int, stream: TextIO, width: int = 30) -> None:
        self.total = total
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self._last = -1

    def update(self, done: int, errors: int) -> None:
        # every request on a terminal, every 10% in a log file
        step = done if self.tty else done * 10 // max(self.total, 1)
        if step == self._last:
            return
        self._last = step
        filled = self.width * done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {done}/{self.total} requests, {errors} errors"
        if self.tty:
            self.stream.write("\r" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _one(url: str, method: str, timeout: float) -> tuple[str, float]:
    data = b"{}" if method == "POST" else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    req.add_header("X-User", "load")
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            status = str(resp.status)
    except urllib.error.HTTPError as exc:
        status = str(exc.code)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        status = type(reason).__name__
    return status, time.perf_counter() - start


def run(
    url: str,
    *,
    requests: int,
    concurrency: int,
    endpoints: list[tuple[str, str]] | None = None,
    timeout: float = 60.0,
    progress: TextIO | None = sys.stderr,
) -> Result:
    """Send ``requests`` requests, round-robin over ``endpoints``, stopping at ``timeout``."""
    base = check_url(url)
    if not 1 <= requests <= MAX_REQUESTS:
        msg = f"--requests {requests} is not valid: expected 1 to {MAX_REQUESTS}."
        raise LoadError(msg)
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        msg = f"--concurrency {concurrency} is not valid: expected 1 to {MAX_CONCURRENCY}."
        raise LoadError(msg)
    if not 0 < timeout <= 3600:
        msg = f"--timeout {timeout} is not valid: expected more than 0 and at most 3600 seconds."
        raise LoadError(msg)
    targets = endpoints or list(ENDPOINTS)
    result = Result()
    lock = threading.Lock()
    bar = Progress(requests, progress) if progress is not None else None
    start = time.monotonic()
    deadline = start + timeout
    counter = iter(range(requests))

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            remaining = deadline - time.monotonic()
            if i is None or remaining <= 0:
                if i is not None:
                    result.timed_out = True
                return
            method, path = targets[i % len(targets)]
            status, latency = _one(base + path, method, max(0.5, min(REQUEST_TIMEOUT, remaining)))
            name = f"{method} {path}"
            with lock:
                result.requests += 1
                result.latencies.append(latency)
                result.per_endpoint[name] += 1
                result.statuses[status] += 1
                if not status.startswith("2"):
                    result.errors += 1
                    result.errors_per_endpoint[name] += 1
                if bar is not None:
                    bar.update(result.requests, result.errors)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="load") as pool:
        futures = [pool.submit(worker) for _ in range(concurrency)]
    for future in futures:
        future.result()  # a bug in the worker surfaces here, not silently
    if bar is not None:
        bar.finish()
    result.elapsed = time.monotonic() - start
    return result
