"""Process identity, and fork detection that does not depend on Python's at-fork hooks.

uWSGI forks its workers from C: ``os.register_at_fork`` callbacks do not run in them
(unless ``py-call-osafterfork`` is set), so a process id cached in Python would stay the
master's in every worker. Two ways to notice a fork whoever made it, the cheap one first:

- a *fork page*: one private anonymous page marked ``MADV_WIPEONFORK`` (Linux 4.14+, the
  way OpenSSL and glibc notice forks for their random generators): the kernel hands every
  child a zero-filled copy, so byte 0 is 1 in the process that armed it and 0 in any
  child, after any fork, from Python or from C. Reading it costs about 30 ns, no system
  call;
- where that is not available, ``os.getpid()`` (a plain system call, about 0.2 µs here;
  glibc has not cached it since 2.25) compared with the id seen last.

The first conndiag entry point that runs in a new process (the execute wrapper, a connect
or close, a transaction start, a request signal, the metrics view) notices, and runs the
callbacks registered with :func:`on_fork`, once, before doing anything else. For forks
made by Python (``os.fork()``, ``multiprocessing``, gunicorn) they also run eagerly, from
an ``after_in_child`` hook.

A callback only resets plain state and re-creates locks: another thread of the parent may
have held any lock at the moment of the fork, and that thread does not exist in the child,
so taking such a lock (prometheus_client's included) could hang the child for ever.
"""

from __future__ import annotations

import mmap
import os
import platform
import sys
import threading
from typing import TYPE_CHECKING, Any

from .contain import internal_error

if TYPE_CHECKING:
    from collections.abc import Callable

_getpid = os.getpid

#: the process id conndiag last saw
_pid = _getpid()
_callbacks: list[Callable[[], None]] = []
#: one lock per process, made by the first thread that notices the fork (setdefault is
#: atomic): a lock inherited from the parent could be held by a thread that is gone.
_locks: dict[int, threading.RLock] = {}
#: the pid whose callbacks are running (a callback that calls pid() does not re-run them)
_running = 0
_hook_registered = False


class _PidCheck:
    """The fork page's stand-in where the kernel cannot wipe one: ``[0]`` is 1 while the
    process id is the one seen last (a system call per read)."""

    __slots__ = ()

    def __getitem__(self, index: int) -> int:
        return 1 if _getpid() == _pid else 0

    def __setitem__(self, index: int, value: int) -> None:
        pass


#: ``_page[0]`` is 1 until this process forks (0 in the child until it noticed). The hot
#: path reads it: ``if not process._page[0]: process.check()``.
_page: Any = _PidCheck()


def _wipe_on_fork_page() -> mmap.mmap | None:
    """A private anonymous page the kernel zero-fills in every child, or None."""
    if not sys.platform.startswith("linux") or platform.machine().startswith("parisc"):
        return None  # parisc numbers its madvise advice differently
    advice = getattr(mmap, "MADV_WIPEONFORK", 18)  # <asm-generic/mman-common.h>
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, flags=flags)
        page.madvise(advice)  # EINVAL before Linux 4.14
    except (AttributeError, OSError, ValueError):
        return None
    page[0] = 1
    return page


def arm() -> None:
    """Use the fork page where the kernel has one (idempotent; ``install`` calls it)."""
    global _page
    if isinstance(_page, _PidCheck):
        page = _wipe_on_fork_page()
        if page is not None:
            _page = page


def pid() -> int:
    """This process's id, correct in any process whoever forked it.

    Runs the :func:`on_fork` callbacks first when this is the first call in a new process.
    """
    if _page[0]:
        return _pid
    return _notice()


#: an entry point calls ``process.check()`` before it reads any per-process state
check = pid


def _notice() -> int:
    current = _getpid()
    if current != _pid:
        _forked(current)
    else:
        _page[0] = 1  # noticed already (by another thread, or an at-fork hook)
    return current


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
        _page[0] = 1  # armed again: the fork that zeroed it is noticed
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
        arm()
        os.register_at_fork(after_in_child=_notice)
