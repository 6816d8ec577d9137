"""The CONNDIAG setting: parsed once, frozen, and every bad value named at start-up."""

from __future__ import annotations

import ipaddress

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from conndiag import conf


def test_defaults_are_safe():
    """An absent setting gives the documented defaults (detached raises, forked replaces)."""
    config = conf.parse(None)
    assert config.policy == {
        "request": "ignore",
        "cross_thread": "log",
        "detached": "raise",
        "forked": "replace",
        "background": "ignore",
    }
    assert config.log_sql is False
    assert config.log_sql_params is False
    assert config.request_id_meta_key == "HTTP_X_REQUEST_ID"


def test_policy_is_merged_over_defaults():
    """A partial POLICY overrides only the contexts it names."""
    config = conf.parse({"POLICY": {"detached": "log"}})
    assert config.policy["detached"] == "log"
    assert config.policy["forked"] == "replace"


def test_replace_is_for_forked_only():
    """``replace`` is accepted for ``forked``; for another context it is refused at start-up,
    naming the key and listing what that context allows."""
    assert conf.parse({"POLICY": {"forked": "raise"}}).policy["forked"] == "raise"
    assert conf.parse({"POLICY": {"forked": "replace"}}).policy["forked"] == "replace"
    with pytest.raises(ImproperlyConfigured) as info:
        conf.parse({"POLICY": {"detached": "replace"}})
    message = str(info.value)
    assert "CONNDIAG['POLICY']['detached'] = 'replace'" in message
    assert "'raise', 'log', 'ignore'" in message and "'replace'" not in message.split("expected")[1]


def test_an_unknown_policy_context_is_named_as_a_context():
    """A misspelt context is reported as an unknown key of POLICY, with its value and the
    contexts allowed (not as if POLICY itself were the misspelt word)."""
    with pytest.raises(ImproperlyConfigured) as info:
        conf.parse({"POLICY": {"detachd": "log"}})
    assert str(info.value) == (
        "CONNDIAG['POLICY'] has an unknown context 'detachd' (set to 'log'): expected one of "
        "the contexts request, cross_thread, detached, forked, background."
    )


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"NOPE": 1}, "'NOPE'"),
        ({"POLICY": {"detached": "explode"}}, "'explode'"),
        ({"POLICY": {"sideways": "log"}}, "'sideways'"),
        ({"POLICY": "raise"}, "'POLICY'"),
        ({"LOG_SQL": "yes"}, "'LOG_SQL'"),
        ({"QUERY_LOG_SAMPLE_RATE": 2}, "'QUERY_LOG_SAMPLE_RATE'"),
        ({"QUERY_LOG_SAMPLE_RATE": True}, "'QUERY_LOG_SAMPLE_RATE'"),
        ({"QUERY_LOG_LEVEL": "loud"}, "'loud'"),
        ({"REQUEST_ID_HEADER": "X Request\nID"}, "'REQUEST_ID_HEADER'"),
        ({"METRICS_ALLOWED_IPS": ["10.0.0.0/8", "not-an-ip"]}, "'not-an-ip'"),
        ({"METRICS_ALLOWED_IPS": "10.0.0.1"}, "'METRICS_ALLOWED_IPS'"),
        ({"SERVER_FACTS": "always"}, "'always'"),
        ({"SQL_MAX_LENGTH": 3}, "'SQL_MAX_LENGTH'"),
        ({"INSPECTOR": "on"}, "'INSPECTOR'"),
        ({"INSPECTOR_DIR": "relative/dir"}, "'INSPECTOR_DIR'"),
        ({"INSPECTOR_DIR": ""}, "'INSPECTOR_DIR'"),
        ("not a dict", "CONNDIAG = 'not a dict'"),
    ],
)
def test_bad_values_name_the_key_and_value(raw, named):
    """Each wrong key, type or word raises ImproperlyConfigured naming it and what is allowed."""
    with pytest.raises(ImproperlyConfigured) as info:
        conf.parse(raw)
    message = str(info.value)
    assert named in message
    assert "expected" in message or "Allowed keys" in message


def test_allowed_ips_are_parsed_to_networks():
    """METRICS_ALLOWED_IPS accepts addresses and networks."""
    config = conf.parse({"METRICS_ALLOWED_IPS": ["10.0.0.0/8", "::1"]})
    assert config.metrics_allowed_ips == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1"),
    )


def test_config_is_frozen():
    """The parsed config cannot be changed at run time."""
    config = conf.parse({})
    with pytest.raises(AttributeError):
        config.log_sql = True  # type: ignore[misc]


def test_override_settings_drops_the_cache():
    """get_config() follows override_settings (the cache is dropped on setting_changed)."""
    before = conf.get_config()
    with override_settings(CONNDIAG={"LOG_SQL": True}):
        assert conf.get_config().log_sql is True
    assert conf.get_config().log_sql == before.log_sql


def test_a_bad_setting_fails_at_start_up():
    """install() (run by AppConfig.ready) parses the setting, so a bad key fails at start-up."""
    from conndiag.install import install

    with pytest.raises(
        ImproperlyConfigured, match=r"CONNDIAG\['POLICY'\]\['detached'\] = 'sometimes'"
    ):
        with override_settings(CONNDIAG={"POLICY": {"detached": "sometimes"}}):
            install()
