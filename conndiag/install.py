"""Wire conndiag into Django: signals, every connection, thread tracking. Idempotent."""

from __future__ import annotations

from typing import Any

from django.core.signals import request_finished, request_started
from django.db import connections
from django.db.backends.signals import connection_created
from django.test.signals import setting_changed

from . import conf, forked, lifecycle, metrics, process, runtime, scope, threads
from .contain import guard
from .wrapper import install as _install_on

#: contained: a failure leaves that connection unobserved, never unusable
install_on = guard("lifecycle.install")(_install_on)

_UID = "conndiag"
_HANDLER_ATTR = "_conndiag_create_connection"


def _on_connection_created(sender: object, connection: Any, **kwargs: Any) -> None:
    install_on(connection)


def _on_setting_changed(**kwargs: Any) -> None:
    if kwargs.get("setting") != "CONNDIAG":
        return
    conf.clear_cache(**kwargs)
    runtime.reset(**kwargs)
    apply_thread_tracking()


def apply_thread_tracking() -> None:
    if conf.get_config().track_threads:
        threads.install_tracking()
    else:
        threads.uninstall_tracking()


def install() -> None:
    """Install conndiag (called from ``AppConfig.ready()``; safe to call again)."""
    conf.get_config()  # a bad CONNDIAG setting fails here, at start-up, naming the key
    metrics.before_flush(lifecycle.report_abandoned)
    lifecycle.before_health_check = forked.before_use
    # In the child of a fork, first the locks, then the inherited connections, then the request.
    process.on_fork(runtime.after_fork)
    process.on_fork(lifecycle.after_fork)
    process.on_fork(scope.after_fork)
    lifecycle.register_fork_hooks()
    apply_thread_tracking()
    request_started.connect(scope.on_request_started, dispatch_uid=_UID + ".started")
    request_finished.connect(scope.on_request_finished, dispatch_uid=_UID + ".finished")
    scope.after_request = metrics.request_ended  # one receiver for both: one dispatch less
    connection_created.connect(_on_connection_created, dispatch_uid=_UID + ".created")
    setting_changed.connect(_on_setting_changed, dispatch_uid=_UID + ".settings")
    if not getattr(connections, _HANDLER_ATTR, False):
        original = connections.create_connection

        def create_connection(alias: str) -> Any:
            db = original(alias)
            install_on(db)
            return db

        connections.create_connection = create_connection  # type: ignore[method-assign]
        setattr(connections, _HANDLER_ATTR, True)
    for alias in connections:
        install_on(connections[alias])
