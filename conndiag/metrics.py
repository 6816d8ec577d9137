"""Prometheus metrics for the connection lifecycle, correct under multi-process servers.

:func:`build_metrics` creates every metric on a registry, once per registry (a runtime
rebuilt after a settings change reuses the same set), never at import. With
``PROMETHEUS_MULTIPROC_DIR`` set, prometheus_client stores values in per-process files;
the same code works there because every Gauge states its ``multiprocess_mode`` and nothing
uses Info/Enum, custom collectors, ``set_function`` or ``remove()``.

The hot path (:meth:`MetricsRecorder.query`) does not touch prometheus_client at all: each
thread adds to its own plain list of numbers (one list per alias, vendor, context and
action; no lock, no label lookup), and those numbers are pushed into the metrics' values by
:func:`flush`, which runs every :data:`FLUSH_INTERVAL` seconds on a daemon thread, before
every scrape served by :mod:`conndiag.views`, and at exit. A scrape therefore sees every
query of the scraped process, and other processes' queries at most ``FLUSH_INTERVAL`` late.
Connection events (open, close, stale, errors) are rare and update the metrics directly.

"When" gauges are timestamps (compute ages in PromQL with ``time() - metric``). The two
``livemin`` timestamp gauges are ``+Inf`` while a process has no open connection of an
alias: ``+Inf`` is the identity of ``min``, so the aggregate over processes stays right;
filter it with ``< +Inf`` (see docs/metrics.md).
"""

from __future__ import annotations

import atexit
import math
import os
import threading
import time
import weakref
from bisect import bisect_left
from typing import TYPE_CHECKING, Any

from . import process
from .conf import ACTIONS, CONTEXTS
from .records import ACTION_LABELS

if TYPE_CHECKING:
    from collections.abc import Callable

    from prometheus_client import CollectorRegistry

    from .conf import Config
    from .records import Diagnosis, Query
    from .state import ConnState
    from .threads import ThreadInfo

INF = math.inf

#: query durations: 100 µs (SQLite) to multi-second (MySQL)
DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
#: connection age and idle time: 10 ms to 8 hours (MySQL's default wait_timeout)
AGE_BUCKETS = (
    0.01,
    0.1,
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    28800.0,
)
#: connect durations
OPEN_BUCKETS = DURATION_BUCKETS

#: seconds between two pushes of the per-thread query numbers into the metrics
FLUSH_INTERVAL = 1.0
#: the longest-idle timestamp is republished when it moved by at least this many seconds
IDLE_RESOLUTION = 1.0

#: the ``component`` label of ``conndiag_internal_errors_total`` (anything else: ``other``)
COMPONENTS = (
    "wrapper",
    "lifecycle",
    "stale",
    "serverfacts",
    "classify",
    "scope",
    "threads",
    "middleware",
    "background",
    "events",
    "metrics",
    "other",
)
_COMPONENT_ALIASES = {"EventLog": "events", "MetricsRecorder": "metrics"}

# Layout of one accumulator (a flat list of floats, see _Acc).
_DUR_B = (*(float(b) for b in DURATION_BUCKETS), INF)
_AGE_B = (*(float(b) for b in AGE_BUCKETS), INF)
_N = 0  # queries (conndiag_queries_total)
_DSUM = 1  # duration sum; duration buckets follow
_DB = 2
_ASUM = _DB + len(_DUR_B)  # age sum; age buckets follow
_AB = _ASUM + 1
_ISUM = _AB + len(_AGE_B)  # idle sum; idle buckets follow
_IB = _ISUM + 1
_SLOTS = _IB + len(_AGE_B)


def component_label(component: str) -> str:
    """A bounded ``component`` label: the part before the first ``.``, from a fixed set."""
    head = component.split(".", 1)[0]
    head = _COMPONENT_ALIASES.get(head, head)
    return head if head in COMPONENTS else "other"


