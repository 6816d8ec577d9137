"""Prometheus metrics: each metric changes exactly as the scenario says (fresh registry each).

Scenarios run through Django's real WSGI handler (``tests.handlers``) on SQLite and on the
real MariaDB behind the ``mysql`` alias; nothing mocks the driver.
"""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from django.db import OperationalError, connections
from prometheus_client import CollectorRegistry, generate_latest

from conndiag import conf, runtime, serverfacts
from conndiag.lifecycle import report_abandoned
from conndiag.metrics import (
    AGE_BUCKETS,
    COMPONENTS,
    DURATION_BUCKETS,
    MetricsRecorder,
    build_metrics,
    component_label,
)
from conndiag.state import state_of
from tests.conftest import require_tool
from tests.handlers import wsgi_json
from tests.testapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "mysql"])

ROOT = Path(__file__).resolve().parent.parent


class Scrape:
    """A fresh registry with a metrics recorder installed as the only recorder."""

    def __init__(self, settings: Any) -> None:
        self.registry = CollectorRegistry()
        config = conf.get_config()
        self.recorder = MetricsRecorder(config, registry=self.registry)
        runtime._runtime = runtime.Runtime(config, [self.recorder])

    def __call__(self, name: str, **labels: str) -> float | None:
        """The sample's value after pushing pending query numbers (None: no such sample)."""
        self.recorder.flush()
        return self.registry.get_sample_value(name, labels)

    def text(self) -> bytes:
        self.recorder.flush()
        return generate_latest(self.registry)


@pytest.fixture
def m(settings: Any) -> Scrape:
    settings.CONNDIAG = {}
    conf.clear_cache()
    return Scrape(settings)


def _in_thread(fn: Any) -> None:
    t = threading.Thread(target=fn)
    t.start()
    t.join(30)


# -- building -----------------------------------------------------------------------------


