"""conndiag's pytest plugin, run in real pytest sessions (pytester, in subprocesses: each
inner session sets Django up with its own settings).

The inner project is a one-file Django site whose views hand a query to a thread, to a
pool, to a forked process, or do it safely; its tests only check the response, as a team's
tests would. The plugin must fail the ones whose work conndiag refused (or flagged),
with the refusal's message, and nothing else. Django's runner
(``conndiag.testing.DiscoverRunner``) is run on unittest cases of the same site.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

pytest_plugins = ["pytester"]

# Whole pytest sessions in subprocesses take seconds each: most are marked slow (run once, in
# the main session); the matrix keeps the in-process session, Django's runner under
# --parallel (version-sensitive) and the no-Django check.

SETTINGS = """
import os

SECRET_KEY = "inner"
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "innerapp"
USE_TZ = True
INSTALLED_APPS = os.environ.get("INNER_APPS", "conndiag").split(",") if os.environ.get(
    "INNER_APPS", "conndiag"
) else []
MIDDLEWARE = (
    ["conndiag.middleware.ConnDiagMiddleware"] if "conndiag" in INSTALLED_APPS else []
)
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
if os.environ.get("INNER_DB_FILE"):
    # a file, so that Django's --parallel workers get clones (and close the parent's)
    DATABASES["default"]["NAME"] = os.environ["INNER_DB_FILE"]
    DATABASES["default"]["TEST"] = {"NAME": os.environ["INNER_DB_FILE"] + ".test"}
CONNDIAG = {"POLICY": {"detached": os.environ.get("INNER_DETACHED", "raise")}}
LOGGING_CONFIG = None

import logging
import structlog

# conndiag's routine events stay quiet: the reports, not the log, are under test
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
"""

APP = '''
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from django.db import connection
from django.http import HttpResponse
from django.urls import path

POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inner-pool")


def query():
    """ORM work as an application does it, which catches (and logs) its errors."""
    try:
        connection.cursor().execute("SELECT 1")
    except Exception:
        pass
    finally:
        connection.close()


def later(delay):
    time.sleep(delay)
    query()


def thread_view(request):
    delay = float(request.GET.get("delay", 0))
    threading.Thread(target=later, args=(delay,), name="inner-thread").start()
    return HttpResponse("Task run success")


def pool_view(request):
    POOL.submit(query)
    return HttpResponse("Task run success")


def safe_view(request):
    connection.cursor().execute("SELECT 1")
    return HttpResponse("Task run success")


def background_view(request):
    import conndiag

    def work():
        with conndiag.background_db_work():
            query()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return HttpResponse("Task run success")


def fork_view(request):
    pid = os.fork()
    if pid == 0:
        try:
            thread = threading.Thread(target=query, name="child-thread")
            thread.start()
            thread.join()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return HttpResponse("Task run success")


urlpatterns = [
    path("thread", thread_view),
    path("pool", pool_view),
    path("safe", safe_view),
    path("background", background_view),
    path("fork", fork_view),
]
'''

TESTS = """
import pytest
from django.test import Client, TransactionTestCase

from conndiag.testing import allow_unsafe_queries

pytestmark = pytest.mark.django_db(transaction=True)


def get(path):
    response = Client().get(path)
    assert response.content == b"Task run success"


def test_safe():
    get("/safe")


def test_thread_refused():
    get("/thread")


def test_pool_refused():
    get("/pool")


def test_fork_refused():
    get("/fork")


def test_background_work_is_fine():
    get("/background")


@pytest.mark.conndiag_allow
def test_allowed():
    get("/thread")


@pytest.mark.conndiag_allow("cross_thread")
def test_allowed_elsewhere_only():
    get("/thread")


@pytest.mark.xfail(strict=True, reason="the view hands its work to a thread")
def test_expected_failure():
    get("/thread")


@pytest.mark.conndiag_allow("detached")
def test_events(conndiag_events):
    get("/thread")
    refused = conndiag_events.settle().refused
    assert [(e.context, e.thread_name) for e in refused] == [("detached", "inner-thread")]
    assert "GET /thread" in refused[0].message


class UnitTests(TransactionTestCase):
    def test_unit_refused(self):
        get("/thread")

    @allow_unsafe_queries("detached")
    def test_unit_allowed(self):
        get("/thread")