def multiprocess_dir() -> str | None:
    """prometheus_client's multi-process directory, if this process uses one."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get(
        "prometheus_multiproc_dir"  # noqa: SIM112 - the old name prometheus_client still reads
    )


class _Series:
    """Per-process state of one (alias, vendor): its open connections and their gauges."""

    __slots__ = (
        "config_labels",
        "idle_gauge",
        "idle_holder",
        "idle_published",
        "key",
        "oldest_gauge",
        "oldest_holder",
        "open",
        "open_gauge",
    )

    def __init__(self, metrics: Metrics, alias: str, vendor: str) -> None:
        self.key = (alias, vendor)
        self.open: dict[ConnState, None] = {}
        self.open_gauge = metrics.connections_open.labels(alias, vendor)
        self.oldest_gauge = metrics.oldest_opened.labels(alias, vendor)
        self.oldest_gauge.set(INF)  # before a scrape can see prometheus_client's initial 0
        self.idle_gauge = metrics.longest_idle.labels(alias, vendor)
        self.idle_gauge.set(INF)
        self.oldest_holder: ConnState | None = None
        self.idle_holder: ConnState | None = None
        self.idle_published = INF
        #: (conn_max_age_state, health_checks) last published in conndiag_config_info
        self.config_labels: tuple[str, str] | None = None

    def reset(self) -> None:
        """Forget every open connection (after fork: they belong to the parent)."""
        self.open.clear()
        self.open_gauge.set(0)
        self.recompute()

    def recompute(self) -> None:
        """Republish the oldest-open and longest-idle timestamps."""
        for _ in range(3):  # a gc-run finalizer may close a connection while we iterate
            try:
                states = list(self.open)
                break
            except RuntimeError:
                continue
        else:
            return
        if not states:
            self.oldest_holder = self.idle_holder = None
            self.idle_published = INF
            self.oldest_gauge.set(INF)
            self.idle_gauge.set(INF)
            return
        oldest = min(states, key=_opened_wall)
        self.oldest_holder = oldest
        self.oldest_gauge.set(oldest.opened_wall)
        self.recompute_idle(states)

    def recompute_idle(self, states: list[ConnState] | None = None) -> None:
        if states is None:
            try:
                states = list(self.open)
            except RuntimeError:
                return
        if not states:
            return
        holder = min(states, key=_last_used_wall)
        self.idle_holder = holder
        self.idle_published = _last_used_wall(holder)
        self.idle_gauge.set(self.idle_published)


def _opened_wall(state: ConnState) -> float:
    return state.opened_wall


def _last_used_wall(state: ConnState) -> float:
    """Wall-clock time of the end of the connection's last query (its open if none ran)."""
    last = state.last_used
    if last is None:
        return state.opened_wall
    return state.opened_wall + (last - state.opened)


class _Acc:
    """One thread's query numbers for one (alias, vendor, context, action)."""

    __slots__ = ("pushed", "series", "targets", "v")

    def __init__(self, series: _Series, targets: list[Callable[[float], None]]) -> None:
        self.series = series
        #: running totals, written by the owning thread only (see the layout above)
        self.v = [0.0] * _SLOTS
        #: what flush() already pushed (touched under the flush lock only)
        self.pushed = [0.0] * _SLOTS
        self.targets = targets


class _ThreadAccs:
    __slots__ = ("accs", "thread")

    def __init__(self) -> None:
        self.thread = weakref.ref(threading.current_thread())
        self.accs: dict[tuple[str, str, str, str], _Acc] = {}

    def alive(self) -> bool:
        thread = self.thread()
        return thread is not None and thread.is_alive()


