"""Fail the test where production would lose work.

The pytest plugin (:mod:`conndiag.pytest_plugin`), :class:`DiscoverRunner` (Django's runner)
and :func:`assert_no_unsafe_queries` (any other framework) share one :class:`Watch` per
process. While it runs, it adds a listener to the runtime's recorders
(:func:`conndiag.runtime.add_listener`) that keeps every query conndiag refused (policy
``raise``) or flagged (policy ``log``), and attributes it to the *owner* of the work: the
test (or ``assert_no_unsafe_queries`` block) that started it, not the one running when the
query happens. Ownership follows the work:

* a ``threading.Thread`` started while a test owns the starting thread belongs to that test,
  and so does every thread it starts;
* a task submitted to a ``ThreadPoolExecutor`` belongs to the submitter's test, whichever
  pool thread runs it (the pool's threads may have been started by an earlier test);
* a request belongs to the test running when it started (``request_started``), so a live
  server's threads, started once, serve each test in turn;
* a process forked while a test runs (``os.fork``, multiprocessing's ``fork`` start method)
  reports its refusals to the test's process through a private temporary directory, one
  file of JSON lines per process, read at the test's end. (Processes started with ``spawn``
  or ``forkserver`` inherit no memory and are not watched.)

When the watch is not running, none of this exists: the runtime has no listener and
``Thread.start`` / ``ThreadPoolExecutor.submit`` are as conndiag's own thread tracking left
them.
"""

from __future__ import annotations

import json
import multiprocessing.util
import os
import shutil
import tempfile
import threading
import time
import unittest
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import ContextDecorator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from django.test import runner as django_runner

from . import contain, runtime, threads
from . import events as event_names
from .conf import CONTEXTS
from .exceptions import UnsafeQueriesFound
from .policy import explain
from .records import Recorder

if TYPE_CHECKING:
    from .records import Query
    from .scope import RequestScope
    from .state import ConnState
    from .threads import ThreadInfo

_F = TypeVar("_F")

#: policy actions that fail a test: ``raise`` (refused) and ``log`` (flagged)
FAILING_ACTIONS = frozenset({"raise", "log"})
#: seconds to wait, at the end of a test, for the threads and tasks it started
DEFAULT_WAIT = 2.0
#: at the end of a session, seconds to wait for the non-daemon threads tests left running
#: (the interpreter would wait for them before exiting anyway)
SESSION_WAIT = 30.0
#: at most this many unsafe queries are kept per test (the rest are only counted)
MAX_KEPT = 50
#: at the exit of a --parallel worker, seconds to wait for the work its tests left running
HAND_UP_WAIT = 10.0
#: ended tests kept findable by forked processes that report late (besides live ones)
RECENT_OWNERS = 100
#: at most this many are shown in one report
MAX_SHOWN = 5
#: the attribute :func:`allow_unsafe_queries` sets on a test function or class
ALLOW_ATTR = "conndiag_allow"
ALL_CONTEXTS: frozenset[str] = frozenset(CONTEXTS)
#: the key of the owner of work done outside any test
OUTSIDE = "-"
_OWNER_ATTR = "_conndiag_test_owner"


def check_contexts(contexts: Iterable[object], where: str) -> frozenset[str]:
    """``contexts`` as a frozenset, or ``ValueError`` naming ``where`` and what is allowed."""
    given = list(contexts)
    unknown = sorted(repr(c) for c in given if c not in ALL_CONTEXTS)
    if unknown:
        allowed = ", ".join(repr(c) for c in CONTEXTS)
        msg = f"{where}: unknown context {', '.join(unknown)}; expected some of {allowed}."
        raise ValueError(msg)
    return frozenset(str(c) for c in given)


