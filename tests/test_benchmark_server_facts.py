"""The server-facts benchmark keeps working, and its run shows what each mode sends: a probe
per request with ``connect``, none with the default ``cached`` once warm, none with ``off``
(a small run; the timings are in docs/diagnosis.md)."""

from __future__ import annotations

import re

import pytest

from tests.conftest import run_python

LINE = re.compile(r"^(\w+)\s+(off|cached|connect)\s+([\d.]+)\s+[-+]\d+µs\s+(\d+)$", re.M)


@pytest.mark.mysql
def test_server_facts_benchmark_runs_and_counts_probes_per_mode():
    """2 rounds x 3 requests at CONN_MAX_AGE=0 on MariaDB: 6 probes with ``connect``, 0 with
    ``cached`` (warmed by the first request) and ``off``."""
    out = run_python(
        "tests/benchmark_server_facts.py", "--rounds", "2", "--requests", "3", "--vendors", "mysql"
    )
    probes = {mode: int(count) for _, mode, _, count in LINE.findall(out)}
    assert probes == {"off": 0, "cached": 0, "connect": 6}, out