class Metrics:
    """Every conndiag metric on one registry, plus the per-process state they need."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        av = ("alias", "vendor")
        r = registry
        self.queries = Counter(
            "conndiag_queries_total",
            "Queries seen by conndiag, by context and action.",
            (*av, "context", "action"),
            registry=r,
        )
        self.query_duration = Histogram(
            "conndiag_query_duration_seconds",
            "Duration of queries that ran.",
            (*av, "context"),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.connection_age = Histogram(
            "conndiag_connection_age_seconds",
            "Age of the connection when a query ran on it.",
            av,
            buckets=AGE_BUCKETS,
            registry=r,
        )
        self.connection_idle = Histogram(
            "conndiag_connection_idle_seconds",
            "Time the connection sat idle before a query ran on it.",
            av,
            buckets=AGE_BUCKETS,
            registry=r,
        )
        self.opened = Counter(
            "conndiag_connections_opened_total",
            "Connections opened, by the context of the thread that opened them.",
            (*av, "context"),
            registry=r,
        )
        self.open_duration = Histogram(
            "conndiag_connection_open_duration_seconds",
            "Time taken to open a connection.",
            av,
            buckets=OPEN_BUCKETS,
            registry=r,
        )
        self.open_failures = Counter(
            "conndiag_connection_open_failures_total",
            "Failed attempts to open a connection.",
            (*av, "error_class"),
            registry=r,
        )
        self.closed = Counter(
            "conndiag_connections_closed_total",
            "Connections closed, by reason.",
            (*av, "reason"),
            registry=r,
        )
        self.connections_open = Gauge(
            "conndiag_connections_open",
            "Connections open now.",
            av,
            multiprocess_mode="livesum",
            registry=r,
        )
        self.oldest_opened = Gauge(
            "conndiag_oldest_connection_opened_timestamp_seconds",
            "When the oldest open connection was opened (+Inf: none open).",
            av,
            multiprocess_mode="livemin",
            registry=r,
        )
        self.longest_idle = Gauge(
            "conndiag_longest_idle_connection_last_used_timestamp_seconds",
            "When the longest-idle open connection last finished a query (+Inf: none open).",
            av,
            multiprocess_mode="livemin",
            registry=r,
        )
        self.errors = Counter(
            "conndiag_connection_errors_total",
            "Database errors of queries and connects, by class and driver code.",
            (*av, "error_class", "code"),
            registry=r,
        )
        self.stale = Counter(
            "conndiag_stale_connections_total",
            "Queries about to run on a connection idle past the server's wait_timeout.",
            (*av, "context", "replaced"),
            registry=r,
        )
        self.config_info = Gauge(
            "conndiag_config_info",
            "Connection settings of each alias (value 1).",
            (*av, "conn_max_age_state", "health_checks"),
            multiprocess_mode="livemax",
            registry=r,
        )
        self.policy_info = Gauge(
            "conndiag_policy_info",
            "conndiag's policy: the action per context (value 1).",
            ("context", "action"),
            multiprocess_mode="livemax",
            registry=r,
        )
        self.conn_max_age = Gauge(
            "conndiag_conn_max_age_seconds",
            "CONN_MAX_AGE of each alias (+Inf: persistent).",
            av,
            multiprocess_mode="livemax",
            registry=r,
        )
        self.server_wait_timeout = Gauge(
            "conndiag_server_wait_timeout_seconds",
            "The server's session wait_timeout.",
            av,
            multiprocess_mode="livemin",
            registry=r,
        )
        self.server_max_connections = Gauge(
            "conndiag_server_max_connections",
            "The server's max_connections.",
            av,
            multiprocess_mode="livemax",
            registry=r,
        )
        self.internal_errors = Counter(
            "conndiag_internal_errors_total",
            "Failures of conndiag's own code.",
            ("component",),
            registry=r,
        )

        self._lock = threading.RLock()
        self._flush_lock = threading.Lock()
        self._local = threading.local()
        self._threads: list[_ThreadAccs] = []
        self._series: dict[tuple[str, str], _Series] = {}
        #: (alias, vendor, context) -> push targets shared by every thread's accumulator
        self._targets: dict[tuple[str, str, str], list[Callable[[float], None]]] = {}
        self._counter_children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    # -- resolving labelled children (off the hot path) ----------------------------------

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached."""
        key = (metric, labels)
        child = self._counter_children.get(key)
        if child is None:
            child = self._counter_children[key] = metric.labels(*labels)
        return child

    def series(self, alias: str, vendor: str) -> _Series:
        s = self._series.get((alias, vendor))
        if s is None:
            with self._lock:
                s = self._series.get((alias, vendor))
                if s is None:
                    s = self._series[(alias, vendor)] = _Series(self, alias, vendor)
        return s

    def _push_targets(
        self, alias: str, vendor: str, context: str, action: str
    ) -> list[Callable[[float], None]]:
        counter = self.queries.labels(alias, vendor, context, ACTION_LABELS[action])
        key = (alias, vendor, context)
        hist = self._targets.get(key)
        if hist is None:
            hist = []
            for child in (
                self.query_duration.labels(alias, vendor, context),
                self.connection_age.labels(alias, vendor),
                self.connection_idle.labels(alias, vendor),
            ):
                sum_value = getattr(child, "_sum", None)
                buckets = getattr(child, "_buckets", None)
                if sum_value is None or buckets is None:
                    msg = (
                        "this prometheus_client's Histogram has no _sum/_buckets values, "
                        "which conndiag's batched observations need; install a "
                        "prometheus-client version conndiag supports (>=0.17)"
                    )
                    raise RuntimeError(msg)
                hist.append(sum_value.inc)
                hist.extend(b.inc for b in buckets)
            self._targets[key] = hist
        return [counter.inc, *hist]

    def new_acc(
        self, accs: dict[tuple[str, str, str, str], _Acc], key: tuple[str, str, str, str]
    ) -> _Acc:
        alias, vendor, context, action = key
        with self._lock:
            acc = _Acc(
                self.series(alias, vendor), self._push_targets(alias, vendor, context, action)
            )
        accs[key] = acc
        return acc

    def thread_accs(self) -> dict[tuple[str, str, str, str], _Acc]:
        holder = _ThreadAccs()
        self._local.accs = holder.accs
        with self._lock:
            self._threads.append(holder)
        _ensure_flusher()
        return holder.accs

    # -- flushing ------------------------------------------------------------------------

    def flush(self) -> None:
        """Push every thread's query numbers into the metrics' values."""
        with self._flush_lock:
            with self._lock:
                holders = list(self._threads)
            dead = []
            for holder in holders:
                alive = holder.alive()  # before reading: a dead thread writes no more
                for acc in list(holder.accs.values()):
                    v, pushed, targets = acc.v, acc.pushed, acc.targets
                    for i in range(_SLOTS):
                        value = v[i]
                        delta = value - pushed[i]
                        if delta:
                            pushed[i] = value
                            targets[i](delta)
                if not alive:
                    dead.append(holder)
            if dead:
                with self._lock:
                    self._threads = [h for h in self._threads if h not in dead]

    def after_fork_in_child(self) -> None:
        """The parent's threads and connections are not this process's: forget them."""
        self._flush_lock = threading.Lock()
        self._lock = threading.RLock()
        for holder in self._threads:
            for acc in holder.accs.values():
                acc.pushed[:] = acc.v  # the parent pushes (or pushed) these
        self._threads = [h for h in self._threads if h.alive()]
        for series in self._series.values():
            series.reset()


