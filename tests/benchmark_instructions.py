"""conndiag's overhead in CPU instructions, counted by valgrind: the same answer on a busy
machine as on a quiet one.

    python tests/benchmark_instructions.py [--variants bare,defaults,...]
                                           [--workloads request,cursor,...]
                                           [--vendors sqlite,mysql] [--jobs 2]

``tests/benchmark.py`` measures time, and on a shared VM a few µs drown in the machine's
noise (the no-op wrapper alone read -41 to +4 µs on its ORM rows). Instructions do not
drift: callgrind counts the instructions the process executes, and a repeated run gives the
same count within about 0.3 %. So this is what to compare before and after a change on the
hot path; ``benchmark.py`` gives the time those instructions take on a given machine.

Each (workload, variant) runs in its own process under ``valgrind --tool=callgrind`` with
instrumentation off while Django starts, the variant is applied (the same variants as
``benchmark.py``: its ``Switch``) and the workload is warmed up; then instrumentation is
switched on (``callgrind_control -i on``) and only the measured loop is counted (collection
is toggled on entry to and exit from ``operator.call``, which runs it). The report gives
each variant's instructions per query or per request and its overhead over ``bare`` in the
same run, in instructions and as a share of bare.

Needs valgrind (Debian's ``valgrind`` package: ``valgrind`` and ``callgrind_control``).
Workloads: ``cursor`` (``cursor.execute("SELECT 1")``, per query), ``orm``
(``Item.objects.filter(pk=1).first()`` outside a request, per query), ``orm-request`` (a
WSGI request running 10 such queries, per query), ``request`` (an empty WSGI request, per
request).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))

WORKLOADS = {
    # name: (iterations counted, unit)
    "cursor": (2000, "query"),
    "orm": (300, "query"),
    "orm-request": (30, "query"),
    "request": (300, "request"),
}
DEFAULT_VARIANTS = (
    "bare",
    "noop-wrapper",
    "defaults",
    "structlog-info",
    "stdlib-info",
    "json-fast",
)


def child(variant: str, workload: str, vendor: str, n: int) -> None:
    """Set up, warm up, then run the measured loop inside ``operator.call`` on cue."""
    import operator
    import tempfile

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    from tests import benchmark

    benchmark.setup_django(["sqlite", "mysql"] if vendor == "mysql" else ["sqlite"])
    from django.db import connections

    from tests.testapp import views

    views.BENCH_QUERIES = benchmark.QUERIES_PER_REQUEST
    alias = "default" if vendor == "sqlite" else "mysql"
    connections[alias].settings_dict["CONN_MAX_AGE"] = None  # keep one connection
    switch = benchmark.Switch(tempfile.mkdtemp(prefix="conndiag-bench-"))
    handler = switch.apply(variant)
    loops = {
        "cursor": lambda k: benchmark.cursor_loop(alias, k),
        "orm": lambda k: benchmark.query_loop(alias, k),
        "orm-request": lambda k: benchmark.request_loop(handler, "/bench/", f"db={alias}", k),
        "request": lambda k: benchmark.request_loop(handler, "/nothing/", "", k),
    }
    loop = loops[workload]
    loop(max(n // 5, 5))  # warm up: caches, specialisation, lazily built state
    print("READY", flush=True)
    sys.stdin.readline()
    operator.call(loop, n)
    print("DONE", flush=True)
    sys.stdin.readline()
    switch.close()


def count(variant: str, workload: str, vendor: str) -> float:
    """Instructions per query / per request of one variant on one workload."""
    n, _unit = WORKLOADS[workload]
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"conndiag-callgrind.{os.getpid()}.{variant}"
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--collect-atstart=no",
        "--toggle-collect=_operator_call",
        f"--callgrind-out-file={out}.{workload}.{vendor}",
        sys.executable,
        str(HERE),
        "--child",
        variant,
        workload,
        vendor,
        str(n),
    ]
    # One hash seed for every run: dict and set layouts (hence their probe counts) do not
    # vary from one process to the next.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = proc.stdout.readline().strip()
        if line != "READY":
            raise RuntimeError(f"{variant}/{workload}: the child said {line!r}: {proc.stderr}")
        subprocess.run(
            ["callgrind_control", "-i", "on", str(proc.pid)],
            check=True,
            capture_output=True,
        )
        proc.stdin.write("\n")
        proc.stdin.flush()
        if proc.stdout.readline().strip() != "DONE":
            raise RuntimeError(f"{variant}/{workload}: the measured loop failed")
        proc.stdin.write("\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        for leftover in out.parent.glob(out.name + ".*"):
            leftover.unlink(missing_ok=True)
    found = re.search(r"Collected : (\d+)", err)
    if found is None:
        raise RuntimeError(f"{variant}/{workload}: no instruction count in {err[-2000:]}")
    per = int(found.group(1)) / n
    return per / 10 if workload == "orm-request" else per  # 10 queries per request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "WORKLOAD", "VENDOR", "N"))
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--vendors", default="sqlite,mysql")
    parser.add_argument("--jobs", type=int, default=2, help="callgrind runs at once")
    args = parser.parse_args()
    if args.child:
        variant, workload, vendor, n = args.child
        child(variant, workload, vendor, int(n))
        return
    from tests.benchmark import VARIANTS

    variants = ["bare", *(v for v in args.variants.split(",") if v != "bare")]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    rows = [
        (vendor, workload)
        for vendor in args.vendors.split(",")
        for workload in args.workloads.split(",")
        if not (workload == "request" and vendor != "sqlite")  # an empty request is vendorless
    ]
    jobs = {(row, v): (v, row[1], row[0]) for row in rows for v in variants}  # one process each
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {key: pool.submit(count, *params) for key, params in jobs.items()}
        results = {key: future.result() for key, future in futures.items()}
    print(f"\nconndiag instruction counts (callgrind), Python {sys.version.split()[0]}")
    print("per workload: bare Django's instructions, then each variant's overhead over bare\n")
    for row in rows:
        vendor, workload = row
        unit = WORKLOADS[workload][1]
        bare = results[(row, "bare")]
        name = f"{vendor if workload != 'request' else ''}: {workload} (per {unit})".lstrip(": ")
        over = ", ".join(
            f"{v} {results[(row, v)] - bare:+,.0f} ({(results[(row, v)] - bare) / bare:+.1%})"
            for v in variants[1:]
        )
        print(f"{name:<34} bare {bare:>11,.0f}   {over}")


if __name__ == "__main__":
    main()
