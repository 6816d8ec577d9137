"""The memory benchmark keeps working, and its run shows state bounded by what is live
(a small run; the figures for 10^4 threads and 10^6 queries are in the README)."""

from __future__ import annotations

import re

from tests.conftest import run_python

SUMMARY = re.compile(
    r"(\w+) summary: (\d+) connections open on the main thread; state at the end (\d+) "
    r"ConnState, (\d+) ThreadInfo, (\d+) RequestScope; open gauge (\d+)"
)


def test_memory_benchmark_runs_and_state_follows_live_threads_and_connections():
    """300 short-lived SQLite threads that abandon their connections, then 5,000 queries:
    at the end only the live connections have a state, only the live thread a ThreadInfo,
    and the open gauge counts the live connection only (it read 301 before the fix)."""
    out = run_python("tests/benchmark_memory.py", "--threads", "300", "--queries", "5000")
    (summary,) = SUMMARY.findall(out)
    vendor, live_connections, states, infos, scopes, gauge = summary
    assert vendor == "sqlite"
    assert int(states) == int(live_connections)
    assert int(infos) == 1
    assert int(scopes) == 0
    assert int(gauge) == 1
    assert "metrics flush after 300 dead threads" in out