# -- one metric set per registry, one flusher thread per process ---------------------------

_sets: weakref.WeakKeyDictionary[Any, Metrics] = weakref.WeakKeyDictionary()
_sets_lock = threading.Lock()
_flusher_pid = 0
_hooks_installed = False


def build_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """Every conndiag metric on ``registry`` (the default registry when None).

    Created on the first call for a registry and reused afterwards, so rebuilding the
    runtime never registers a metric twice.
    """
    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    metrics = _sets.get(registry)
    if metrics is None:
        with _sets_lock:
            metrics = _sets.get(registry)
            if metrics is None:
                metrics = _sets[registry] = Metrics(registry)
                _install_process_hooks()
    return metrics


def flush(registry: CollectorRegistry | None = None) -> None:
    """Push pending query numbers into the metrics of ``registry`` (all registries: None)."""
    if registry is None:
        targets = list(_sets.values())
    else:
        found = _sets.get(registry)
        targets = [] if found is None else [found]
    for metrics in targets:
        metrics.flush()


def _flush_all_quietly() -> None:
    from .lifecycle import report_abandoned

    try:
        report_abandoned()  # a safe point for what garbage collection found
    except Exception as exc:
        from . import runtime

        rt = runtime._runtime
        if rt is not None:
            rt.internal_error("lifecycle.report_abandoned", exc)
    for metrics in list(_sets.values()):
        try:
            metrics.flush()
        except Exception as exc:
            from . import runtime

            rt = runtime._runtime
            if rt is not None:
                rt.internal_error("metrics.flush", exc)


def _flush_loop(pid: int) -> None:
    while _flusher_pid == pid:
        time.sleep(FLUSH_INTERVAL)
        _flush_all_quietly()


def _ensure_flusher() -> None:
    """Start this process's flusher thread unless it runs already."""
    global _flusher_pid
    pid = os.getpid()
    if _flusher_pid == pid:
        return
    with _sets_lock:
        if _flusher_pid == pid:
            return
        _flusher_pid = pid
        threading.Thread(
            target=_flush_loop, args=(pid,), name="conndiag-metrics-flush", daemon=True
        ).start()


def _after_fork_in_child() -> None:
    global _sets_lock, _flusher_pid
    _sets_lock = threading.Lock()
    _flusher_pid = 0  # the flusher thread did not survive the fork
    for metrics in list(_sets.values()):
        metrics.after_fork_in_child()


def _install_process_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    os.register_at_fork(after_in_child=_after_fork_in_child)
    atexit.register(_flush_all_quietly)


# -- the recorder --------------------------------------------------------------------------


