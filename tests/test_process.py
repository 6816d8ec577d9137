"""Process identity and fork detection, with forks made by Python and by C (like uWSGI's)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from conndiag import process
from tests.forking import c_fork, fork_quietly, wait_child


@pytest.fixture(autouse=True)
def _own_callbacks() -> Iterator[None]:
    """Each test's callbacks are gone after it (conndiag's own stay registered)."""
    saved = list(process._callbacks)
    yield
    process._callbacks[:] = saved


def _in_child(fork: Callable[[], int], body: Callable[[], int]) -> int:
    """Fork with ``fork()``; the child runs ``body()`` and exits with its return code."""
    child = fork_quietly(fork)
    if child == 0:
        code = 99
        try:
            code = body()
        finally:
            os._exit(code)
    return wait_child(child)


def test_pid_is_this_process():
    """pid() is os.getpid() in the process that imported conndiag."""
    assert process.pid() == os.getpid()


def _callbacks_ran_once_with_the_right_pid(ran: list[int]) -> int:
    before = len(ran)
    for _ in range(3):
        if process.pid() != os.getpid():
            return 1
    if len(ran) != before + (0 if before else 1) or ran[-1] != os.getpid():
        return 2
    return 0


def testc_fork_is_detected_at_the_first_call():
    """After a fork from C, no hook ran: the first pid() call notices, returns the child's
    pid and runs each on_fork callback exactly once, in the child."""
    ran: list[int] = []
    process.on_fork(lambda: ran.append(os.getpid()))

    def body() -> int:
        if ran:
            return 3  # an at-fork hook ran: this was not a C-level fork
        return _callbacks_ran_once_with_the_right_pid(ran)

    assert _in_child(c_fork, body) == 0
    assert ran == []  # never in the parent
    assert process.pid() == os.getpid()


def test_python_fork_runs_callbacks_eagerly_and_once():
    """os.fork() runs the callbacks from the after-fork hook, before any conndiag call; a
    later pid() does not run them again."""
    ran: list[int] = []
    process.on_fork(lambda: ran.append(os.getpid()))

    def body() -> int:
        if ran != [os.getpid()]:
            return 4
        return _callbacks_ran_once_with_the_right_pid(ran)

    assert _in_child(os.fork, body) == 0
    assert ran == []


def test_a_failing_callback_does_not_stop_the_others():
    """A callback that raises is contained; the ones after it still run."""
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    process.on_fork(broken)
    process.on_fork(lambda: ran.append("after"))

    def body() -> int:
        process.pid()
        return 0 if ran == ["after"] else 5

    assert _in_child(c_fork, body) == 0


def test_on_fork_is_idempotent():
    """Registering one callback twice runs it once."""
    ran: list[int] = []

    def callback() -> None:
        ran.append(1)

    process.on_fork(callback)
    process.on_fork(callback)

    def body() -> int:
        process.pid()
        return 0 if ran == [1] else 6

    assert _in_child(c_fork, body) == 0


def test_the_fork_page_is_armed_here_and_wiped_in_a_child():
    """On Linux 4.14+ the hot path reads a MADV_WIPEONFORK page, not a system call: 1 here,
    0 in a child forked from C, 1 again once the child noticed."""
    import mmap
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("MADV_WIPEONFORK is Linux-only; elsewhere os.getpid() is compared")
    assert isinstance(process._page, mmap.mmap)
    assert process._page[0] == 1

    def body() -> int:
        if process._page[0] != 0:
            return 7
        process.check()
        return 0 if process._page[0] == 1 and process._pid == os.getpid() else 8

    assert _in_child(c_fork, body) == 0


def test_without_the_page_getpid_is_compared(monkeypatch):
    """Where the kernel cannot wipe a page, the stand-in compares os.getpid(): a C fork is
    still noticed at the first call."""
    monkeypatch.setattr(process, "_page", process._PidCheck())
    ran: list[int] = []
    process.on_fork(lambda: ran.append(os.getpid()))

    def body() -> int:
        if process._page[0] != 0:
            return 9
        return _callbacks_ran_once_with_the_right_pid(ran)

    assert _in_child(c_fork, body) == 0
    assert process._page[0] == 1