# --- what is recorded -----------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One thing conndiag recorded during a test (a query, a connection opened or closed)."""

    #: the event name, as in the log schema: ``conndiag.query``, ``conndiag.query.refused``,
    #: ``conndiag.query.flagged``, ``conndiag.query.failed``, ``conndiag.connection.opened``,
    #: ``conndiag.connection.closed``
    name: str
    #: the test (or block) that owns the work, or None outside any
    owner: str | None
    #: the query's context (for a connection: the context it was opened in)
    context: str
    #: the policy action for a query (``ignore``, ``log``, ``raise``), else None
    action: str | None
    alias: str
    vendor: str
    thread_name: str
    pid: int
    request_id: str | None = None
    request_path: str | None = None
    view: str | None = None
    #: the close reason, for ``conndiag.connection.closed``
    reason: str | None = None
    #: for a refused or flagged query: what happened, why it breaks, the fix
    message: str | None = None
    #: whether the owner allowed this context (``conndiag_allow``): it does not fail the test
    allowed: bool = False

    @property
    def unsafe(self) -> bool:
        """Refused or flagged: what fails a test unless allowed."""
        return self.action in FAILING_ACTIONS

    @property
    def outcome(self) -> str:
        """``refused``, ``flagged``, ``replaced`` (an inherited connection, policy ``replace``:
        it does not fail a test) or ``ok`` for a query; the event name's end otherwise."""
        if self.action == "raise":
            return "refused"
        if self.action == "log":
            return "flagged"
        if self.action == "replace":
            return "replaced"
        return "ok" if self.action is not None else self.name.rsplit(".", 1)[-1]

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Event:
        return cls(**json.loads(line))


class Events(list[Event]):
    """The events recorded during one test (the ``conndiag_events`` fixture)."""

    def __init__(self, watch: Watch, owner: Owner) -> None:
        super().__init__()
        self._watch = watch
        self._owner = owner

    def settle(self, timeout: float = 5.0) -> Events:
        """Wait (up to ``timeout`` s) for the threads and tasks the test started to finish."""
        self._watch.settle(self._owner, timeout)
        return self

    def named(self, name: str) -> list[Event]:
        return [e for e in self if e.name == name]

    @property
    def refused(self) -> list[Event]:
        return self.named(event_names.QUERY_REFUSED)

    @property
    def flagged(self) -> list[Event]:
        return self.named(event_names.QUERY_FLAGGED)

    @property
    def queries(self) -> list[Event]:
        return [e for e in self if e.action is not None]


class Owner:
    """One test, or one :func:`assert_no_unsafe_queries` block: the work it started."""

    __slots__ = (
        "__weakref__",
        "allow",
        "captured",
        "collect_work",
        "dropped",
        "ended",
        "key",
        "meta",
        "name",
        "reported",
        "unsafe",
        "work",
    )

    def __init__(self, key: str, name: str, allow: frozenset[str], meta: Any = None) -> None:
        self.key = key
        self.name = name
        self.allow = allow
        #: whatever the integration needs to report on this owner later (pytest: the item)
        self.meta = meta
        #: refused or flagged queries, not allowed, in order (at most MAX_KEPT)
        self.unsafe: list[Event] = []
        #: how many more there were
        self.dropped = 0
        #: how many of ``unsafe`` (+ dropped) were reported already
        self.reported = 0
        #: every event, while the ``conndiag_events`` fixture is in use
        self.captured: Events | None = None
        #: threads and tasks started while ``collect_work`` (awaited at the test's end)
        self.work: list[threading.Thread | Future[Any]] = []
        self.collect_work = False
        self.ended = False

    def pending(self) -> int:
        """Unsafe queries not reported yet."""
        return len(self.unsafe) + self.dropped - self.reported

    def take(self) -> tuple[list[Event], int]:
        """The unsafe queries not reported yet (and how many more were only counted)."""
        total = len(self.unsafe) + self.dropped
        start = min(self.reported, len(self.unsafe))
        shown = self.unsafe[start:]
        more = total - self.reported - len(shown)
        self.reported = total
        return shown, more


# --- the watch ------------------------------------------------------------------------------


