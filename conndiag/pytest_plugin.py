"""conndiag's pytest plugin: a test during which conndiag refused or flagged a query fails.

Loaded by pytest through the ``pytest11`` entry point whenever conndiag is installed (turn it
off with ``-p no:conndiag``). It is inert until Django's settings are configured with
``"conndiag"`` in ``INSTALLED_APPS`` and the app registry is ready: importing this module
imports nothing from Django, so a project without Django, or whose settings are configured
later, is not affected. The work is done by :mod:`conndiag.testing`.

* A test during which conndiag refused (policy ``raise``) or flagged (policy ``log``) a query,
  in any thread the test started (directly, through a view, through an executor) or in a
  process it forked, fails with each query's full message, even if its assertions passed
  and the application caught the exception. At the end of the test's call, it waits up to
  ``conndiag_wait`` seconds (ini, default 2) for the threads and tasks the call started.
* Work still running when its test ends stays that test's: if it is refused later, the
  report (an error on the originating test) comes before the next test, or at the end of
  the session, naming the test that started it.
* ``@pytest.mark.conndiag_allow`` opts a test out; ``@pytest.mark.conndiag_allow("cross_thread")``
  only for the contexts named.
* The ``conndiag_events`` fixture: the events recorded during the test.
"""

from __future__ import annotations

import sys
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .testing import Events, Owner, Watch

MARKER = "conndiag_allow"
HINT = (
    "To allow it on purpose, mark the test @pytest.mark.conndiag_allow({contexts}) "
    "(docs/testing.md)."
)
_OWNER: pytest.StashKey[Owner] = pytest.StashKey()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "conndiag_wait",
        "conndiag: seconds to wait, at the end of a test, for the threads and tasks it "
        "started before checking them (default 2)",
        default="2",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(*contexts): conndiag does not fail this test for refused or flagged "
        "queries (in the contexts named, or in any)",
    )
    config.pluginmanager.register(ConnDiagPlugin(config), "conndiag-watch")


def _conndiag_installed() -> bool:
    """Django is set up with conndiag installed (without importing Django if it is not)."""
    if "django" not in sys.modules:
        return False
    try:
        from django.apps import apps
        from django.conf import settings

        return bool(settings.configured and apps.ready and apps.is_installed("conndiag"))
    except Exception:
        return False


def _allowed(item: pytest.Item) -> frozenset[str]:
    from .testing import ALL_CONTEXTS, allowed_for

    contexts: set[str] = set()
    for mark in item.iter_markers(MARKER):
        if not mark.args:
            return ALL_CONTEXTS
        contexts.update(mark.args)
    # unittest tests decorated with conndiag.testing.allow_unsafe_queries()
    instance = getattr(item, "instance", None)
    if instance is not None:
        contexts |= allowed_for(instance, getattr(item, "name", None))
    return frozenset(contexts)


