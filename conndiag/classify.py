"""Classify a query into one of the query contexts (README.md, "How it works"), cheaply, on
its own thread.

| context        | meaning                                                           |
|----------------|-------------------------------------------------------------------|
| ``request``      | inside a live request, on the request's own thread                |
| ``cross_thread`` | inside a live request's context, but on another thread            |
| ``detached``     | work that originated in a request runs outside its thread         |
| ``forked``       | the connection was opened in another process                      |
| ``background``   | work that did not originate in a request, or explicitly allowed   |

The origin of the work decides, not whether the process has served requests: a thread or
executor task started from a request thread is ``detached`` (even while the request runs,
because nothing recycles its connection); work that carries the request in its context
(``sync_to_async``, ``asyncio.to_thread``) is ``cross_thread`` while the request is live and
``detached`` once it has returned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import process, threads
from . import scope as _scope

if TYPE_CHECKING:
    from .scope import RequestScope
    from .state import ConnState
    from .threads import ThreadInfo

REQUEST = "request"
CROSS_THREAD = "cross_thread"
DETACHED = "detached"
FORKED = "forked"
BACKGROUND = "background"

_current_scope = _scope.current_scope
_hatch_var = threads.hatch_var


def classify(state: ConnState | None, info: ThreadInfo) -> tuple[str, RequestScope | None]:
    """The context of a query on ``state`` run by thread ``info``, and its request if any.

    ``state`` is None for a connection about to be opened (it cannot be forked yet).
    """
    if state is not None and state.pid != process._pid:
        return FORKED, info.scope or _current_scope()
    if info.allow_depth or (_hatch_var.get() is not None and threads.allowed(info)):
        return BACKGROUND, None
    origin = info.task_origin or info.origin
    if origin is not None:
        return DETACHED, origin
    rs = _current_scope()
    if rs is None:
        rs = info.scope
        return (BACKGROUND, None) if rs is None else (REQUEST, rs)
    if rs.thread is info:
        return REQUEST, rs
    if rs.finished is None:
        return CROSS_THREAD, rs
    return DETACHED, rs