class _Listener(Recorder):
    """The recorder the watch adds to the runtime: cheap unless the query is unsafe.

    It inherits the Recorder protocol's no-op methods for what it does not record
    (connect failures, stale connections, server facts, conndiag's own errors, and any
    method added to the protocol later)."""

    __slots__ = ("watch",)

    def __init__(self, watch: Watch) -> None:
        self.watch = watch

    def query(self, q: Query) -> None:
        watch = self.watch
        unsafe = q.action in FAILING_ACTIONS
        if not unsafe and not watch.capturing:
            return
        if q.error is not None:
            name = event_names.QUERY_FAILED
        elif q.action == "raise":
            name = event_names.QUERY_REFUSED
        elif q.action == "log":
            name = event_names.QUERY_FLAGGED
        else:
            name = event_names.QUERY
        owner = watch.owner_of(q.info, q.scope)
        state, rs = q.state, q.scope
        message = None
        if unsafe:
            verb = "refused " if q.action == "raise" else "flagged "
            message = (
                "conndiag "
                + verb
                + (q.message or explain(q.context, state.alias, state.vendor, state, q.info, rs))
            )
        event = Event(
            name=name,
            owner=owner.name if owner is not None else None,
            context=q.context,
            action=q.action,
            alias=state.alias,
            vendor=state.vendor,
            thread_name=q.info.name,
            pid=os.getpid(),
            request_id=rs.request_id if rs is not None else None,
            request_path=rs.path if rs is not None else None,
            view=rs.view_name() if rs is not None else None,
            message=message,
            allowed=owner is not None and q.context in owner.allow,
        )
        watch.add(owner, event)

    def connection_opened(self, state: ConnState, info: ThreadInfo) -> None:
        if self.watch.capturing:
            self._connection(event_names.CONNECTION_OPENED, state, info, None)

    def connection_closed(self, state: ConnState, reason: str) -> None:
        if self.watch.capturing:
            self._connection(event_names.CONNECTION_CLOSED, state, threads.current(), reason)

    def _connection(
        self, name: str, state: ConnState, info: ThreadInfo, reason: str | None
    ) -> None:
        owner = self.watch.owner_of(info, None)
        event = Event(
            name=name,
            owner=owner.name if owner is not None else None,
            context=state.context_opened,
            action=None,
            alias=state.alias,
            vendor=state.vendor,
            thread_name=info.name,
            pid=os.getpid(),
            reason=reason,
        )
        self.watch.add(owner, event)


class _OwnedTask:
    """An executor task that runs as work of the test that submitted it."""

    __slots__ = ("fn", "owner", "watch")

    def __init__(self, watch: Watch, fn: Callable[..., Any], owner: Owner) -> None:
        self.watch = watch
        self.fn = fn
        self.owner = owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        local = self.watch.local
        previous = getattr(local, "owner", None)
        local.owner = self.owner
        try:
            return self.fn(*args, **kwargs)
        finally:
            local.owner = previous