"""

FAILING = [
    "test_thread_refused",
    "test_pool_refused",
    "test_fork_refused",
    "test_allowed_elsewhere_only",
    "test_unit_refused",
]


@pytest.fixture
def site(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    # the outer session's DJANGO_SETTINGS_MODULE would win over the inner ini
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "innersettings")
    pytester.makepyfile(innersettings=SETTINGS, innerapp=APP)
    pytester.makeini(
        """
        [pytest]
        DJANGO_SETTINGS_MODULE = innersettings
        addopts = --strict-markers -p no:cacheprovider
        """
    )
    return pytester


def _outcomes(result: pytest.RunResult) -> dict[str, str]:
    """test name -> PASSED / FAILED / ERROR / XFAIL, from ``-rA`` style verbose lines."""
    found: dict[str, str] = {}
    for line in result.outlines:
        for word in ("PASSED", "FAILED", "ERROR", "XFAIL", "XPASS"):
            if line.startswith(word + " ") and "::" in line:
                name = line.split()[1].split("::")[-1]
                found.setdefault(name, word)
    return found


def _expect_main_outcomes(result: pytest.RunResult) -> None:
    outcomes = _outcomes(result)
    assert {name for name, o in outcomes.items() if o == "FAILED"} == set(FAILING), outcomes
    assert outcomes["test_expected_failure"] == "XFAIL"
    for name in ("test_safe", "test_background_work_is_fine", "test_allowed", "test_events"):
        assert outcomes[name] == "PASSED", (name, outcomes)
    assert outcomes["test_unit_allowed"] == "PASSED"
    result.stdout.fnmatch_lines(
        [
            "*conndiag refused 1 query during test_inner.py::test_thread_refused: in production*",
            "*1. refused [[]detached] thread 'inner-thread'*",
            "*conndiag refused a query on database 'default' (sqlite) from thread 'inner-thread'*"
            "started by request GET /thread*runs outside that request's thread*",
        ]
    )
    out = result.stdout.str()
    assert "Fix: run the work synchronously in the view" in out
    assert "mark the test @pytest.mark.conndiag_allow('detached')" in out
    # the pool's task and the forked process's thread are named too
    assert "thread 'inner-pool_0'" in out
    assert "thread 'child-thread'" in out
    assert result.ret == pytest.ExitCode.TESTS_FAILED


@pytest.mark.slow
def test_failing_passing_opted_out_forked_and_unittest(site: pytest.Pytester) -> None:
    """Refused work in a view's thread, a pool task or a forked process's thread fails the
    test (whose own assertion passed) with the full message; safe work, the escape hatch
    and opted-out tests pass; xfail applies; a marker naming another context does not
    opt out; unittest cases under pytest too."""
    site.makepyfile(test_inner=TESTS)
    result = site.runpytest_subprocess("-rA", "-p", "no:randomly")
    _expect_main_outcomes(result)


@pytest.mark.slow
def test_under_xdist(site: pytest.Pytester) -> None:
    """The same session with ``-n 2``: each worker watches its own tests."""
    site.makepyfile(test_inner=TESTS)
    result = site.runpytest_subprocess("-rA", "-n", "2")
    _expect_main_outcomes(result)


@pytest.mark.slow
def test_flagged_only(site: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``detached`` at ``log`` the query runs (flagged, not refused): the test fails all
    the same, saying "flagged"."""
    monkeypatch.setenv("INNER_DETACHED", "log")
    site.makepyfile(
        test_flagged="""
        import pytest
        from django.test import Client

        pytestmark = pytest.mark.django_db(transaction=True)

        def test_flagged():
            assert Client().get("/thread").status_code == 200

        def test_safe():
            assert Client().get("/safe").status_code == 200
        """
    )
    result = site.runpytest_subprocess("-rA")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*conndiag flagged 1 query during test_flagged.py::test_flagged*",
            "*1. flagged [[]detached] thread 'inner-thread'*",
            "*conndiag flagged a query on database 'default'*",
        ]
    )


