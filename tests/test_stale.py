"""Stale connections on a real MariaDB: reported before the query, replaced when asked."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from django.db import OperationalError, connections, transaction

from conndiag.stale import can_replace
from conndiag.state import state_of
from tests.conftest import of
from tests.testapp.models import Item

pytestmark = pytest.mark.django_db(databases=["default", "mysql"], transaction=True)


def _select_one() -> Any:
    with connections["mysql"].cursor() as cursor:
        cursor.execute("SELECT 1")
        return cursor.fetchone()


def test_stale_connection_is_reported_then_fails(
    short_timeout: None, events: list[dict[str, Any]]
) -> None:
    """Idle past wait_timeout: a stale event with the facts precedes the query, which fails."""
    _select_one()
    time.sleep(2.2)
    with pytest.raises(OperationalError) as raised:
        _select_one()
    assert raised.value.args[0] == 2006
    (stale,) = of(events, "conndiag.connection.stale")
    assert stale["replaced"] is False
    assert stale["wait_timeout_s"] == 1.0
    assert stale["connection_idle_s"] >= 2
    assert stale["connection_age_s"] >= stale["connection_idle_s"]
    assert stale["thread_name"] == "MainThread"
    assert stale["context"] == "background"
    assert stale["conn_max_age_s"] == 0
    (failed,) = of(events, "conndiag.query.failed")
    assert failed["error_class"] == "gone_away"


def test_replace_stale_turns_2006_into_a_logged_reconnect(
    short_timeout: None, events: list[dict[str, Any]], settings: Any
) -> None:
    """REPLACE_STALE: the stale connection is closed (reason replaced_stale), a new one is
    opened, and the query succeeds on it; nothing fails."""
    settings.CONNDIAG = {"REPLACE_STALE": True}
    _select_one()
    old = state_of(connections["mysql"])
    time.sleep(2.2)
    assert _select_one() == (1,)
    new = state_of(connections["mysql"])
    assert new is not old
    assert new.server_id != old.server_id
    assert new.queries == 1
    (stale,) = of(events, "conndiag.connection.stale")
    assert stale["replaced"] is True
    (closed,) = of(events, "conndiag.connection.closed")
    assert (closed["reason"], closed["connection_id"]) == ("replaced_stale", old.server_id)
    opened = of(events, "conndiag.connection.opened")
    assert [e["connection_id"] for e in opened] == [old.server_id, new.server_id]
    assert of(events, "conndiag.query.failed") == []
    (ok,) = [e for e in of(events, "conndiag.query") if e["connection_id"] == new.server_id]
    assert ok["outcome"] == "ok"


def test_replace_stale_works_for_orm_queries(
    short_timeout: None, events: list[dict[str, Any]], settings: Any
) -> None:
    """The replacement also serves ORM queries (their cursor is re-pointed, not re-created)."""
    settings.CONNDIAG = {"REPLACE_STALE": True}
    Item.objects.using("mysql").create(name="before")
    time.sleep(2.2)
    assert list(Item.objects.using("mysql").values_list("name", flat=True)) == ["before"]
    assert [e["reason"] for e in of(events, "conndiag.connection.closed")] == ["replaced_stale"]


def test_stale_connection_is_never_replaced_inside_atomic(
    short_timeout: None, events: list[dict[str, Any]], settings: Any
) -> None:
    """Inside an atomic block the stale connection is reported, not replaced: replacing it
    would silently drop the transaction's earlier work."""
    settings.CONNDIAG = {"REPLACE_STALE": True}
    with pytest.raises(OperationalError), transaction.atomic(using="mysql"):
        _select_one()
        time.sleep(2.2)
        _select_one()
    (stale,) = of(events, "conndiag.connection.stale")
    assert stale["replaced"] is False
    # (Django itself closes the connection when the rollback fails on it.)
    assert "replaced_stale" not in [e["reason"] for e in of(events, "conndiag.connection.closed")]


def test_stale_margin_reports_before_the_timeout(
    short_timeout: None, events: list[dict[str, Any]], settings: Any
) -> None:
    """STALE_MARGIN reports (and may replace) a connection that is about to be dropped."""
    settings.CONNDIAG = {"REPLACE_STALE": True, "STALE_MARGIN": 0.9}
    _select_one()
    time.sleep(0.3)
    assert _select_one() == (1,)
    (stale,) = of(events, "conndiag.connection.stale")
    assert stale["replaced"] is True
    assert stale["connection_idle_s"] < 1.0


def test_fresh_connection_is_not_stale(short_timeout: None, events: list[dict[str, Any]]) -> None:
    """Queries within wait_timeout produce no stale event."""
    _select_one()
    _select_one()
    assert of(events, "conndiag.connection.stale") == []


def test_failed_reconnect_propagates(
    short_timeout: None, events: list[dict[str, Any]], settings: Any
) -> None:
    """If the replacement cannot connect, the application gets the connect error (reported as
    conndiag.connection.failed), not a confusing error from a closed cursor."""
    settings.CONNDIAG = {"REPLACE_STALE": True}
    _select_one()
    time.sleep(2.2)
    db = connections["mysql"]
    port = db.settings_dict["PORT"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        db.settings_dict["PORT"] = str(s.getsockname()[1])
    try:
        with pytest.raises(OperationalError) as raised:
            _select_one()
    finally:
        db.settings_dict["PORT"] = port
    assert raised.value.args[0] in (2002, 2003)
    (failed,) = of(events, "conndiag.connection.failed")
    assert failed["error_class"] == "refused"


def test_can_replace_reflects_transactions() -> None:
    """``can_replace`` is False inside atomic blocks and with autocommit off."""
    db = connections["mysql"]
    assert can_replace(db)
    with transaction.atomic(using="mysql"):
        assert not can_replace(db)
    db.set_autocommit(False)
    try:
        assert not can_replace(db)
    finally:
        db.set_autocommit(True)
    db.close()
