"""Process identity, and fork detection that does not depend on Python's at-fork hooks.

uWSGI forks its workers from C: ``os.register_at_fork`` callbacks do not run in them
(unless ``py-call-osafterfork`` is set), so a process id cached in Python would stay the
master's in every worker. :func:`pid` therefore asks the kernel every time (``os.getpid()``
is a plain system call on Linux, about 0.1 µs; glibc has not cached it since 2.25) and
compares the answer with the id it saw last: a difference *is* a fork, whoever made it.

The first conndiag entry point that runs in a new process (the execute wrapper, a connect,
a request signal, the metrics view) notices, and runs the callbacks registered with
:func:`on_fork`, once, before doing anything else. For forks made by Python (``os.fork()``,
``multiprocessing``, gunicorn) they also run eagerly, from an ``after_in_child`` hook.

A callback only resets plain state and re-creates locks: another thread of the parent may
have held any lock at the moment of the fork, and that thread does not exist in the child,
so taking such a lock (prometheus_client's included) could hang the child for ever.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from .contain import internal_error

if TYPE_CHECKING:
    from collections.abc import Callable

_getpid = os.getpid

#: the process id conndiag last saw (the hot path compares ``os.getpid()`` with it)
_pid = _getpid()
_callbacks: list[Callable[[], None]] = []
#: one lock per process, made by the first thread that notices the fork (setdefault is
#: atomic): a lock inherited from the parent could be held by a thread that is gone.
_locks: dict[int, threading.RLock] = {}
#: the pid whose callbacks are running (a callback that calls pid() does not re-run them)
_running = 0
_hook_registered = False


def pid() -> int:
    """This process's id, correct in any process whoever forked it.

    Runs the :func:`on_fork` callbacks first when this is the first call in a new process.
    """
    current = _getpid()
    if current != _pid:
        _forked(current)
    return current


def check() -> None:
    """Notice a fork now (an entry point calls this before it reads any per-process state)."""
    if _getpid() != _pid:
        _forked(_getpid())


def _forked(current: int) -> None:
    global _pid, _running
    lock = _locks.setdefault(current, threading.RLock())
    with lock:
        if _pid == current or _running == current:
            return  # another thread got here first, or a callback called pid()
        _running = current
        for key in [k for k in _locks if k != current]:
            _locks.pop(key, None)
        errors: list[tuple[str, Exception]] = []
        for callback in list(_callbacks):
            try:
                callback()
            except Exception as exc:
                errors.append((getattr(callback, "__qualname__", repr(callback)), exc))
        # Only now: other threads wait on the lock above until every callback has run.
        _pid = current
    if errors:
        _report(errors)


def _report(errors: list[tuple[str, Exception]]) -> None:
    for name, exc in errors:
        internal_error(f"process.on_fork.{name}", exc)


def on_fork(callback: Callable[[], None]) -> None:
    """Run ``callback()`` once in each child process, when the fork is first noticed.

    Idempotent per callback. Callbacks run in registration order, on the thread that
    noticed the fork, while other conndiag entry points of that process wait. They must not
    take a lock another thread may hold, nor call into prometheus_client: they reset plain
    state and re-create locks. Their failures are counted as conndiag internal errors.
    """
    global _hook_registered
    if callback not in _callbacks:
        _callbacks.append(callback)
    if not _hook_registered:
        _hook_registered = True
        os.register_at_fork(after_in_child=check)
