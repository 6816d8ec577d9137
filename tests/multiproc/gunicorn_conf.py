"""gunicorn config for the multi-process test (and the pattern docs/metrics.md shows)."""

from __future__ import annotations

from typing import Any


def child_exit(server: Any, worker: Any) -> None:
    """Runs in the arbiter when a worker exits (even after kill -9): drop its live gauges."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
