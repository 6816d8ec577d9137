"""The escape hatch: :func:`background_db_work`, for deliberate background database work.

::

    @conndiag.background_db_work()
    def nightly_cleanup(): ...

    with conndiag.background_db_work():
        JobRecord.objects.filter(...).delete()

Inside it, queries are classified ``background`` and logged as allowed, whatever thread
runs them. It also manages connections the way Django's request cycle would: on entry it
closes this thread's connections that are unusable, past ``CONN_MAX_AGE`` or idle past the
server's ``wait_timeout`` (and drops, without closing, connections inherited across
``fork()``); on exit it closes the connections opened inside it. That makes it the *correct*
way to run ORM work in a thread. Blocks nest: only the outermost one manages connections.
"""

from __future__ import annotations

from contextlib import ContextDecorator
from typing import TYPE_CHECKING

from django.db import connections

from . import threads
from .lifecycle import close_with_reason, discard_inherited
from .state import STATE_ATTR

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

    from .state import ConnState


def _initialized() -> list[BaseDatabaseWrapper]:
    try:
        return list(connections.all(initialized_only=True))  # type: ignore[call-arg]
    except TypeError:  # Django < 4.1
        return list(connections.all())


def _is_stale(state: ConnState | None) -> bool:
    return (
        state is not None and state.wait_timeout is not None and state.idle() >= state.wait_timeout
    )


class background_db_work(ContextDecorator):
    """Run deliberate background database work correctly (context manager and decorator).

    One instance may be entered by several threads at once (a decorated function run by a
    pool): what it remembers lives on the entering thread, never on the instance.
    """

    def __enter__(self) -> background_db_work:
        info = threads.current()
        if info.allow_depth == 0:
            kept: list[ConnState] = []
            for db in _initialized():
                if db.connection is None:
                    continue
                if discard_inherited(db):
                    continue
                if not db.in_atomic_block:
                    db.close_if_unusable_or_obsolete()
                    if db.connection is not None and _is_stale(db.__dict__.get(STATE_ATTR)):
                        close_with_reason(db, "background_work")
                state = db.__dict__.get(STATE_ATTR)
                if db.connection is not None and state is not None:
                    kept.append(state)
            info.allow_kept = kept
        info.allow_depth += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        info = threads.current()
        info.allow_depth -= 1
        if info.allow_depth:
            return
        kept = info.allow_kept
        info.allow_kept = []
        for db in _initialized():
            if db.connection is None or db.in_atomic_block:
                continue
            if not any(db.__dict__.get(STATE_ATTR) is state for state in kept):
                close_with_reason(db, "background_work")