class MetricsRecorder:
    """The Prometheus recorder (see :class:`conndiag.records.Recorder`)."""

    __slots__ = ("_local", "config", "metrics")

    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics = m = build_metrics(registry)
        self._local = m._local
        for context in CONTEXTS:
            chosen = config.policy.get(context)
            for action in ACTIONS:
                m.policy_info.labels(context, action).set(1 if action == chosen else 0)

    def flush(self) -> None:
        """Push pending query numbers into the metrics (a scrape does this itself)."""
        self.metrics.flush()

    # -- Recorder --------------------------------------------------------------------------

    def query(self, q: Query) -> None:
        try:
            accs = self._local.accs
        except AttributeError:
            accs = self.metrics.thread_accs()
        state = q.state
        key = (state.alias, state.vendor, q.context, q.action)
        acc = accs.get(key)
        if acc is None:
            acc = self.metrics.new_acc(accs, key)
        v = acc.v
        v[0] += 1  # _N
        duration = q.duration
        if duration is None:  # refused: it never ran
            return
        v[1] += duration  # _DSUM
        v[2 + bisect_left(_DUR_B, duration)] += 1  # _DB
        last: float = state.last_used  # type: ignore[assignment] # set: the query ran
        age = last - state.opened
        v[_ASUM] += age
        v[_AB + bisect_left(_AGE_B, age)] += 1
        idle = q.idle
        v[_ISUM] += idle
        v[_IB + bisect_left(_AGE_B, idle)] += 1
        if q.diagnosis is not None:
            self._error(state.alias, state.vendor, q.diagnosis)
        series = acc.series
        if (
            state is series.idle_holder
            and state.opened_wall + (last - state.opened) - series.idle_published >= IDLE_RESOLUTION
        ):
            with self.metrics._lock:
                series.recompute_idle()

    def _error(self, alias: str, vendor: str, diagnosis: Diagnosis) -> None:
        m = self.metrics
        m.child(m.errors, alias, vendor, diagnosis.error_class, diagnosis.code).inc()

    def connection_opened(self, state: ConnState, info: ThreadInfo) -> None:
        m = self.metrics
        _ensure_flusher()
        alias, vendor = state.alias, state.vendor
        m.child(m.opened, alias, vendor, state.context_opened).inc()
        if state.open_duration is not None:
            m.child(m.open_duration, alias, vendor).observe(state.open_duration)
        with m._lock:
            series = m.series(alias, vendor)
            self._publish_config(series, state)
            if state.pid != process.pid() or state in series.open:
                return
            series.open[state] = None
            series.open_gauge.inc()
            series.recompute()

    def _publish_config(self, series: _Series, state: ConnState) -> None:
        m = self.metrics
        labels = (state.conn_max_age_state, "true" if state.health_checks else "false")
        if labels == series.config_labels:
            return
        alias, vendor = series.key
        if series.config_labels is not None:
            m.config_info.labels(alias, vendor, *series.config_labels).set(0)
        m.config_info.labels(alias, vendor, *labels).set(1)
        max_age = state.conn_max_age
        m.conn_max_age.labels(alias, vendor).set(INF if max_age is None else float(max_age))
        series.config_labels = labels

    def connection_closed(self, state: ConnState, reason: str) -> None:
        m = self.metrics
        m.child(m.closed, state.alias, state.vendor, reason).inc()
        with m._lock:
            series = m.series(state.alias, state.vendor)
            if state not in series.open:  # opened in another process, or before a fork
                return
            del series.open[state]
            series.open_gauge.dec()
            if state is series.oldest_holder or state is series.idle_holder:
                series.recompute()

    def connect_failed(
        self,
        alias: str,
        vendor: str,
        info: ThreadInfo,
        context: str,
        duration: float,
        diagnosis: Diagnosis,
    ) -> None:
        m = self.metrics
        m.child(m.open_failures, alias, vendor, diagnosis.error_class).inc()
        self._error(alias, vendor, diagnosis)

    def stale(self, q: Query, wait_timeout: float, replaced: bool) -> None:
        m = self.metrics
        state = q.state
        m.child(
            m.stale, state.alias, state.vendor, q.context, "true" if replaced else "false"
        ).inc()

    def server_facts(self, state: ConnState, facts: dict[str, Any]) -> None:
        m = self.metrics
        wait_timeout = facts.get("wait_timeout_s")
        if wait_timeout is not None:
            m.server_wait_timeout.labels(state.alias, state.vendor).set(float(wait_timeout))
        max_connections = facts.get("max_connections")
        if max_connections is not None:
            m.server_max_connections.labels(state.alias, state.vendor).set(float(max_connections))

    def internal_error(self, component: str, error: BaseException, first: bool) -> None:
        m = self.metrics
        m.child(m.internal_errors, component_label(component)).inc()
