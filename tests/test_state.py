"""Per-connection state helpers."""

from __future__ import annotations

import pytest
from django.db import connections

from conndiag.state import conn_max_age_state, server_connection_id, state_of


def test_conn_max_age_states():
    """0 is per-request, None persistent, N timed."""
    assert conn_max_age_state(0) == "per_request"
    assert conn_max_age_state(None) == "persistent"
    assert conn_max_age_state(60) == "timed"


def test_server_id_is_none_without_driver_support():
    """A driver connection without an id accessor gives None (no round trip attempted)."""
    assert server_connection_id(object()) is None


@pytest.mark.django_db(transaction=True, databases=["mysql"])
@pytest.mark.parametrize(("max_age", "expected"), [(0, None), (None, None), (60, (59.0, 60.0))])
def test_recycle_in_is_never_negative(max_age, expected):
    """A per-request connection (CONN_MAX_AGE=0) has no recycle time (Django's close_at is
    already in the past at connect): None, like a persistent one; a timed one counts down."""
    db = connections["mysql"]
    db.close()
    db.settings_dict["CONN_MAX_AGE"] = max_age
    try:
        db.ensure_connection()
        value = state_of(db).recycle_in(db)
    finally:
        db.settings_dict["CONN_MAX_AGE"] = 0
        db.close()
    if expected is None:
        assert value is None
    else:
        assert expected[0] <= value <= expected[1]


@pytest.mark.django_db(transaction=True, databases=["mysql"])
def test_recycle_in_is_zero_once_overdue():
    """A timed connection past CONN_MAX_AGE that nothing closed yet is due now: 0, not < 0."""
    db = connections["mysql"]
    db.close()
    db.settings_dict["CONN_MAX_AGE"] = 60
    try:
        db.ensure_connection()
        db.close_at -= 120
        assert state_of(db).recycle_in(db) == 0.0
    finally:
        db.settings_dict["CONN_MAX_AGE"] = 0
        db.close()