class ConnDiagPlugin:
    """The session's state: the watch, once Django with conndiag is there."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.watch: Watch | None = None
        self.wait = float(config.getini("conndiag_wait"))
        self.reported_late = 0
        self.session: pytest.Session | None = None

    def _activate(self) -> Watch | None:
        if self.watch is None and _conndiag_installed():
            from .testing import get_watch

            watch = get_watch()
            watch.start()
            self.watch = watch
        return self.watch

    # -- collection: a bad context in a marker is a usage error, Django or not ------------

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        contexts = ("request", "cross_thread", "detached", "forked", "background")
        for item in items:
            for mark in item.iter_markers(MARKER):
                unknown = [c for c in mark.args if c not in contexts]
                if unknown:
                    msg = (
                        f"{item.nodeid}: @pytest.mark.{MARKER}: unknown context "
                        f"{', '.join(repr(c) for c in unknown)}; expected some of "
                        f"{', '.join(repr(c) for c in contexts)}."
                    )
                    raise pytest.UsageError(msg)

    # -- each test ------------------------------------------------------------------------

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, None, None]:
        watch = self._activate()
        if watch is None:
            yield
            return
        self._report_late(watch, f"before {item.nodeid} started", item)
        owner = watch.begin(item.nodeid, _allowed(item), meta=(item.nodeid, item.location))
        item.stash[_OWNER] = owner
        try:
            yield
        finally:
            watch.end(owner)
            del item.stash[_OWNER]

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        # The fixtures are set up: threads and tasks started from now on are awaited at the
        # end of the call (a fixture's server thread is not).
        owner = item.stash.get(_OWNER, None)
        if owner is not None:
            owner.collect_work = True

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_call(self, item: pytest.Item) -> None:
        # Only reached when the test itself passed: fail it here, in its call phase, so an
        # xfail marker applies as for any failure.
        self._check(item, wait=True)

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        # What arrived after the call (or while a failing test's call failed): an error.
        self._check(item, wait=False)

    def _check(self, item: pytest.Item, wait: bool) -> None:
        owner = item.stash.get(_OWNER, None)
        watch = self.watch
        if owner is None or watch is None:
            return
        if wait:
            watch.settle(owner, self.wait)
            owner.collect_work = False
        else:
            watch.collect_children()
        if not owner.pending():
            return
        from .testing import report

        events, more = owner.take()
        pytest.fail(report(owner, events, more, hint=HINT), pytrace=False)

    # -- work that outlived its test ------------------------------------------------------

    def _report_late(self, watch: Watch, when: str, item: pytest.Item | None) -> None:
        """Report, as errors of the tests that started it, unsafe work found since they ended.

        Work outside any test is reported on ``item`` (the next test, or the last one).
        """
        from .testing import report

        for owner in watch.late():
            events, more = owner.take()
            if not events:
                continue
            if owner.meta is not None:
                nodeid, location = owner.meta
            elif item is not None:
                nodeid, location = item.nodeid, item.location
            else:
                continue
            text = report(owner, events, more, hint=HINT, late=when)
            rep = pytest.TestReport(
                nodeid=nodeid,
                location=location,
                keywords={},
                outcome="failed",
                longrepr=text,
                when="teardown",
            )
            self.reported_late += 1
            with self._as_xdist_item(nodeid):
                self.config.hook.pytest_runtest_logreport(report=rep)

    @contextmanager
    def _as_xdist_item(self, nodeid: str) -> Iterator[None]:
        """In an xdist worker, send a report of an earlier test as that test's.

        The worker tags each report with the index of the test it runs (and checks the
        node id matches); pointing it at the originating test for this report keeps the
        attribution right on the controller.
        """
        interactor: Any = next(
            (
                p
                for p in self.config.pluginmanager.get_plugins()
                if type(p).__name__ == "WorkerInteractor" and hasattr(p, "item_index")
            ),
            None,
        )
        session = self.session
        index = None
        if interactor is not None and session is not None:
            index = next((i for i, it in enumerate(session.items) if it.nodeid == nodeid), None)
        if interactor is None or index is None:
            yield
            return
        previous = interactor.item_index
        interactor.item_index = index
        try:
            yield
        finally:
            interactor.item_index = previous

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.session = session

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        watch = self.watch
        if watch is None:
            return
        from .testing import SESSION_WAIT

        watch.settle_all(SESSION_WAIT)
        items = self.session.items if self.session is not None else []
        self._report_late(watch, "at the end of the session", items[-1] if items else None)
        if self.reported_late and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        self.watch = None
        watch.stop()


@pytest.fixture
def conndiag_events(request: pytest.FixtureRequest) -> Events:
    """The events conndiag recorded during this test, in any thread it started.

    A list of :class:`conndiag.testing.Event` (``.name``, ``.context``, ``.action``,
    ``.outcome``, ``.thread_name``, ``.message``...), with ``.refused``, ``.flagged``,
    ``.queries``, ``.named(name)`` and ``.settle()`` (wait for the test's threads). To
    assert that a refusal happens, mark the test ``conndiag_allow`` too.
    """
    plugin: ConnDiagPlugin | None = request.config.pluginmanager.get_plugin("conndiag-watch")
    watch = plugin._activate() if plugin is not None else None
    owner = request.node.stash.get(_OWNER, None)
    if watch is None or owner is None:
        pytest.fail(
            "conndiag_events: the conndiag plugin is inactive here: Django's settings are not "
            "configured with 'conndiag' in INSTALLED_APPS (or the plugin was turned off).",
            pytrace=False,
        )
    return watch.capture(owner)
