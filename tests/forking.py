"""Forks for tests: from Python, from C (as uWSGI forks its workers), and a child that can hang.

A test that forks must never hang the suite: a child that does not answer within
:data:`CHILD_TIMEOUT` seconds is killed and the test fails, saying so.

Forking from C in a process with other threads has one trap of its own. CPython's GIL uses
forced switching: a thread that has waited for the GIL longer than the switch interval asks
the holder to drop it, and the holder, once it has, waits until another thread took it. In a
child forked from C, ``PyOS_AfterFork_Child`` never resets that request (the point of a C
fork is that no Python hook runs), so the child's only thread drops the GIL and waits for a
thread that does not exist, for ever. :func:`c_fork` therefore clears any pending request
(one release of the GIL: taking it back resets the request) and lengthens the switch
interval around the fork, so no thread asks again in the microseconds before it.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

#: seconds a forked child has to answer before it is killed and its test fails
CHILD_TIMEOUT = 60.0


def python_fork() -> int:
    return os.fork()


def _quiet_gil() -> float:
    """Clear a pending GIL drop request and keep others from asking for a while (see the
    module doc); returns the switch interval to restore in the parent."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    time.sleep(0.001)  # taking the GIL back clears a drop request another thread made
    return interval


def c_fork() -> int:
    """fork(2) from C: no at-fork hook runs, other threads' states stay (uWSGI's default)."""
    interval = _quiet_gil()
    pid = int(ctypes.PyDLL(None).fork())  # PyDLL: the GIL stays held through the call
    if pid != 0:
        sys.setswitchinterval(interval)
    return pid


def c_fork_osafterfork() -> int:
    """fork(2) from C, then PyOS_AfterFork_Child() in the child (uWSGI py-call-osafterfork):
    the other threads' states are cleared and the after-fork hooks run.

    Before Python 3.13 no before hook runs. From 3.13 on, PyOS_AfterFork_Child releases
    locks that only PyOS_BeforeFork takes (without it the child aborts: "unlocking a
    recursive mutex that is not owned"), so an embedder must call both, as this does."""
    interval = _quiet_gil()
    paired = sys.version_info >= (3, 13)
    if paired:
        ctypes.pythonapi.PyOS_BeforeFork()
    pid = int(ctypes.PyDLL(None).fork())
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return pid
    if paired:
        ctypes.pythonapi.PyOS_AfterFork_Parent()
    sys.setswitchinterval(interval)
    return pid


def fork_quietly(fork: Callable[[], int]) -> int:
    """``fork()``, without Python 3.12's warning about forking a multi-threaded process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return fork()


def wait_child(pid: int, timeout: float = CHILD_TIMEOUT) -> int:
    """Wait for child ``pid``; its exit code. A child still running after ``timeout``
    seconds is killed and the calling test fails."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            msg = f"forked child {pid} hung for {timeout:.0f} s and was killed"
            raise AssertionError(msg)
        time.sleep(0.02)


def read_all(fd: int, pid: int, timeout: float = CHILD_TIMEOUT) -> bytes:
    """Everything child ``pid`` writes to ``fd`` until it closes it (then ``fd`` is closed);
    a child silent for ``timeout`` seconds is killed and the calling test fails."""
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                msg = f"forked child {pid} sent no answer for {timeout:.0f} s and was killed"
                raise AssertionError(msg)
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def in_child(body: Callable[[], Any], fork: Callable[[], int] = python_fork) -> Any:
    """Fork; the child runs ``body()`` and sends its JSON result back; it never returns to
    pytest (``os._exit``). Returns the result, or ``{"crash": ...}``."""
    read, write = os.pipe()
    pid = fork_quietly(fork)
    if pid == 0:
        os.close(read)
        try:
            result = body()
        except BaseException as exc:
            result = {"crash": f"{type(exc).__name__}: {exc}"}
        try:
            os.write(write, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write)
    answer = read_all(read, pid)
    wait_child(pid)
    return json.loads(answer or b'{"crash": "no answer"}')