def test_importing_creates_no_metrics() -> None:
    """Importing conndiag.metrics registers nothing on the default registry."""
    code = (
        "import conndiag.metrics, prometheus_client;"
        "names = [m.name for m in prometheus_client.REGISTRY.collect()];"
        "assert not any(n.startswith('conndiag') for n in names), names"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_build_metrics_is_once_per_registry() -> None:
    """Building twice on one registry (a rebuilt runtime) returns the same metrics, and
    registers nothing twice; a new registry gets its own set."""
    registry = CollectorRegistry()
    first = build_metrics(registry)
    assert build_metrics(registry) is first
    MetricsRecorder(conf.get_config(), registry=registry)
    MetricsRecorder(conf.get_config(), registry=registry)
    assert build_metrics(CollectorRegistry()) is not first


def test_default_registry_is_used_without_one(settings: Any) -> None:
    """``MetricsRecorder(config)`` (as the runtime builds it) uses the default registry."""
    from prometheus_client import REGISTRY

    assert MetricsRecorder(conf.get_config()).metrics is build_metrics(REGISTRY)
    assert (
        REGISTRY.get_sample_value(
            "conndiag_policy_info", {"context": "detached", "action": "raise"}
        )
        == 1
    )


def test_every_gauge_states_its_multiprocess_mode() -> None:
    """No Gauge relies on prometheus_client's default multiprocess mode."""
    from prometheus_client import Gauge

    metrics = build_metrics(CollectorRegistry())
    gauges = [v for v in vars(metrics).values() if isinstance(v, Gauge)]
    modes = {g._name: g._multiprocess_mode for g in gauges}
    assert modes == {
        "conndiag_connections_open": "livesum",
        "conndiag_oldest_connection_opened_timestamp_seconds": "livemin",
        "conndiag_longest_idle_connection_last_used_timestamp_seconds": "livemin",
        "conndiag_config_info": "livemax",
        "conndiag_policy_info": "livemax",
        "conndiag_conn_max_age_seconds": "livemax",
        "conndiag_server_wait_timeout_seconds": "livemin",
        "conndiag_server_max_connections": "livemax",
    }


def test_policy_info_follows_the_policy(settings: Any) -> None:
    """conndiag_policy_info is 1 for each context's action and 0 for the others."""
    settings.CONNDIAG = {"POLICY": {"cross_thread": "raise"}}
    registry = CollectorRegistry()
    MetricsRecorder(conf.get_config(), registry=registry)

    def info(context: str, action: str) -> float | None:
        return registry.get_sample_value(
            "conndiag_policy_info", {"context": context, "action": action}
        )

    assert info("cross_thread", "raise") == 1
    assert info("cross_thread", "log") == 0
    assert info("request", "ignore") == 1
    assert info("detached", "raise") == 1
    settings.CONNDIAG = {}
    MetricsRecorder(conf.get_config(), registry=registry)  # rebuilt runtime, same registry
    assert info("cross_thread", "raise") == 0
    assert info("cross_thread", "log") == 1


# -- queries --------------------------------------------------------------------------------


def test_request_queries_by_context_and_action(m: Scrape) -> None:
    """A sync view's two queries count as request/observed, with durations, ages, idles."""
    wsgi_json("/sync/")
    labels = {"alias": "default", "vendor": "sqlite"}
    assert m("conndiag_queries_total", **labels, context="request", action="observed") == 2
    assert m("conndiag_query_duration_seconds_count", **labels, context="request") == 2
    assert m("conndiag_connection_age_seconds_count", **labels) == 2
    assert m("conndiag_connection_idle_seconds_count", **labels) == 2
    assert m("conndiag_query_duration_seconds_sum", **labels, context="request") > 0
    assert m("conndiag_queries_total", **labels, context="background", action="observed") is None


def test_background_thread_queries(m: Scrape) -> None:
    """Queries in a thread started outside any request count as background."""
    _in_thread(lambda: (Item.objects.using("mysql").count(), connections["mysql"].close()))
    assert (
        m(
            "conndiag_queries_total",
            alias="mysql",
            vendor="mysql",
            context="background",
            action="observed",
        )
        == 1
    )


def test_detached_thread_started_by_a_live_request_is_refused(m: Scrape) -> None:
    """A thread started by a view while its request is live is detached: counted as raised,
    and nothing is observed in the histograms because the query never ran."""
    body = wsgi_json("/thread/", "db=mysql")
    assert body == {"thread": "refused:detached"}
    labels = {"alias": "mysql", "vendor": "mysql"}
    assert m("conndiag_queries_total", **labels, context="detached", action="raised") == 1
    assert m("conndiag_query_duration_seconds_count", **labels, context="detached") == 0


def test_cross_thread_query_is_logged(m: Scrape) -> None:
    """asyncio.to_thread work inside a live request counts as cross_thread/logged."""
    import asyncio

    from tests.handlers import asgi_get

    status, _ = asyncio.run(asgi_get("/async-to-thread/"))
    assert status == 200
    assert (
        m(
            "conndiag_queries_total",
            alias="default",
            vendor="sqlite",
            context="cross_thread",
            action="logged",
        )
        == 1
    )


def test_histogram_buckets_are_the_contract(m: Scrape) -> None:
    """The buckets are exactly those of the metric contract (dashboards depend on them)."""
    wsgi_json("/sync/")
    text = m.text().decode()
    for bound in DURATION_BUCKETS:
        assert (
            f'conndiag_query_duration_seconds_bucket{{alias="default",context="request",'
            f'le="{float(bound)}",vendor="sqlite"}}' in text
        )
    for bound in AGE_BUCKETS:
        assert (
            f'conndiag_connection_age_seconds_bucket{{alias="default",le="{float(bound)}",'
            f'vendor="sqlite"}}' in text
        )


def test_age_and_idle_land_in_the_right_buckets(m: Scrape) -> None:
    """A query after 1.2 s idle on a 1.2 s-old connection is observed above 1 s, below 5 s."""
    db = connections["mysql"]
    db.ensure_connection()
    time.sleep(1.2)
    Item.objects.using("mysql").count()
    labels = {"alias": "mysql", "vendor": "mysql"}
    for name in ("conndiag_connection_age_seconds", "conndiag_connection_idle_seconds"):
        assert m(f"{name}_bucket", **labels, le="1.0") == 0
        assert m(f"{name}_bucket", **labels, le="5.0") == 1
        assert 1.2 <= m(f"{name}_sum", **labels) < 5


def test_queries_from_many_threads_are_all_counted(m: Scrape) -> None:
    """Eight background threads x 25 queries: exactly 200, none lost between threads."""

    def work() -> None:
        for _ in range(25):
            Item.objects.using("mysql").count()
        connections["mysql"].close()

    workers = [threading.Thread(target=work) for _ in range(8)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert (
        m(
            "conndiag_queries_total",
            alias="mysql",
            vendor="mysql",
            context="background",
            action="observed",
        )
        == 200
    )
    assert m("conndiag_connection_idle_seconds_count", alias="mysql", vendor="mysql") == 200


def _unflushed(m: Scrape, name: str, **labels: str) -> float | None:
    """The sample as a scrape of another process would see it now (no flush first)."""
    return m.registry.get_sample_value(name, labels)


def test_request_end_pushes_the_request_threads_numbers(m: Scrape) -> None:
    """At the end of a request its thread's numbers are in the metrics already: another
    worker answering the scrape (which cannot flush this one) would see them."""
    wsgi_json("/sync/")
    labels = {"alias": "default", "vendor": "sqlite"}
    assert (
        _unflushed(m, "conndiag_queries_total", **labels, context="request", action="observed") == 2
    )
    assert _unflushed(m, "conndiag_query_duration_seconds_count", **labels, context="request") == 2


def test_a_batch_is_pushed_on_the_query_path_once_it_is_old(
    m: Scrape, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside requests a thread's numbers wait in its batch until a query finds the batch
    FLUSH_INTERVAL old; that query pushes them (no background thread does)."""
    monkeypatch.setattr("conndiag.metrics.FLUSH_INTERVAL", 0.3)
    labels = {"alias": "mysql", "vendor": "mysql", "context": "background", "action": "observed"}
    seen: list[float | None] = []

    def work() -> None:
        Item.objects.using("mysql").count()
        seen.append(_unflushed(m, "conndiag_queries_total", **labels))
        time.sleep(0.4)
        Item.objects.using("mysql").count()
        seen.append(_unflushed(m, "conndiag_queries_total", **labels))
        connections["mysql"].close()

    _in_thread(work)
    assert seen == [0, 2]


def test_no_conndiag_thread_and_no_fork_warning() -> None:
    """Queries, a request and a scrape start no thread, so a later fork gets no
    'process is multi-threaded' DeprecationWarning (Python 3.12+), even with warnings as
    errors; the forked child's own queries are counted."""
    code = textwrap.dedent("""
        import os, sys, threading, warnings
        warnings.simplefilter("error")
        import django
        django.setup()
        from django.db import connections
        from conndiag import metrics
        from tests.handlers import wsgi_get
        connection = connections["mysql"]
        for _ in range(3):
            with connection.cursor() as c:
                c.execute("SELECT 1")
        assert wsgi_get("/nothing/")[0].startswith("200")
        metrics.flush_all_quietly()
        assert threading.active_count() == 1, threading.enumerate()
        connection.close()  # the child opens its own
        pid = os.fork()
        if pid == 0:
            with connection.cursor() as c:
                c.execute("SELECT 1")
            connection.close()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert status == 0, status
        print("ok")
    """)
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_ended_threads_are_folded_and_released(m: Scrape) -> None:
    """200 threads that each run one query and end: their accumulators leave the registry
    of live threads when they end, and every query is counted exactly once."""
    metrics = m.recorder.metrics
    m.recorder.flush()
    live_before = len(metrics._live)

    def work() -> None:
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT 1")
        connections["default"].close()

    for _ in range(200):
        _in_thread(work)
    gc.collect()
    assert len(metrics._live) == live_before
    labels = {"alias": "default", "vendor": "sqlite", "context": "background"}
    assert m("conndiag_queries_total", **labels, action="observed") == 200
    assert m("conndiag_query_duration_seconds_count", **labels) == 200
    assert m("conndiag_queries_total", **labels, action="observed") == 200  # no double push


# -- connections opened and closed ------------------------------------------------------------


def test_explicit_close(m: Scrape) -> None:
    """Open, query, close(): opened +1 (background), open gauge 1 then 0, closed{explicit}."""
    labels = {"alias": "mysql", "vendor": "mysql"}
    Item.objects.using("mysql").count()
    assert m("conndiag_connections_opened_total", **labels, context="background") == 1
    assert m("conndiag_connection_open_duration_seconds_count", **labels) == 1
    assert m("conndiag_connections_open", **labels) == 1
    connections["mysql"].close()
    assert m("conndiag_connections_closed_total", **labels, reason="explicit") == 1
    assert m("conndiag_connections_open", **labels) == 0


def test_request_end_close_with_conn_max_age_zero(m: Scrape) -> None:
    """CONN_MAX_AGE=0 through the real WSGI handler: opened in request, closed request_end."""
    connections["mysql"].close()
    before = m(
        "conndiag_connections_closed_total", alias="mysql", vendor="mysql", reason="explicit"
    )
    wsgi_json("/sync/", "db=mysql")
    labels = {"alias": "mysql", "vendor": "mysql"}
    assert m("conndiag_connections_opened_total", **labels, context="request") == 1
    assert m("conndiag_connections_closed_total", **labels, reason="request_end") == 1
    assert m("conndiag_connections_closed_total", **labels, reason="explicit") == before
    assert m("conndiag_connections_open", **labels) == 0


def test_abandoned_connection_leaves_the_open_gauge(m: Scrape) -> None:
    """A thread ending without closing: open gauge 1 until gc, then closed{abandoned}."""
    labels = {"alias": "mysql", "vendor": "mysql"}
    gc.collect()  # connections earlier tests left behind are collected (and counted) now
    report_abandoned()  # the next safe point reports what gc found
    abandoned = m("conndiag_connections_closed_total", **labels, reason="abandoned") or 0
    gc.disable()
    try:
        t = threading.Thread(target=lambda: Item.objects.using("mysql").count())
        t.start()
        t.join(30)
        del t
        assert m("conndiag_connections_open", **labels) == 1
        assert m("conndiag_oldest_connection_opened_timestamp_seconds", **labels) < time.time()
    finally:
        gc.enable()
    gc.collect()
    report_abandoned()  # the next safe point reports what gc found
    assert m("conndiag_connections_closed_total", **labels, reason="abandoned") == abandoned + 1
    assert m("conndiag_connections_open", **labels) == 0
    assert m("conndiag_oldest_connection_opened_timestamp_seconds", **labels) == math.inf


def test_oldest_and_longest_idle_timestamps(m: Scrape) -> None:
    """Two open connections: oldest = the first one's open time; longest idle follows the
    connection that has not run a query the longest; +Inf once none is open."""
    labels = {"alias": "mysql", "vendor": "mysql"}
    start = time.time()
    Item.objects.using("mysql").count()  # main thread: connection A
    a = state_of(connections["mysql"])
    assert a is not None
    release = threading.Event()
    opened = threading.Event()

    def other() -> None:  # connection B, opened 1.1 s later, then idle
        Item.objects.using("mysql").count()
        opened.set()
        release.wait(30)
        connections["mysql"].close()

    time.sleep(1.1)
    t = threading.Thread(target=other)
    t.start()
    assert opened.wait(30)
    try:
        assert m("conndiag_connections_open", **labels) == 2
        oldest = m("conndiag_oldest_connection_opened_timestamp_seconds", **labels)
        assert oldest == a.opened_wall
        assert start <= oldest < start + 1
        idle_a = m("conndiag_longest_idle_connection_last_used_timestamp_seconds", **labels)
        assert start <= idle_a < start + 1  # A is the longest idle
        time.sleep(1.1)
        Item.objects.using("mysql").count()  # A runs again: B is now the longest idle
        idle_b = m("conndiag_longest_idle_connection_last_used_timestamp_seconds", **labels)
        assert idle_b > idle_a + 1
        assert idle_b < time.time() - 1
    finally:
        release.set()
        t.join(30)
    assert m("conndiag_connections_open", **labels) == 1
    connections["mysql"].close()
    assert m("conndiag_connections_open", **labels) == 0
    assert m("conndiag_oldest_connection_opened_timestamp_seconds", **labels) == math.inf
    assert m("conndiag_longest_idle_connection_last_used_timestamp_seconds", **labels) == math.inf


def test_config_gauges_are_set_on_first_connection(m: Scrape, settings: Any) -> None:
    """config_info and conn_max_age_seconds describe the alias's settings (+Inf: None)."""
    db = connections["mysql"]
    db.close()
    old = db.settings_dict["CONN_MAX_AGE"], db.settings_dict.get("CONN_HEALTH_CHECKS", False)
    db.settings_dict["CONN_MAX_AGE"] = None
    db.settings_dict["CONN_HEALTH_CHECKS"] = True
    try:
        Item.objects.using("mysql").count()
        labels = {"alias": "mysql", "vendor": "mysql"}
        assert (
            m(
                "conndiag_config_info",
                **labels,
                conn_max_age_state="persistent",
                health_checks="true",
            )
            == 1
        )
        assert m("conndiag_conn_max_age_seconds", **labels) == math.inf
        db.close()
        db.settings_dict["CONN_MAX_AGE"] = 60
        db.settings_dict["CONN_HEALTH_CHECKS"] = False
        Item.objects.using("mysql").count()
        assert (
            m(
                "conndiag_config_info",
                **labels,
                conn_max_age_state="persistent",
                health_checks="true",
            )
            == 0
        )
        assert (
            m("conndiag_config_info", **labels, conn_max_age_state="timed", health_checks="false")
            == 1
        )
        assert m("conndiag_conn_max_age_seconds", **labels) == 60
    finally:
        db.close()
        db.settings_dict["CONN_MAX_AGE"], db.settings_dict["CONN_HEALTH_CHECKS"] = old


def test_server_facts(m: Scrape) -> None:
    """wait_timeout and max_connections of the MariaDB server are exported per alias."""
    serverfacts.clear_cache()
    connections["mysql"].close()
    Item.objects.using("mysql").count()
    with connections["mysql"].cursor() as cursor:
        cursor.execute("SELECT @@session.wait_timeout, @@global.max_connections")
        wait_timeout, max_connections = cursor.fetchone()
    labels = {"alias": "mysql", "vendor": "mysql"}
    assert m("conndiag_server_wait_timeout_seconds", **labels) == float(wait_timeout)
    assert m("conndiag_server_max_connections", **labels) == float(max_connections)


# -- errors ---------------------------------------------------------------------------------


def test_real_2006_is_counted_by_class_and_code(m: Scrape, short_timeout: None) -> None:
    """Idle past wait_timeout=1: the stale query is counted, then its real 2006 error."""
    Item.objects.using("mysql").count()
    time.sleep(2.2)
    with pytest.raises(OperationalError):
        Item.objects.using("mysql").count()
    labels = {"alias": "mysql", "vendor": "mysql"}
    assert (
        m("conndiag_connection_errors_total", **labels, error_class="gone_away", code="2006") == 1
    )
    assert (
        m("conndiag_stale_connections_total", **labels, context="background", replaced="false") == 1
    )
    assert m("conndiag_queries_total", **labels, context="background", action="observed") == 2
    assert m("conndiag_server_wait_timeout_seconds", **labels) == 1


def test_replaced_stale_connection(m: Scrape, short_timeout: None, settings: Any) -> None:
    """REPLACE_STALE: stale{replaced=true}, closed{replaced_stale}, a second open, no error."""
    settings.CONNDIAG = {"REPLACE_STALE": True}
    m2 = Scrape(settings)
    Item.objects.using("mysql").count()
    time.sleep(2.2)
    Item.objects.using("mysql").count()
    labels = {"alias": "mysql", "vendor": "mysql"}
    assert (
        m2("conndiag_stale_connections_total", **labels, context="background", replaced="true") == 1
    )
    assert m2("conndiag_connections_closed_total", **labels, reason="replaced_stale") == 1
    assert m2("conndiag_connections_opened_total", **labels, context="background") == 2
    assert m2("conndiag_connections_open", **labels) == 1
    assert (
        m2("conndiag_connection_errors_total", **labels, error_class="gone_away", code="2006")
        is None
    )


def test_failed_connect(m: Scrape) -> None:
    """A refused connect counts an open failure and a connection error by class and code."""
    from conndiag.lifecycle import install

    db = connections.create_connection("mysql")
    db.settings_dict = dict(db.settings_dict, PORT="1", HOST="127.0.0.1")
    install(db)
    with pytest.raises(OperationalError):
        db.ensure_connection()
    labels = {"alias": "mysql", "vendor": "mysql"}
    assert m("conndiag_connection_open_failures_total", **labels, error_class="refused") == 1
    codes = [
        s
        for s in m.text().decode().splitlines()
        if s.startswith("conndiag_connection_errors_total{")
    ]
    assert len(codes) == 1
    assert 'code="2002"' in codes[0] or 'code="2003"' in codes[0]
    assert m("conndiag_connections_open", **labels) is None


def test_internal_errors_have_a_bounded_component(m: Scrape) -> None:
    """Components are cut at the first dot and drawn from a fixed set."""
    assert component_label("MetricsRecorder.query") == "metrics"
    assert component_label("EventLog.connection_opened") == "events"
    assert component_label("wrapper.classify") == "wrapper"
    assert component_label("/some/path?id=1") == "other"
    m.recorder.internal_error("lifecycle.connect", ValueError("x"), True)
    m.recorder.internal_error("Plugin.anything", ValueError("x"), False)
    assert m("conndiag_internal_errors_total", component="lifecycle") == 1
    assert m("conndiag_internal_errors_total", component="other") == 1
    assert set(COMPONENTS) >= {"wrapper", "lifecycle", "metrics", "events", "other"}


def test_no_unbounded_labels(m: Scrape) -> None:
    """After a busy scenario, no label carries SQL, a thread, a pid, a path or a request id."""
    wsgi_json("/sync/", "db=mysql")
    wsgi_json("/thread/", "db=mysql")
    _in_thread(lambda: (Item.objects.using("mysql").count(), connections["mysql"].close()))
    allowed = {
        "alias",
        "vendor",
        "context",
        "action",
        "reason",
        "error_class",
        "code",
        "replaced",
        "conn_max_age_state",
        "health_checks",
        "component",
        "le",
    }
    for family in m.registry.collect():
        for sample in family.samples:
            assert set(sample.labels) <= allowed, sample
            for value in sample.labels.values():
                assert "SELECT" not in value and "/" not in value and str(os.getpid()) != value


def test_metrics_off_means_no_recorder(settings: Any) -> None:
    """CONNDIAG['METRICS'] = False builds a runtime without the metrics recorder."""
    settings.CONNDIAG = {"METRICS": False}
    assert not any(isinstance(r, MetricsRecorder) for r in runtime.get().recorders)
    settings.CONNDIAG = {}
    assert any(isinstance(r, MetricsRecorder) for r in runtime.get().recorders)


# -- exposition -----------------------------------------------------------------------------


def _promtool(text: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60
    )


@pytest.fixture
def needs_promtool() -> None:
    require_tool("promtool", "prometheus")


@pytest.mark.usefixtures("needs_promtool")
def test_promtool_is_clean_single_process(m: Scrape, short_timeout: None) -> None:
    """``promtool check metrics`` reports nothing on a busy single-process exposition."""
    wsgi_json("/sync/")
    wsgi_json("/thread/", "db=mysql")
    Item.objects.using("mysql").count()
    time.sleep(2.2)
    with pytest.raises(OperationalError):
        Item.objects.using("mysql").count()
    m.recorder.internal_error("wrapper.classify", ValueError("x"), True)
    text = m.text()
    assert b"conndiag_connection_errors_total" in text
    result = _promtool(text)
    assert result.returncode == 0 and result.stdout == b"" and result.stderr == b"", result


MULTIPROCESS_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import django
    django.setup()
    from django.db import connections, OperationalError
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector
    from conndiag import conf, runtime
    from conndiag.metrics import MetricsRecorder, flush
    from tests.testapp.models import Item

    rec = MetricsRecorder(conf.get_config())
    runtime._runtime = runtime.Runtime(conf.get_config(), [rec])
    db = connections["mysql"]
    db.settings_dict["NAME"] = sys.argv[1]
    db.settings_dict["OPTIONS"] = {**db.settings_dict["OPTIONS"],
                                   "init_command": "SET SESSION wait_timeout=1"}
    with db.cursor() as c:
        c.execute("SELECT 1")
    time.sleep(2.2)
    try:
        with db.cursor() as c:
            c.execute("SELECT 1")
    except OperationalError:
        pass
    db.close()
    with db.cursor() as c:
        c.execute("SELECT 1")
    rec.internal_error("wrapper.classify", ValueError("x"), True)
    flush()
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    sys.stdout.buffer.write(generate_latest(registry))
""")


@pytest.mark.usefixtures("needs_promtool")
@pytest.mark.mysql
def test_promtool_is_clean_multiprocess(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set before prometheus_client loads (a subprocess),
    the MultiProcessCollector's exposition passes ``promtool check metrics``; the open
    gauge is summed without a pid label."""
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(mp_dir),
        "DJANGO_SETTINGS_MODULE": "tests.settings",
    }
    db_name = connections["mysql"].settings_dict["NAME"]
    result = subprocess.run(
        [sys.executable, "-c", MULTIPROCESS_SCRIPT, db_name],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    text = result.stdout
    assert b'conndiag_connections_open{alias="mysql",vendor="mysql"} 1.0' in text
    assert b'code="2006"' in text
    assert b"pid=" not in text
    checked = _promtool(text)
    assert checked.returncode == 0 and checked.stdout == b"" and checked.stderr == b"", checked


# -- cost -----------------------------------------------------------------------------------


def test_many_batched_queries_are_counted_exactly(m: Scrape) -> None:
    """100,000 queries recorded on one warm key all reach the counter (cost: tests/benchmark.py)."""
    Item.objects.using("mysql").count()
    db = connections["mysql"]
    state = state_of(db)
    from conndiag import threads
    from conndiag.records import Query

    q = Query(db, state, threads.current(), "request", None, "ignore", "SELECT 1", None, False, 0.5)
    q.duration = 0.0003
    m.recorder.query(q)
    for _ in range(100_000):
        m.recorder.query(q)
    assert (
        m(
            "conndiag_queries_total",
            alias="mysql",
            vendor="mysql",
            context="request",
            action="observed",
        )
        == 1 + 100_000
    )
