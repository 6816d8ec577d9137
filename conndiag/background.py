"""The escape hatch: :func:`background_db_work`, for deliberate background database work.

::

    @conndiag.background_db_work()
    def nightly_cleanup(): ...

    @conndiag.background_db_work()
    async def nightly_cleanup_async(): ...   # its awaited ORM work is covered

    with conndiag.background_db_work():
        JobRecord.objects.filter(...).delete()

    async with conndiag.background_db_work():
        await JobRecord.objects.filter(...).adelete()

Inside it, queries are classified ``background`` and logged as allowed. It also manages
connections the way Django's request cycle would: on entry it closes the connections that
are unusable, past ``CONN_MAX_AGE`` or idle past the server's ``wait_timeout`` (and drops,
without closing, connections inherited across ``fork()``); on exit it closes the connections
opened inside it. That makes it the *correct* way to run ORM work in a thread. Blocks nest:
only the outermost one manages connections.

One rule for what it covers: **the queries of the thread it manages**. The sync form covers
the thread that entered it; the async form covers the thread its ORM work runs on (where
``sync_to_async(thread_sensitive=True)`` and Django's async ORM run it), and enters and
exits there. Work handed to *another* thread from inside a block (``Thread.start``,
``ThreadPoolExecutor.submit``, ``asyncio.to_thread``) is not covered, since the block does not
manage that thread's connections: it is classified by its own origin (``detached`` when it
came from a request). Wrap the target itself to allow it:
``Thread(target=conndiag.background_db_work()(work))``.
"""

from __future__ import annotations

import functools
from contextlib import ContextDecorator
from typing import TYPE_CHECKING, Any, TypeVar

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.db import connections

from . import threads
from .lifecycle import close_with_reason, discard_inherited
from .state import STATE_ATTR

if TYPE_CHECKING:
    from collections.abc import Callable

    from django.db.backends.base.base import BaseDatabaseWrapper

    from .state import ConnState


_F = TypeVar("_F", bound="Callable[..., Any]")


def _initialized() -> list[BaseDatabaseWrapper]:
    try:
        return list(connections.all(initialized_only=True))  # type: ignore[call-arg]
    except TypeError:  # Django < 4.1
        return list(connections.all())


def _is_stale(state: ConnState | None) -> bool:
    return (
        state is not None and state.wait_timeout is not None and state.idle() >= state.wait_timeout
    )


def _open_block() -> list[ConnState]:
    """Entering the outermost block on this thread: close what is stale, return what is
    kept open (the block leaves those open on exit)."""
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
    return kept


def _close_block(kept: list[ConnState]) -> None:
    """Leaving the outermost block on this thread: close the connections opened inside."""
    for db in _initialized():
        if db.connection is None or db.in_atomic_block:
            continue
        if not any(db.__dict__.get(STATE_ATTR) is state for state in kept):
            close_with_reason(db, "background_work")


def _open_async_block() -> threads.AsyncBlock | None:
    """On the thread the async block's ORM work runs on: open it there (None when a sync
    block already manages that thread)."""
    info = threads.current()
    if info.allow_depth:
        return None
    return threads.AsyncBlock(info, _open_block())


class background_db_work(ContextDecorator):
    """Run deliberate background database work correctly: a context manager (``with`` and
    ``async with``) and a decorator (of sync and ``async def`` functions).

    One instance may be entered by several threads or tasks at once (a decorated function
    run by a pool): what it remembers lives on the entering thread (sync) or in the entering
    task's context (async), never on the instance.
    """

    def __enter__(self) -> background_db_work:
        info = threads.current()
        if info.allow_depth == 0:
            info.allow_kept = _open_block()
        info.allow_depth += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        info = threads.current()
        info.allow_depth -= 1
        if info.allow_depth:
            return
        kept = info.allow_kept
        info.allow_kept = []
        _close_block(kept)

    async def __aenter__(self) -> background_db_work:
        block = threads.hatch_var.get()
        if block is not None:
            block.depth += 1  # nested in this task's block: only the outermost manages
            return self
        block = await sync_to_async(_open_async_block, thread_sensitive=True)()
        if block is not None:
            block.token = threads.hatch_var.set(block)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        block = threads.hatch_var.get()
        if block is None:
            return  # a sync block already managed the thread
        if block.depth:
            block.depth -= 1
            return
        if block.token is not None:
            threads.hatch_var.reset(block.token)
        await sync_to_async(_close_block, thread_sensitive=True)(block.kept)

    def __call__(self, func: _F) -> _F:
        if iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_inside(*args: Any, **kwargs: Any) -> Any:
                async with self:
                    return await func(*args, **kwargs)

            return markcoroutinefunction(run_inside)  # type: ignore[return-value]
        return super().__call__(func)
