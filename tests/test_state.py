"""Per-connection state helpers."""

from __future__ import annotations

from conndiag.state import conn_max_age_state, server_connection_id


def test_conn_max_age_states():
    """0 is per-request, None persistent, N timed."""
    assert conn_max_age_state(0) == "per_request"
    assert conn_max_age_state(None) == "persistent"
    assert conn_max_age_state(60) == "timed"


def test_server_id_is_none_without_driver_support():
    """A driver connection without an id accessor gives None (no round trip attempted)."""
    assert server_connection_id(object()) is None