@pytest.mark.slow
@pytest.mark.parametrize("xdist", [[], ["-n", "1"]], ids=["plain", "xdist"])
def test_work_that_outlives_its_test_is_reported_against_it(
    site: pytest.Pytester, xdist: list[str]
) -> None:
    """A test that starts a thread and returns (not awaited: ``conndiag_wait = 0``): the
    refusal, 0.5 s later, is reported as an error of *that* test (before the next one
    starts, or at the end of the session), never as a failure of the test running then.
    Under xdist the worker's reports reach the controller, the end-of-session one too.

    Django is set up by a conftest, without pytest-django (``-p no:django``): the plugin
    needs only Django's settings and apps, and pytest-django's database blocker would
    stop the late thread before conndiag sees its query.
    """
    site.makeconftest(
        """
        import django

        django.setup()
        """
    )
    site.makepyfile(
        test_late="""
        import time
        from django.test import Client


        def test_leaves_a_thread():
            assert Client().get("/thread?delay=0.5").status_code == 200


        def test_innocent_while_it_runs():
            time.sleep(1.0)


        def test_after():
            pass


        def test_leaves_another_at_the_end():
            assert Client().get("/thread?delay=0.5").status_code == 200
        """
    )
    result = site.runpytest_subprocess("-rA", "-o", "conndiag_wait=0", "-p", "no:django", *xdist)
    outcomes = _outcomes(result)
    assert outcomes["test_innocent_while_it_runs"] == "PASSED", outcomes
    assert outcomes["test_after"] == "PASSED"
    assert outcomes["test_leaves_a_thread"] == "PASSED"  # its call passed...
    result.stdout.fnmatch_lines(
        [
            # ...and its late refusal is an error of its own, found before test_after
            "*conndiag refused 1 query in work that test_late.py::test_leaves_a_thread started "
            "and that was still running when it ended (found before test_late.py::test_after "
            "started)*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*conndiag refused 1 query in work that test_late.py::test_leaves_another_at_the_end "
            "started and that was still running when it ended (found at the end of the session)*",
        ]
    )
    errors = [line for line in result.outlines if line.startswith("ERROR ")]
    assert len(errors) == 2, result.outlines
    assert all("test_leaves_a" in line for line in errors), errors
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_inert_without_django(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """A project without Django: the plugin loads, imports nothing from Django, and the
    marker is registered (``--strict-markers`` passes)."""
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    pytester.makepyfile(
        test_plain="""
        import sys
        import pytest

        @pytest.mark.conndiag_allow("detached")
        def test_plain():
            assert "conndiag.pytest_plugin" in sys.modules
            assert "django" not in sys.modules
        """
    )
    result = pytester.runpytest_subprocess("--strict-markers", "-p", "no:django")
    result.assert_outcomes(passed=1)


@pytest.mark.slow
def test_inert_without_conndiag_in_installed_apps(
    site: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Django configured without conndiag: nothing is watched, nothing fails because of the
    plugin, and the fixture says why it cannot help."""
    monkeypatch.setenv("INNER_APPS", "")
    site.makepyfile(
        test_noapp="""
        import pytest
        from django.test import Client

        pytestmark = pytest.mark.django_db(transaction=True)

        def test_thread():
            assert Client().get("/thread").status_code == 200

        def test_fixture(conndiag_events):
            pass
        """
    )
    result = site.runpytest_subprocess("-rA")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*conndiag_events: the conndiag plugin is inactive here*"])


@pytest.mark.slow
def test_a_typo_in_the_marker_is_a_usage_error(site: pytest.Pytester) -> None:
    """``conndiag_allow("detatched")`` stops the session naming the test and the contexts."""
    site.makepyfile(
        test_typo="""
        import pytest

        @pytest.mark.conndiag_allow("detatched")
        def test_typo():
            pass
        """
    )
    result = site.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_typo.py::test_typo*unknown context 'detatched'*"])


UNIT = """
import threading
import unittest

from django.test import Client, SimpleTestCase, TransactionTestCase

from conndiag.testing import allow_unsafe_queries


def get(path):
    response = Client().get(path)
    assert response.content == b"Task run success"


class Broken(TransactionTestCase):
    def test_thread(self):
        get("/thread")

    @unittest.expectedFailure
    def test_thread_expected(self):
        get("/thread")


class Fine(TransactionTestCase):
    def test_safe(self):
        get("/safe")


class Late(TransactionTestCase):
    def test_leaves_a_thread(self):
        get("/thread?delay=1.5")

    @allow_unsafe_queries("detached")
    def test_allowed(self):
        get("/pool")
"""


@pytest.mark.parametrize("parallel", [pytest.param("1", marks=pytest.mark.slow), "2"])
def test_django_runner(
    site: pytest.Pytester, parallel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``manage.py test --testrunner conndiag.testing.DiscoverRunner`` (and ``--parallel
    2``, forked workers): the refused test fails with the message, ``@expectedFailure``
    counts as an expected failure, safe and allowed tests pass; the thread a test leaves
    running past the wait (``--conndiag-wait 0.5``) is reported as an error naming that test, even when it
    is refused after its worker's last test."""
    monkeypatch.setenv("INNER_DB_FILE", str(site.path / "inner.sqlite3"))
    site.mkpydir("djt")
    site.makepyfile(**{"djt/test_unit": UNIT})
    result = site.run(
        sys.executable,
        "-m",
        "django",
        "test",
        "djt",
        "--settings",
        "innersettings",
        "--testrunner",
        "conndiag.testing.DiscoverRunner",
        "--parallel",
        parallel,
        "--conndiag-wait",
        "0.5",
        "-v",
        "2",
    )
    err = result.stderr.str()
    assert result.ret == 1, err
    assert "FAILED (failures=1, errors=1, expected failures=1)" in err, err
    assert "in work that djt.test_unit.Late.test_leaves_a_thread started" in err.replace("\n", " ")
    assert textwrap.dedent(
        "conndiag refused 1 query during djt.test_unit.Broken.test_thread"
    ) in err.replace("\n", " ")
    assert "started by request GET /thread" in err
    assert "@conndiag.testing.allow_unsafe_queries('detached')" in err
    assert "test_safe (djt.test_unit.Fine" in err


INPROCESS = """
import threading
import time

import pytest
from django.db import connections
from django.test import Client

from conndiag import scope
from tests.testapp.models import Item


def test_thread():
    assert Client().get("/thread/").json() == {"thread": "refused:detached"}


def test_pool():
    assert Client().get("/executor/").json() == {"task": "refused:detached"}


def test_safe():
    assert Client().get("/sync/").status_code == 200


@pytest.mark.conndiag_allow
def test_allowed():
    Client().get("/thread/")


@pytest.mark.conndiag_allow("detached")
def test_events(conndiag_events):
    Client().get("/executor/")
    Client().get("/sync/")
    assert [e.context for e in conndiag_events.settle().refused] == ["detached"]
    assert {e.context for e in conndiag_events.named("conndiag.query")} == {"request"}
    assert conndiag_events.flagged == []


def test_fails_by_itself():
    Client().get("/thread/")
    assert False, "its own failure"


def _late_work():
    time.sleep(0.3)
    try:
        Item.objects.create(name="late")
    except Exception:
        pass
    finally:
        connections.close_all()


def test_leaves_a_thread():
    scope.on_request_started(None)  # as a view would: start a thread, return
    try:
        threading.Thread(target=_late_work, name="late-thread").start()
    finally:
        scope.on_request_finished(None)


def test_innocent():
    time.sleep(0.8)


def test_last():
    pass
"""


@pytest.mark.django_db(transaction=True)
def test_in_this_process(pytester: pytest.Pytester) -> None:
    """The plugin in a session of this very process (with this suite's Django set up and
    its views): refused work in a view's thread or pool task fails the test, safe and
    allowed tests pass, the fixture has the events, a test failing by itself gets conndiag's
    report as a teardown error, and late work is reported against the test that started it.
    After the session nothing of the plugin is left on the runtime or on ``Thread.start``."""
    import threading

    from conndiag import runtime

    start = threading.Thread.start
    recorders = runtime.get().recorders
    pytester.makepyfile(test_inproc=INPROCESS)
    result = pytester.runpytest_inprocess(
        "-p", "no:django", "-p", "no:cacheprovider", "-o", "conndiag_wait=0.2", "-rA"
    )
    outcomes = _outcomes(result)
    assert outcomes["test_thread"] == "FAILED", outcomes
    assert outcomes["test_pool"] == "FAILED"
    assert any(
        line.startswith("FAILED test_inproc.py::test_fails_by_itself - AssertionError")
        for line in result.outlines
    )
    for name in ("test_safe", "test_allowed", "test_events", "test_innocent", "test_last"):
        assert outcomes[name] == "PASSED", (name, outcomes)
    result.stdout.fnmatch_lines(
        [
            "*conndiag refused 1 query during test_inproc.py::test_thread: in production*",
            "*started by request GET /thread/*",
        ]
    )
    errors = [line for line in result.outlines if line.startswith("ERROR ")]
    assert any("test_fails_by_itself" in line for line in errors), errors
    assert any("test_leaves_a_thread" in line for line in errors), errors
    result.stdout.fnmatch_lines(
        [
            "*conndiag refused 1 query in work that test_inproc.py::test_leaves_a_thread started"
            "*found before test_inproc.py::test_last started*",
        ]
    )
    assert threading.Thread.start is start
    assert runtime.get().recorders == recorders or all(
        type(r).__name__ != "_Listener" for r in runtime.get().recorders
    )
