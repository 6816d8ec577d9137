"""The benchmark script keeps working (a smoke run: it measures, this test does not time)."""

from __future__ import annotations

import pytest

from tests.benchmark import VARIANTS
from tests.conftest import run_python


@pytest.mark.mysql
def test_benchmark_runs_every_variant_and_workload():
    """One tiny round prints a median for every variant of every workload, SQLite and MySQL."""
    out = run_python(
        "tests/benchmark.py",
        *("--rounds", "1", "--queries", "20", "--requests", "5", "--vendors", "sqlite,mysql"),
    )
    rows = [line for line in out.splitlines() if "(per " in line]
    assert len(rows) == 7, out
    for row in rows:
        overheads = row.split("   ")[-1].split(", ")
        # every variant but bare, in one run: name and signed overhead
        assert [o.split(" ")[0] for o in overheads] == list(VARIANTS[1:]), row
        assert all(o.split(" ")[1][0] in "+-" for o in overheads), row
