"""Prometheus metrics for the connection lifecycle, correct under multi-process servers.

:func:`build_metrics` creates every metric on a registry, once per registry (a runtime
rebuilt after a settings change reuses the same set), never at import. With
``PROMETHEUS_MULTIPROC_DIR`` set, prometheus_client stores values in per-process files;
the same code works there because every Gauge states its ``multiprocess_mode`` and nothing
uses Info/Enum, custom collectors, ``set_function`` or ``remove()``.

The hot path (:meth:`MetricsRecorder.query`) does not touch prometheus_client at all: each
thread adds to its own plain list of numbers (one list per alias, vendor, context and
action; no lock, no label lookup). Those numbers are pushed into the metrics' values at safe
points, by the threads that run the application, with no thread of conndiag's own:

- at the end of every request, on its thread (:func:`request_ended`);
- on the query path, when the thread's batch is :data:`FLUSH_INTERVAL` old (then every
  thread's batch is pushed, if that is due too);
- before every scrape served by :mod:`conndiag.views` (every thread of the process);
- at exit (``atexit``, and ``uwsgi.atexit`` under uWSGI).

A thread that ends hands its numbers over from the thread-local's finalizer
(:meth:`Metrics._retire`, O(1) work per key, no wait); the next push sends them.
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
import weakref
from bisect import bisect_left
from collections import deque
from operator import add, sub
from time import perf_counter
from typing import TYPE_CHECKING, Any

from . import process
from .conf import ACTIONS, CONTEXTS
from .contain import internal_error
from .multiprocess import sweep
from .records import ACTION_LABELS

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

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
    "forked",
    "stale",
    "serverfacts",
    "classify",
    "scope",
    "threads",
    "middleware",
    "background",
    "events",
    "metrics",
    "process",
    "testing",
    "inspector",
    "other",
)
_COMPONENT_ALIASES = {"EventLog": "events", "MetricsRecorder": "metrics", "Publisher": "inspector"}

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

    def forget(self) -> None:
        """Forget every open connection (after fork: they belong to the parent).

        Plain state only; :meth:`publish` updates the gauges at the next safe point.
        """
        self.open = {}
        self.oldest_holder = self.idle_holder = None
        self.idle_published = INF
        self.config_labels = None

    def publish(self) -> None:
        """Set every gauge of this series from the connections open now (absolute values,
        so a value left in the file by a dead process with the same pid cannot skew it)."""
        self.open_gauge.set(len(self.open))
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
        #: running totals, written by one thread at a time (see the layout above)
        self.v = [0.0] * _SLOTS
        #: what was already pushed into prometheus_client (under the flush lock only)
        self.pushed = [0.0] * _SLOTS
        self.targets = targets


class _Holder:
    """One thread's accumulators (on one metric set), kept in that thread's local.

    Only the thread-local refers to it (no reference cycle), so it dies when the thread
    ends, on the ending thread; a ``weakref.finalize`` then hands its numbers over
    (:meth:`Metrics._retire`).
    """

    __slots__ = ("__weakref__", "accs", "dirty", "due", "key")

    def __init__(self, key: int, due: float) -> None:
        self.key = key
        self.accs: dict[tuple[str, str, str, str], _Acc] = {}
        #: perf_counter time after which a query on this thread pushes its batch
        self.due = due
        #: a query was recorded since this thread last pushed (its owner thread writes it)
        self.dirty = False


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

        self._local = threading.local()
        #: the gauges need republishing at the next flush (set after a fork)
        self._republish = False
        self._init_state()
        self._pid = os.getpid()

    def _init_state(self) -> None:
        """Plain per-process state (again in a forked child: nothing here is the parent's)."""
        #: guards _series and building push targets
        self._lock = threading.RLock()
        #: serializes pushes into prometheus_client (``pushed`` bookkeeping)
        self._flush_lock = threading.Lock()
        #: guards _live and _orphans; never waited for by a retiring thread
        self._fold_lock = threading.Lock()
        #: live threads' accumulators, by holder key
        self._live: dict[int, dict[tuple[str, str, str, str], _Acc]] = {}
        self._next_key = 0
        #: numbers of ended threads, summed per key, not pushed yet
        self._orphans: dict[tuple[str, str, str, str], _Acc] = {}
        #: an orphan gained numbers since the last push of the orphans
        self._orphans_pending = False
        #: accumulators of ended threads that could not be folded at once
        self._retired: deque[dict[tuple[str, str, str, str], _Acc]] = deque()
        self._series: dict[tuple[str, str], _Series] = {}
        #: (alias, vendor, context) -> push targets shared by every thread's accumulator
        self._targets: dict[tuple[str, str, str], list[Callable[[float], None]]] = {}
        self._counter_children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        #: perf_counter time of the next flush of every thread (at a safe point)
        self._full_due = 0.0

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

    def new_holder(self) -> _Holder:
        """The calling thread's accumulators, registered so any flush can push them."""
        with self._fold_lock:
            key = self._next_key = self._next_key + 1
            holder = _Holder(key, perf_counter() + FLUSH_INTERVAL)
            self._live[key] = holder.accs
        finalizer = weakref.finalize(holder, self._retire, key, holder.accs, os.getpid())
        finalizer.atexit = False  # the exit flush reads live threads itself
        self._local.h = holder
        return holder

    # -- flushing ------------------------------------------------------------------------

    def _retire(self, key: int, accs: dict[tuple[str, str, str, str], _Acc], pid: int) -> None:
        """A thread ended (its local was cleared): fold its unpushed numbers into the orphans.

        Runs on the ending thread, or inside a garbage collection anywhere, so it only
        tries the fold lock (never waits) and never calls prometheus_client: when the
        lock is busy the accumulators are queued for the next flush.
        """
        if pid != os.getpid():
            return  # a thread of the parent, freed in a forked child: the parent counts it
        if self._fold_lock.acquire(blocking=False):
            try:
                self._live.pop(key, None)
                self._fold(accs)
            finally:
                self._fold_lock.release()
        else:
            self._retired.append(accs)
            self._live.pop(key, None)

    def _fold(self, accs: dict[tuple[str, str, str, str], _Acc]) -> None:
        """Add an ended thread's unpushed numbers to the orphans (fold lock held)."""
        orphans = self._orphans
        for k, acc in accs.items():
            v, pushed = acc.v, acc.pushed
            if v == pushed:
                continue
            orphan = orphans.get(k)
            if orphan is None:
                orphan = orphans[k] = _Acc(acc.series, acc.targets)
            orphan.v = list(map(add, orphan.v, map(sub, v, pushed)))
            self._orphans_pending = True

    @staticmethod
    def _push(accs: Iterable[_Acc]) -> None:
        """Push what ``accs`` gained since their last push (flush lock held).

        Each value is read once: the owning thread may go on adding while this runs, and
        what it adds after the read is pushed the next time.
        """
        for acc in accs:
            v, pushed = acc.v, acc.pushed
            if v == pushed:
                continue
            targets = acc.targets
            for i in range(_SLOTS):
                value = v[i]
                delta = value - pushed[i]
                if delta:
                    pushed[i] = value
                    targets[i](delta)

    def flush(self) -> None:
        """Push every thread's query numbers, and those of ended threads, into the metrics."""
        if self._pid != os.getpid():
            self.after_fork_in_child()
        if _swept_pid != self._pid:  # a forked worker's first full flush: its start
            sweep_dead_workers()
        with self._flush_lock:
            with self._fold_lock:
                while self._retired:
                    self._fold(self._retired.popleft())
                orphans = list(self._orphans.values())
                self._orphans_pending = False
                live = [acc for accs in list(self._live.values()) for acc in list(accs.values())]
            self._push(orphans)
            self._push(live)
            self._full_due = perf_counter() + FLUSH_INTERVAL
            if self._republish:
                self._republish = False
                with self._lock:
                    for series in self._series.values():
                        series.publish()

    def flush_thread(self, holder: _Holder, now: float, wait: bool) -> None:
        """Push the calling thread's numbers (and every thread's, when that is due)."""
        if now < self._full_due and not (self._republish or self._orphans_pending or self._retired):
            for acc in holder.accs.values():
                if acc.v != acc.pushed:
                    break
            else:
                holder.due = now + FLUSH_INTERVAL
                holder.dirty = False
                return  # nothing to push
        if now >= self._full_due or self._republish:
            if wait or not self._flush_lock.locked():
                self.flush()
                holder.due = now + FLUSH_INTERVAL
            return
        if not self._flush_lock.acquire(blocking=wait):
            return  # a flush is running; this thread tries again at its next query
        try:
            holder.dirty = False
            self._push(list(holder.accs.values()))
            if self._orphans_pending or self._retired:
                with self._fold_lock:
                    while self._retired:
                        self._fold(self._retired.popleft())
                    orphans = list(self._orphans.values())
                    self._orphans_pending = False
                self._push(orphans)
        finally:
            self._flush_lock.release()
        holder.due = now + FLUSH_INTERVAL

    def after_fork_in_child(self) -> None:
        """In a forked child: the parent's threads, numbers and connections are not ours.

        Only plain state is reset (new locks, new dicts); nothing here calls
        prometheus_client, whose lock a parent thread may have held at fork time. The
        gauges are republished at the next flush.
        """
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        series = self._series
        self._init_state()
        # prometheus_client starts this process's values from zero; every number the
        # parent recorded is the parent's to push. The forking thread (the only one left)
        # gets a new holder at its next query; the old one is retired as the parent's.
        try:
            del self._local.h
        except AttributeError:
            pass
        for s in series.values():
            s.forget()
        self._series = series
        self._republish = True


# -- one metric set per registry; flushes at safe points, no thread -------------------------

_sets: weakref.WeakKeyDictionary[Any, Metrics] = weakref.WeakKeyDictionary()
_sets_lock = threading.Lock()
_hooks_installed = False
#: the process that last swept the multi-process directory at its start
_swept_pid = 0
#: the metric set of the most recently built recorder (the runtime's): request ends push it
_active: Metrics | None = None


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
    if _swept_pid != os.getpid():
        sweep_dead_workers()
    return metrics


def sweep_dead_workers() -> None:
    """At a process's start (its first metrics; after a fork, its first connection or full
    flush): archive the files dead workers left in the multi-process directory (contained)."""
    global _swept_pid
    _swept_pid = os.getpid()
    path = multiprocess_dir()
    if not path:
        return
    try:
        sweep(path)
    except Exception as exc:
        internal_error("metrics.sweep", exc)


def flush(registry: CollectorRegistry | None = None) -> None:
    """Push pending query numbers into the metrics of ``registry`` (all registries: None)."""
    if registry is None:
        targets = list(_sets.values())
    else:
        found = _sets.get(registry)
        targets = [] if found is None else [found]
    for metrics in targets:
        metrics.flush()


#: run before every flush of every set (``conndiag/install.py`` registers
#: ``lifecycle.report_abandoned``: a flush is a safe point for what garbage collection found)
_before_flush: list[Callable[[], None]] = []


def before_flush(callback: Callable[[], None]) -> None:
    """Run ``callback()`` (contained) before each :func:`flush_all_quietly` (idempotent)."""
    if callback not in _before_flush:
        _before_flush.append(callback)


def flush_all_quietly() -> None:
    """Run the :func:`before_flush` callbacks and flush every metric set, containing failures."""
    for callback in list(_before_flush):
        try:
            callback()
        except Exception as exc:
            internal_error("metrics.before_flush", exc)
    for metrics in list(_sets.values()):
        try:
            metrics.flush()
        except Exception as exc:
            internal_error("metrics.flush", exc)


def request_ended(now: float) -> None:
    """At the end of every request (called by the ``request_finished`` receiver,
    :data:`conndiag.scope.after_request`, with ``perf_counter()``): push the numbers of
    this request's thread now.

    This is what makes a worker's requests visible to a scrape answered by any other
    worker as soon as they are over, with no background thread.
    """
    metrics = _active
    if metrics is None:
        return
    try:
        holder = getattr(metrics._local, "h", None)
        if holder is None:
            return
        if (
            holder.dirty
            or now >= metrics._full_due
            or metrics._republish
            or metrics._orphans_pending
            or metrics._retired
        ):
            metrics.flush_thread(holder, now, wait=True)
        # else: this thread recorded nothing since its last push, and nothing else is due
    except Exception as exc:
        internal_error("metrics.flush", exc)


def _after_fork_in_child() -> None:
    global _sets_lock
    _sets_lock = threading.Lock()
    for metrics in list(_sets.values()):
        metrics.after_fork_in_child()


def _chain_uwsgi_atexit() -> None:
    """Under uWSGI, also flush from ``uwsgi.atexit`` (it runs even with
    ``--skip-atexit-teardown``, which skips Python's own atexit handlers)."""
    try:
        import uwsgi  # type: ignore[import-not-found,import-untyped]
    except ImportError:
        return
    previous = getattr(uwsgi, "atexit", None)
    if getattr(previous, "_conndiag", False):
        return

    def atexit_hook() -> None:
        flush_all_quietly()
        if previous is not None:
            previous()

    atexit_hook._conndiag = True  # type: ignore[attr-defined]
    uwsgi.atexit = atexit_hook


def _install_process_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    process.on_fork(_after_fork_in_child)
    atexit.register(flush_all_quietly)
    _chain_uwsgi_atexit()


# -- the recorder --------------------------------------------------------------------------


class MetricsRecorder:
    """The Prometheus recorder (see :class:`conndiag.records.Recorder`)."""

    __slots__ = ("_local", "config", "metrics")

    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        global _active
        self.metrics = m = build_metrics(registry)
        self._local = m._local
        _active = m
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
            holder = self._local.h
        except AttributeError:
            holder = self.metrics.new_holder()
        holder.dirty = True
        state = q.state
        key = (state.alias, state.vendor, q.context, q.action)
        acc = holder.accs.get(key)
        if acc is None:
            acc = self.metrics.new_acc(holder.accs, key)
        v = acc.v
        v[0] += 1  # _N
        duration = q.duration
        if duration is None:  # refused: it never ran (pushed at the request's end)
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
        if last >= holder.due:  # this thread's batch is FLUSH_INTERVAL old: push it
            self.metrics.flush_thread(holder, last, wait=False)

    def _error(self, alias: str, vendor: str, diagnosis: Diagnosis) -> None:
        m = self.metrics
        m.child(m.errors, alias, vendor, diagnosis.error_class, diagnosis.code).inc()

    def connection_opened(self, state: ConnState, info: ThreadInfo) -> None:
        m = self.metrics
        if _swept_pid != process.pid():  # a forked worker's first connection
            sweep_dead_workers()
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
            series.open_gauge.set(len(series.open))
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
            series.open_gauge.set(len(series.open))
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
