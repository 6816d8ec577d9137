"""Test sessions: lint, the full suite (main), and the Django x Python matrix.

Run through ``scripts/test``, which installs what these need first. ``nox -l`` lists them.
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["lint", "main", "matrix"]
nox.options.error_on_missing_interpreters = True

#: Django series -> the Python versions it supports that these machines have (3.10-3.13)
MATRIX = {
    "3.2": ["3.10"],
    "4.2": ["3.10", "3.11", "3.12"],
    "5.2": ["3.10", "3.11", "3.12", "3.13"],
    "6.0": ["3.12", "3.13"],
    "6.1": ["3.12", "3.13"],
}
MAIN_PYTHON = "3.12"
MAIN_DJANGO = "5.2"
CASES = [(py, dj) for dj, pythons in MATRIX.items() for py in pythons]


def install(session: nox.Session, django: str, *groups: str) -> None:
    session.install(f"Django~={django}.0", "-e", ".")
    for group in groups:
        session.install("--group", group)


@nox.session(python=MAIN_PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (lint + format), mypy strict, and the import layering (import-linter)."""
    install(session, MAIN_DJANGO, "test", "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")
    session.run("lint-imports")  # contracts in pyproject.toml, layers in docs/architecture.md


@nox.session(python=MAIN_PYTHON)
def main(session: nox.Session) -> None:
    """The whole suite, slow end-to-end tests included, with branch coverage."""
    install(session, MAIN_DJANGO, "test")
    env = {"CONNDIAG_TEST_DB_SUFFIX": "_main"}
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", "pytest", *(session.posargs or ["tests"]), env=env)
    session.run("coverage", "combine", success_codes=[0, 1])
    session.run("coverage", "report")


@nox.session(python=False)
def matrix(session: nox.Session) -> None:
    """Every supported Django on each Python it supports (the fast suite, no slow tests)."""
    for py, dj in CASES:
        session.notify(f"suite(python='{py}', django='{dj}')")


@nox.session
@nox.parametrize("python,django", CASES)
def suite(session: nox.Session, django: str) -> None:
    """The suite without the slow end-to-end tests, on one Django/Python pair."""
    install(session, django, "test")
    suffix = "_" + (session.python or "x").replace(".", "") + "_" + django.replace(".", "")
    session.run(
        "python",
        "-m",
        "pytest",
        "-m",
        "not slow",
        "-q",
        # two workers (pytest-xdist): most of the suite waits on real servers (wait_timeout,
        # KILL, threads), so the 13 cells take half the time on CI's 2 cores
        "-n",
        "2",
        *session.posargs,
        env={"CONNDIAG_TEST_DB_SUFFIX": suffix, **_passthrough()},
    )


def _passthrough() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("CONNDIAG_TEST_")}


@nox.session(python=MAIN_PYTHON)
def bench(session: nox.Session) -> None:
    """The overhead benchmark against bare Django (tests/benchmark.py)."""
    install(session, MAIN_DJANGO, "test")
    session.run("python", "tests/benchmark.py", *session.posargs)


@nox.session(python=MAIN_PYTHON)
def instructions(session: nox.Session) -> None:
    """The same overhead in CPU instructions, under callgrind (tests/benchmark_instructions.py;
    needs valgrind): reproducible on a busy machine, for before/after comparisons."""
    install(session, MAIN_DJANGO, "test")
    session.run("python", "tests/benchmark_instructions.py", *session.posargs)