class Watch:
    """Attributes unsafe queries to the test that started the work (one per process)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.users = 0
        self.capturing = 0
        self.local = threading.local()
        self.listener = _Listener(self)
        self.directory: str | None = None
        #: the directory of the process this one was forked from, if it watched too
        self.upstream: str | None = None
        self._lock = threading.Lock()
        self._stack: list[Owner] = []
        #: owners by key (what forked processes name): alive ones, and the last ended ones
        self._owners: weakref.WeakValueDictionary[str, Owner] = weakref.WeakValueDictionary()
        self._recent: deque[Owner] = deque(maxlen=RECENT_OWNERS)
        #: owners with unreported unsafe queries
        self._pending: set[Owner] = set()
        self._outside = Owner(OUTSIDE, "(outside any test)", frozenset())
        self._by_request: weakref.WeakKeyDictionary[RequestScope, Owner] = (
            weakref.WeakKeyDictionary()
        )
        self._offsets: dict[str, int] = {}
        self._counter = 0
        self._previous_start: Callable[..., Any] | None = None
        self._previous_submit: Callable[..., Any] | None = None
        self._start_hook: Callable[..., Any] | None = None
        self._submit_hook: Callable[..., Any] | None = None

    # -- starting and stopping -------------------------------------------------------------

    def start(self) -> None:
        """Start watching (reference-counted: each ``start`` needs a ``stop``)."""
        self.users += 1
        if self.users > 1:
            return
        from django.core.signals import request_started

        self.directory = tempfile.mkdtemp(prefix="conndiag-tests-")
        self._install_hooks()
        request_started.connect(
            self._on_request_started, weak=False, dispatch_uid="conndiag.testing"
        )
        runtime.add_listener(self.listener)

    def stop(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        from django.core.signals import request_started

        runtime.remove_listener(self.listener)
        request_started.disconnect(dispatch_uid="conndiag.testing")
        self._uninstall_hooks()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def _install_hooks(self) -> None:
        previous_start = self._previous_start = threading.Thread.start
        previous_submit = self._previous_submit = ThreadPoolExecutor.submit
        watch = self

        def start(thread: threading.Thread) -> None:
            try:
                watch._thread_starting(thread)
            except Exception as exc:
                contain.internal_error("testing.thread_start", exc)
            previous_start(thread)

        def submit(
            executor: ThreadPoolExecutor, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
        ) -> Any:
            owner = None
            try:
                owner = watch.owner_here()
            except Exception as exc:
                contain.internal_error("testing.submit", exc)
            if owner is None:
                return previous_submit(executor, fn, *args, **kwargs)
            local = watch.local
            local.in_submit = getattr(local, "in_submit", 0) + 1
            try:
                future = previous_submit(executor, _OwnedTask(watch, fn, owner), *args, **kwargs)
            finally:
                local.in_submit -= 1
            if owner.collect_work:
                owner.work.append(future)
            return future

        self._start_hook = start
        self._submit_hook = submit
        threading.Thread.start = start  # type: ignore[method-assign,assignment]
        ThreadPoolExecutor.submit = submit  # type: ignore[method-assign,assignment]

    def _uninstall_hooks(self) -> None:
        # Restore only what is still ours: if someone replaced it since, leave theirs.
        if threading.Thread.start is self._start_hook and self._previous_start is not None:
            threading.Thread.start = self._previous_start  # type: ignore[method-assign]
        if ThreadPoolExecutor.submit is self._submit_hook and self._previous_submit is not None:
            ThreadPoolExecutor.submit = self._previous_submit  # type: ignore[method-assign]
        self._start_hook = self._submit_hook = None

    def _thread_starting(self, thread: threading.Thread) -> None:
        if getattr(self.local, "in_submit", 0):
            return  # an executor's own worker thread: its tasks carry their owner
        owner = self.owner_here()
        if owner is None:
            return
        setattr(thread, _OWNER_ATTR, owner)
        if owner.collect_work:
            owner.work.append(thread)

    def _on_request_started(self, sender: object, **kwargs: Any) -> None:
        try:
            info = threads.current()
            rs = info.scope
            if rs is None:
                return
            owner = getattr(self.local, "owner", None) or getattr(info.thread, _OWNER_ATTR, None)
            if owner is None or owner.ended:
                # e.g. a live server's thread, started by an earlier test, serving this one
                owner = self.current or owner
            if owner is not None:
                with self._lock:
                    self._by_request[rs] = owner
        except Exception as exc:
            contain.internal_error("testing.request_started", exc)

    # -- owners ----------------------------------------------------------------------------

    @property
    def current(self) -> Owner | None:
        stack = self._stack
        return stack[-1] if stack else None

    def begin(self, name: str, allow: frozenset[str], meta: Any = None) -> Owner:
        """A test (or block) starts: work started from now on is its own."""
        with self._lock:
            self._counter += 1
            owner = Owner(f"{self.pid}-{self._counter}", name, allow, meta)
            self._owners[owner.key] = owner
            self._stack.append(owner)
        return owner

    def end(self, owner: Owner) -> None:
        """The test ended: its work still running stays its own."""
        owner.ended = True
        owner.collect_work = False
        owner.work = []
        if owner.captured is not None:
            owner.captured = None
            self.capturing -= 1
        with self._lock:
            if owner in self._stack:
                self._stack.remove(owner)
            self._recent.append(owner)

    def capture(self, owner: Owner) -> Events:
        """Start keeping every event of ``owner`` (the ``conndiag_events`` fixture)."""
        if owner.captured is None:
            owner.captured = Events(self, owner)
            self.capturing += 1
        return owner.captured

    def owner_here(self) -> Owner | None:
        """The owner of work started on the calling thread now."""
        return self.owner_of(threads.current(), None)

    def owner_of(self, info: ThreadInfo, rs: RequestScope | None) -> Owner | None:
        """The owner of work on thread ``info`` that originated in request ``rs``."""
        owner: Owner | None = getattr(self.local, "owner", None)
        if owner is not None:
            return owner
        by_request = self._by_request
        if rs is not None:
            owner = by_request.get(rs)
            if owner is not None:
                return owner
        if info.scope is not None and info.scope is not rs:
            owner = by_request.get(info.scope)
            if owner is not None:
                return owner
        owner = getattr(info.thread, _OWNER_ATTR, None)
        return owner if owner is not None else self.current

    def add(self, owner: Owner | None, event: Event) -> None:
        """Record ``event`` for ``owner`` (from a forked process: in the report directory)."""
        if os.getpid() != self.pid:
            if event.unsafe:
                self._write_child(owner, event)
            return
        self._add_local(owner if owner is not None else self._outside, event)

    def _add_local(self, owner: Owner, event: Event) -> None:
        captured = owner.captured
        if captured is not None:
            captured.append(event)
        if event.unsafe and not event.allowed:
            with self._lock:
                if len(owner.unsafe) < MAX_KEPT:
                    owner.unsafe.append(event)
                else:
                    owner.dropped += 1
                self._pending.add(owner)

    def _write_child(self, owner: Owner | None, event: Event) -> None:
        self._write(self.directory, owner, event)

    def _write(self, directory: str | None, owner: Owner | None, event: Event) -> None:
        if directory is None:
            return
        record = {
            "owner": owner.key if owner is not None else OUTSIDE,
            "name": owner.name if owner is not None else None,
            "event": event.to_json(),
        }
        line = (json.dumps(record) + "\n").encode()
        path = os.path.join(directory, f"{os.getpid()}.jsonl")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def hand_up(self) -> None:
        """At exit of a process that watched its own tests (a --parallel worker): wait for
        the work they left running and pass what was not reported to the parent."""
        try:
            self.settle_all(HAND_UP_WAIT)
            for owner in self.late():
                events, _more = owner.take()
                for event in events:
                    self._write(self.upstream, owner, event)
        except Exception as exc:
            contain.internal_error("testing.hand_up", exc)
        finally:
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None

    def collect_children(self) -> None:
        """Read what forked processes wrote since the last call."""
        directory = self.directory
        if directory is None:
            return
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        for entry in entries:
            offset = self._offsets.get(entry.path, 0)
            with open(entry.path, "rb") as f:
                f.seek(offset)
                data = f.read()
            end = data.rfind(b"\n") + 1  # a line still being written waits for next time
            self._offsets[entry.path] = offset + end
            for raw in data[:end].splitlines():
                try:
                    record = json.loads(raw)
                    event = Event.from_json(record["event"])
                except (ValueError, KeyError, TypeError):
                    continue
                owner = self._owners.get(record["owner"])
                if owner is None:
                    owner = self._foreign(record.get("name"))
                self._add_local(owner, event)

    def _foreign(self, name: object) -> Owner:
        """The owner of a record from another process naming a test this one did not run
        (a --parallel worker's): an ended owner of that name."""
        if not isinstance(name, str) or name == self._outside.name:
            return self._outside
        with self._lock:
            self._counter += 1
            owner = Owner(f"{self.pid}-{self._counter}", name, frozenset())
            owner.ended = True
            self._recent.append(owner)
        return owner

    def settle(self, owner: Owner, timeout: float) -> None:
        """Wait up to ``timeout`` s for the threads and tasks ``owner`` started to finish."""
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        for work in list(owner.work):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if isinstance(work, threading.Thread):
                if work is not me and work.is_alive():
                    work.join(remaining)
            else:
                wait_futures([work], timeout=remaining)
        owner.work = [w for w in owner.work if _running(w)]
        self.collect_children()

    def settle_all(self, timeout: float) -> None:
        """Wait, up to ``timeout`` s in all, for the work of every owner still known."""
        deadline = time.monotonic() + timeout
        for thread in threading.enumerate():
            owner = getattr(thread, _OWNER_ATTR, None)
            remaining = deadline - time.monotonic()
            if owner is None or thread is threading.current_thread() or remaining <= 0:
                continue
            if not thread.daemon:
                thread.join(remaining)
        self.collect_children()

    def late(self) -> list[Owner]:
        """Owners that ended and have unsafe queries not reported yet (found since)."""
        self.collect_children()
        with self._lock:
            self._pending = {o for o in self._pending if o.pending()}
            return [o for o in self._pending if o.ended or o is self._outside]


def _running(work: threading.Thread | Future[Any]) -> bool:
    return work.is_alive() if isinstance(work, threading.Thread) else not work.done()


_watch: Watch | None = None
_watch_lock = threading.Lock()


def get_watch() -> Watch:
    """This process's watch (a process that forked gets its own on first use)."""
    global _watch
    with _watch_lock:
        watch = _watch
        if watch is not None and watch.pid != os.getpid():
            # Inherited across fork by a process that runs tests itself (a --parallel
            # worker): it attributes to its own tests from now on.
            upstream = watch.directory
            if watch.users > 0:
                watch.users = 1
                watch.directory = None  # the parent's, which the parent removes
                watch.stop()
            watch = _watch = Watch()
            if upstream is not None:
                # What its tests leave running when it exits goes to the parent.
                watch.upstream = upstream
                multiprocessing.util.Finalize(None, watch.hand_up, exitpriority=10)
        if watch is None:
            watch = _watch = Watch()
        return watch


# --- reports --------------------------------------------------------------------------------


def report(
    owner: Owner,
    events: list[Event],
    more: int,
    *,
    hint: str,
    late: str | None = None,
) -> str:
    """The plain-words report of ``events``: each query's full message, then how to allow."""
    refused = sum(1 for e in events if e.action == "raise")
    flagged = len(events) - refused
    counts = []
    if refused:
        counts.append(f"refused {refused} quer{'y' if refused == 1 else 'ies'}")
    if flagged:
        counts.append(f"flagged {flagged} quer{'y' if flagged == 1 else 'ies'}")
    what = " and ".join(counts) + (f" (and {more} more)" if more else "")
    if owner.key == OUTSIDE:
        head = f"conndiag {what} outside any test (found {late}): in production this work fails."
    elif late is None:
        head = (
            f"conndiag {what} during {owner.name}: in production this work fails or is lost, "
            "even if the test's own assertions passed and the application caught the error."
        )
    else:
        head = (
            f"conndiag {what} in work that {owner.name} started and that was still running "
            f"when it ended (found {late}): in production this work fails or is lost."
        )
    lines = [head]
    for n, event in enumerate(events[:MAX_SHOWN], 1):
        lines.append("")
        lines.append(
            f"  {n}. {event.outcome} [{event.context}] thread {event.thread_name!r}, "
            f"process {event.pid}"
        )
        lines.append("     " + (event.message or ""))
    if len(events) > MAX_SHOWN:
        lines.append(f"  ... and {len(events) - MAX_SHOWN} more like these")
    contexts = sorted({e.context for e in events})
    lines.append("")
    lines.append(hint.format(contexts=", ".join(repr(c) for c in contexts)))
    return "\n".join(lines)


# --- assert_no_unsafe_queries, allow_unsafe_queries ----------------------------------------


class assert_no_unsafe_queries(ContextDecorator):
    """Fail (``UnsafeQueriesFound``, an ``AssertionError``) if conndiag refused or flagged a
    query in work started inside the block, in any thread or forked process.

    ::

        with assert_no_unsafe_queries():
            client.post("/ops/trigger-job")

        @assert_no_unsafe_queries(allow=["cross_thread"])
        def test_report(): ...

    On exit it waits up to ``wait`` seconds for the threads and tasks started inside it.
    """

    HINT = "To allow it, pass assert_no_unsafe_queries(allow=[{contexts}])."

    def __init__(self, *, allow: Iterable[str] = (), wait: float = DEFAULT_WAIT) -> None:
        self.allow = check_contexts(allow, "assert_no_unsafe_queries(allow=...)")
        self.wait = wait
        self._owners = threading.local()

    def __enter__(self) -> Events:
        watch = get_watch()
        watch.start()
        owner = watch.begin("the assert_no_unsafe_queries() block", self.allow)
        owner.collect_work = True
        stack = getattr(self._owners, "stack", None)
        if stack is None:
            stack = self._owners.stack = []
        stack.append(owner)
        return watch.capture(owner)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        watch = get_watch()
        owner: Owner = self._owners.stack.pop()
        try:
            watch.settle(owner, self.wait)
            events, more = owner.take()
        finally:
            watch.end(owner)
            watch.stop()
        if events and exc_type is None:
            raise UnsafeQueriesFound(report(owner, events, more, hint=self.HINT), events)


def allow_unsafe_queries(*contexts: str) -> Callable[[_F], _F]:
    """Opt a unittest test method or class out of :class:`DiscoverRunner`'s check.

    With no argument every context is allowed; otherwise only those named. (Under pytest,
    use ``@pytest.mark.conndiag_allow(...)``, which this is equivalent to.)
    """
    allow = check_contexts(contexts, "allow_unsafe_queries()") if contexts else ALL_CONTEXTS

    def decorate(obj: _F) -> _F:
        setattr(obj, ALLOW_ATTR, allow)
        return obj

    return decorate


def allowed_for(test: object, method_name: str | None) -> frozenset[str]:
    """The contexts a unittest test (or its class) allows with :func:`allow_unsafe_queries`."""
    method = getattr(test, method_name, None) if method_name else None
    for obj in (method, type(test)):
        allow = getattr(obj, ALLOW_ATTR, None)
        if isinstance(allow, frozenset):
            return allow
    return frozenset()


# --- Django's test runner -------------------------------------------------------------------


if TYPE_CHECKING:
    _ResultBase = unittest.TestResult
else:
    # A plain mixin: Django 3.2's RemoteTestResult is no unittest.TestResult.
    _ResultBase = object


class _WatchedResult(_ResultBase):
    """A mixin for result classes: fails a test during which conndiag refused or flagged a
    query (placed before the result class it extends)."""

    HINT = (
        "To allow it on purpose, decorate the test with "
        "@conndiag.testing.allow_unsafe_queries({contexts})."
    )
    conndiag_wait = DEFAULT_WAIT
    _conndiag_owner: Owner | None = None
    _conndiag_watching = False

    def _conndiag_watch(self) -> Watch:
        watch = get_watch()
        if not self._conndiag_watching:
            watch.start()
            self._conndiag_watching = True
        return watch

    def startTest(self, test: unittest.TestCase) -> None:
        watch = self._conndiag_watch()
        allow = allowed_for(test, getattr(test, "_testMethodName", None))
        owner = self._conndiag_owner = watch.begin(test.id(), allow)
        owner.collect_work = True
        super().startTest(test)
        # Under --parallel an error is recorded against the running test: the report
        # names the test that started the work.
        self._conndiag_late(watch, test)

    def stopTest(self, test: unittest.TestCase) -> None:
        super().stopTest(test)
        owner = self._conndiag_owner
        if owner is not None:
            self._conndiag_owner = None
            get_watch().end(owner)

    def stopTestRun(self) -> None:
        if self._conndiag_watching:
            watch = get_watch()
            watch.settle_all(SESSION_WAIT)
            self._conndiag_late(watch, None)
            self._conndiag_watching = False
            watch.stop()
        super().stopTestRun()

    def _conndiag_failure(self) -> tuple[type[BaseException], BaseException, None] | None:
        owner = self._conndiag_owner
        if owner is None:
            return None
        watch = get_watch()
        watch.settle(owner, self.conndiag_wait)
        owner.collect_work = False
        events, more = owner.take()
        if not events:
            return None
        exc = UnsafeQueriesFound(report(owner, events, more, hint=self.HINT), events)
        return (UnsafeQueriesFound, exc, None)

    def _conndiag_late(self, watch: Watch, test: unittest.TestCase | None) -> None:
        for owner in watch.late():
            events, more = owner.take()
            if not events:
                continue
            where = f"while {test.id()} ran" if test is not None else "at the end of the run"
            text = report(owner, events, more, hint=self.HINT, late=where)
            exc = UnsafeQueriesFound(text, events)
            self.addError(_LateWork(owner.name), (UnsafeQueriesFound, exc, None))  # type: ignore[arg-type]

    def addSuccess(self, test: unittest.TestCase) -> None:
        err = self._conndiag_failure()
        if err is not None:
            self.addFailure(test, err)  # type: ignore[arg-type]
            return
        super().addSuccess(test)

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        err = self._conndiag_failure()
        if err is not None:
            # @expectedFailure on a test that "passes" only because the refusal was caught
            self.addExpectedFailure(test, err)  # type: ignore[arg-type]
            return
        super().addUnexpectedSuccess(test)


class _LateWork(unittest.TestCase):
    """Stands for a test that already ended, in a result's list of errors."""

    def __init__(self, name: str) -> None:
        super().__init__("run_nothing")
        self._name = name

    def run_nothing(self) -> None:  # pragma: no cover - never run
        pass

    def id(self) -> str:
        return self._name

    def __str__(self) -> str:
        return f"{self._name} (work still running after it ended)"

    def shortDescription(self) -> str | None:
        return None


_result_classes: dict[type[unittest.TestResult], type[unittest.TestResult]] = {}


def watched(result_class: type[unittest.TestResult]) -> type[unittest.TestResult]:
    """``result_class`` with conndiag's check (one subclass per class, cached)."""
    if issubclass(result_class, _WatchedResult):
        return result_class
    cls = _result_classes.get(result_class)
    if cls is None:
        name = "ConnDiag" + result_class.__name__
        bases = (_WatchedResult, result_class)
        cls = _result_classes[result_class] = type(name, bases, {})
    return cls


class WatchedRemoteTestResult(_WatchedResult, django_runner.RemoteTestResult):
    """The result a ``--parallel`` worker records its tests' outcomes with."""


class RemoteTestRunner(django_runner.RemoteTestRunner):
    resultclass = WatchedRemoteTestResult


class ParallelTestSuite(django_runner.ParallelTestSuite):
    runner_class = RemoteTestRunner


class DiscoverRunner(django_runner.DiscoverRunner):
    """Django's runner, failing each test during which conndiag refused or flagged a query.

    ``TEST_RUNNER = "conndiag.testing.DiscoverRunner"``, or ``manage.py test --testrunner
    conndiag.testing.DiscoverRunner``; works with ``--parallel``.
    """

    parallel_test_suite = ParallelTestSuite

    def __init__(self, *args: Any, conndiag_wait: float = DEFAULT_WAIT, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conndiag_wait = conndiag_wait
        WatchedRemoteTestResult.conndiag_wait = conndiag_wait

    @classmethod
    def add_arguments(cls, parser: Any) -> None:
        super().add_arguments(parser)
        parser.add_argument(
            "--conndiag-wait",
            type=float,
            default=DEFAULT_WAIT,
            help=(
                "Seconds to wait at the end of each test for the threads and tasks it "
                f"started, before conndiag checks them (default {DEFAULT_WAIT})."
            ),
        )

    def run_suite(self, suite: Any, **kwargs: Any) -> Any:
        # Watching before --parallel forks its workers lets them hand up, at exit, what
        # their last tests left running (the result collects it at the end of the run).
        watch = get_watch()
        watch.start()
        try:
            return super().run_suite(suite, **kwargs)
        finally:
            watch.stop()

    def get_resultclass(self) -> Any:
        base = super().get_resultclass() or unittest.TextTestResult
        cls = watched(base)
        cls.conndiag_wait = self.conndiag_wait  # type: ignore[attr-defined]
        return cls
