"""Server facts on a real MariaDB: learned once per connection or cached, never per query."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections

from conndiag import install, serverfacts
from conndiag.state import state_of
from tests.conftest import mysql_wait_timeout, of

pytestmark = pytest.mark.django_db(databases=["default", "mysql"], transaction=True)


@pytest.fixture
def timeout_7() -> Iterator[None]:
    """New ``mysql`` connections get ``wait_timeout = 7`` through ``init_command``."""
    with mysql_wait_timeout(7):
        yield


def _reconnect() -> Any:
    db = connections["mysql"]
    db.close()
    db.ensure_connection()
    return state_of(db)


def test_connect_mode_learns_the_session_value_on_every_connect(
    timeout_7: None, events: list[dict[str, Any]], settings: Any
) -> None:
    """SERVER_FACTS='connect': each new connection is probed once; init_command's session
    value (not the global one) is what the state and the event carry."""
    settings.CONNDIAG = {"SERVER_FACTS": "connect"}
    first = _reconnect()
    second = _reconnect()
    assert first.wait_timeout == second.wait_timeout == 7.0
    facts = of(events, "conndiag.server.facts")
    assert [f["connection_id"] for f in facts] == [first.server_id, second.server_id]
    assert facts[0]["wait_timeout_s"] == 7.0
    assert facts[0]["max_connections"] > 0


def test_probe_is_not_an_application_query(timeout_7: None, events: list[dict[str, Any]]) -> None:
    """The probe bypasses the execute wrappers: no query event, no query counted."""
    state = _reconnect()
    assert state.queries == 0
    assert of(events, "conndiag.query") == []
    with connections["mysql"].cursor() as cursor:
        cursor.execute("SELECT 1")
    assert state.queries == 1
    assert len(of(events, "conndiag.query")) == 1


def test_probe_is_marked_in_the_process_list() -> None:
    """conndiag's own SQL carries a recognisable marker comment."""
    assert serverfacts.MYSQL_PROBE.startswith(serverfacts.PROBE_MARK)
    assert serverfacts.POSTGRES_PROBE.startswith(serverfacts.PROBE_MARK)


def test_cached_mode_probes_once_per_alias_and_refreshes(
    timeout_7: None, events: list[dict[str, Any]], settings: Any
) -> None:
    """SERVER_FACTS='cached': one probe per alias and process, reused until the TTL passes."""
    settings.CONNDIAG = {"SERVER_FACTS": "cached", "SERVER_FACTS_TTL": 1}
    assert _reconnect().wait_timeout == 7.0
    assert _reconnect().wait_timeout == 7.0
    assert len(of(events, "conndiag.server.facts")) == 1
    cached = serverfacts.cached_facts("mysql")
    assert cached is not None
    assert cached["wait_timeout_s"] == 7.0
    time.sleep(1.1)
    assert _reconnect().wait_timeout == 7.0
    assert len(of(events, "conndiag.server.facts")) == 2


def test_off_mode_never_probes(
    timeout_7: None, events: list[dict[str, Any]], settings: Any
) -> None:
    """SERVER_FACTS='off': no probe, wait_timeout unknown."""
    settings.CONNDIAG = {"SERVER_FACTS": "off"}
    assert _reconnect().wait_timeout is None
    assert of(events, "conndiag.server.facts") == []
    assert serverfacts.cached_facts("mysql") is None


def test_sqlite_is_not_probed(events: list[dict[str, Any]]) -> None:
    """SQLite has no server and no idle timeout: nothing is probed."""
    db = connections["default"]
    db.ensure_connection()
    assert serverfacts.probe(db) is None
    assert serverfacts.read_facts(db) is None
    assert of(events, "conndiag.server.facts") == []


def test_read_facts_leaves_no_connection_open(
    timeout_7: None, events: list[dict[str, Any]]
) -> None:
    """``read_facts`` (checks, doctor) uses a connection of its own, closed on return, and does
    not touch the thread's Django connection or report an application connection."""
    facts = serverfacts.read_facts(connections["mysql"])
    assert facts is not None
    assert facts["wait_timeout_s"] == 7.0
    assert connections["mysql"].connection is None
    assert events == []


def test_install_opens_no_connection() -> None:
    """Wiring conndiag (what ``AppConfig.ready()`` does) never connects to learn facts."""
    connections["mysql"].close()
    install.install()
    assert connections["mysql"].connection is None


def test_postgres_durations_are_parsed() -> None:
    """PostgreSQL duration settings become seconds; ``0`` (disabled) becomes None."""
    assert serverfacts._pg_seconds("0") is None
    assert serverfacts._pg_seconds("") is None
    assert serverfacts._pg_seconds("1500") == 1.5
    assert serverfacts._pg_seconds("30s") == 30.0
    assert serverfacts._pg_seconds("5min") == 300.0
    assert serverfacts._pg_seconds("2h") == 7200.0
    assert serverfacts._pg_seconds("250ms") == 0.25
    assert serverfacts._pg_seconds("soon") is None
