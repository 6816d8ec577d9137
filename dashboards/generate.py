"""Generate conndiag's Grafana dashboards, Prometheus rules (+ promtool unit tests) and Loki rules.

Plain data structures, no dashboard SDK: the output is a handful of JSON and YAML documents,
and a dependency (pinned, on its own release cadence) would cost more than the few helpers
below. Every threshold, selector, window and severity comes from ``config.yaml`` beside this
file; the generated files are committed, and ``tests/test_dashboards.py`` regenerates them and
fails on any difference.

Usage::

    python dashboards/generate.py           # (re)write the generated files
    python dashboards/generate.py --check   # exit 1 if a committed file is out of date
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
CONFIG_PATH = HERE / "config.yaml"

GRAFANA_DIR = "grafana"
PROM_RULES = "prometheus/conndiag-rules.yml"
PROM_TESTS_DIR = "prometheus/tests"
LOKI_RULES = "loki/conndiag-rules.yml"

#: Grafana dashboard JSON model version written by the generator.
SCHEMA_VERSION = 39

#: every event name conndiag logs (mirrors conndiag/events.py; a test compares them)
EV_QUERY = "conndiag.query"
EV_FLAGGED = "conndiag.query.flagged"
EV_REFUSED = "conndiag.query.refused"
EV_FAILED = "conndiag.query.failed"
EV_OPENED = "conndiag.connection.opened"
EV_CLOSED = "conndiag.connection.closed"
EV_STALE = "conndiag.connection.stale"
EV_CONNECT_FAILED = "conndiag.connection.failed"
EV_INTERNAL = "conndiag.internal_error"


def load_config(path: Path = CONFIG_PATH) -> dict[str, Any]:
    with path.open() as f:
        config: dict[str, Any] = yaml.safe_load(f)
    return config


# -- small helpers --------------------------------------------------------------------------


def _sel(*matchers: str) -> str:
    """A label selector from matchers, skipping empty ones: ``{a="b", c=~"d"}``."""
    parts = [m for m in matchers if m]
    return "{" + ", ".join(parts) + "}" if parts else ""


def _regex(values: Iterable[str]) -> str:
    return "|".join(values)


def _by(labels: Iterable[str]) -> str:
    return ", ".join(labels)


def _runbook(config: dict[str, Any], alert: str) -> str:
    return f"{config['runbook_base_url']}#{alert.lower()}"


# -- Grafana --------------------------------------------------------------------------------

PROM_DS = {"type": "prometheus", "uid": "${datasource}"}
LOKI_DS = {"type": "loki", "uid": "${datasource}"}

#: dashboard-variable matchers of every conndiag metric (all carry alias, except two)
V_TARGET = 'job=~"$job", instance=~"$instance"'
V_ALIAS = V_TARGET + ', alias=~"$alias"'


def _prom_target(
    expr: str, legend: str, ref: str, *, instant: bool = False, table: bool = False
) -> dict[str, Any]:
    target: dict[str, Any] = {
        "datasource": PROM_DS,
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
    }
    if instant:
        target["instant"] = True
        target["range"] = False
    if table:
        target["format"] = "table"
    return target


def _loki_target(expr: str, legend: str, ref: str, *, logs: bool = False) -> dict[str, Any]:
    target: dict[str, Any] = {"datasource": LOKI_DS, "expr": expr, "refId": ref}
    if logs:
        target["queryType"] = "range"
    else:
        target["legendFormat"] = legend
    return target


def _field_config(
    unit: str, *, custom: dict[str, Any] | None = None, min_value: float | None = 0
) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "palette-classic"},
        "thresholds": {"mode": "absolute", "steps": [{"value": None, "color": "green"}]},
    }
    if min_value is not None:
        defaults["min"] = min_value
    if custom is not None:
        defaults["custom"] = custom
    return {"defaults": defaults, "overrides": []}


def _threshold_from_query(ref: str, field: str) -> dict[str, Any]:
    """Turn query ``ref``'s value (reduced with max) into the panel's first threshold.

    Grafana's "config from query results" transformation: the threshold line then follows
    the data (e.g. the server's wait_timeout) and disappears when the query returns nothing.
    """
    return {
        "id": "configFromData",
        "options": {
            "configRefId": ref,
            "mappings": [{"fieldName": field, "handlerKey": "threshold1", "reducerId": "max"}],
        },
    }


def timeseries(
    title: str,
    description: str,
    unit: str,
    targets: list[dict[str, Any]],
    *,
    width: int = 12,
    height: int = 8,
    bars: bool = False,
    stack: bool = False,
    threshold_ref: tuple[str, str] | None = None,
    datasource: dict[str, str] = PROM_DS,
) -> dict[str, Any]:
    custom: dict[str, Any] = {
        "drawStyle": "bars" if bars else "line",
        "lineWidth": 1,
        "fillOpacity": 60 if bars else 10,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "thresholdsStyle": {"mode": "dashed" if threshold_ref else "off"},
    }
    panel: dict[str, Any] = {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": datasource,
        "targets": targets,
        "fieldConfig": _field_config(unit, custom=custom),
        "options": {
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
                "calcs": ["lastNotNull", "max"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "_size": (width, height),
    }
    if threshold_ref is not None:
        panel["transformations"] = [_threshold_from_query(*threshold_ref)]
    return panel


def stat(
    title: str,
    description: str,
    unit: str,
    targets: list[dict[str, Any]],
    *,
    width: int = 6,
    height: int = 4,
    calc: str = "lastNotNull",
) -> dict[str, Any]:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": PROM_DS,
        "targets": targets,
        "fieldConfig": _field_config(unit),
        "options": {
            "graphMode": "area",
            "colorMode": "value",
            "justifyMode": "auto",
            "textMode": "auto",
            "wideLayout": True,
            "showPercentChange": False,
            "reduceOptions": {"calcs": [calc], "fields": "", "values": False},
            "percentChangeColorMode": "standard",
            "orientation": "auto",
        },
        "_size": (width, height),
    }


def table(
    title: str,
    description: str,
    unit: str,
    targets: list[dict[str, Any]],
    *,
    transformations: list[dict[str, Any]],
    width: int = 24,
    height: int = 7,
) -> dict[str, Any]:
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": PROM_DS,
        "targets": targets,
        "transformations": transformations,
        "fieldConfig": _field_config(
            unit, custom={"align": "auto", "inspect": False}, min_value=None
        ),
        "options": {"frameIndex": 0, "showHeader": True, "cellHeight": "sm"},
        "_size": (width, height),
    }


def logs(
    title: str, description: str, expr: str, *, width: int = 24, height: int = 9
) -> dict[str, Any]:
    return {
        "type": "logs",
        "title": title,
        "description": description,
        "datasource": LOKI_DS,
        "targets": [_loki_target(expr, "", "A", logs=True)],
        # A log panel draws lines, not numbers; the unit is set so every panel states one.
        "fieldConfig": _field_config("none", min_value=None),
        "options": {
            "showTime": True,
            "wrapLogMessage": True,
            "sortOrder": "Descending",
            "enableLogDetails": True,
            "dedupStrategy": "none",
            "prettifyLogMessage": False,
            "showCommonLabels": False,
            "showLabels": False,
        },
        "_size": (width, height),
    }


def _layout(rows: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Number the panels and give each a grid position, row after row (24 columns)."""
    panels: list[dict[str, Any]] = []
    next_id = 1
    y = 0
    for title, row_panels in rows:
        panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "id": next_id,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            }
        )
        next_id += 1
        y += 1
        x = 0
        line_height = 0
        for panel in row_panels:
            width, height = panel.pop("_size")
            if x + width > 24:
                x = 0
                y += line_height
                line_height = 0
            panel["id"] = next_id
            panel["gridPos"] = {"h": height, "w": width, "x": x, "y": y}
            next_id += 1
            x += width
            line_height = max(line_height, height)
            panels.append(panel)
        y += line_height
    return panels


def _datasource_var(kind: str, label: str) -> dict[str, Any]:
    return {
        "type": "datasource",
        "name": "datasource",
        "label": label,
        "query": kind,
        "current": {"selected": False, "text": "default", "value": "default"},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
    }


def _query_var(
    name: str, query: str, datasource: dict[str, str], description: str
) -> dict[str, Any]:
    return {
        "type": "query",
        "name": name,
        "label": name,
        "description": description,
        "datasource": datasource,
        "query": query,
        "definition": query,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "hide": 0,
        "includeAll": True,
        "allValue": ".+",
        "multi": True,
        "options": [],
        "refresh": 2,
        "regex": "",
        "sort": 1,
    }


def _dashboard(
    config: dict[str, Any],
    uid: str,
    title: str,
    description: str,
    variables: list[dict[str, Any]],
    panels: list[dict[str, Any]],
    links: list[dict[str, Any]],
) -> dict[str, Any]:
    grafana = config["grafana"]
    return {
        "uid": f"{grafana['uid_prefix']}-{uid}",
        "title": title,
        "description": description,
        "tags": list(grafana["tags"]),
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": grafana["time_from"], "to": "now"},
        "timepicker": {},
        "refresh": grafana["refresh"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": links,
        "templating": {"list": variables},
        "panels": panels,
    }


def _quantile_targets(metric: str, quantiles: list[float], by: str = "") -> list[dict[str, Any]]:
    refs = "ABCDEFGH"
    group = f"le, {by}" if by else "le"
    targets = []
    for i, q in enumerate(quantiles):
        expr = (
            f"histogram_quantile({q}, sum by ({group}) "
            f"(rate({metric}_bucket{{{V_ALIAS}}}[$__rate_interval])))"
        )
        legend = f"p{round(q * 100):g}" + (" {{" + by + "}}" if by else "")
        targets.append(_prom_target(expr, legend, refs[i]))
    return targets


def metrics_dashboard(config: dict[str, Any]) -> dict[str, Any]:
    q = config["grafana"]["quantiles"]
    wait_timeout = _prom_target(
        f"max(conndiag_server_wait_timeout_seconds{{{V_ALIAS}}})", "wait_timeout", "W"
    )
    wait_line = ("W", "wait_timeout")
    rows: list[tuple[str, list[dict[str, Any]]]] = [
        (
            "Queries",
            [
                timeseries(
                    "Queries by context",
                    "Queries per second, by conndiag's classification of where each ran: request "
                    "(on the request's own thread), cross_thread (another thread inside a live "
                    "request), detached (work a request started that runs outside it: threads, "
                    "pools), forked (connection inherited across fork) and background (commands, "
                    "workers, start-up threads). Source: conndiag_queries_total.",
                    "ops",
                    [
                        _prom_target(
                            f"sum by (context) (rate(conndiag_queries_total{{{V_ALIAS}}}"
                            f"[$__rate_interval]))",
                            "{{context}}",
                            "A",
                        )
                    ],
                    stack=True,
                ),
                timeseries(
                    "Detached and forked queries caught",
                    "Queries conndiag caught in the unsafe contexts (detached, forked, "
                    "cross_thread), by context and by what it did (raised: refused before running; "
                    "logged: ran, with a warning). Each raised detached query is work a view "
                    "handed to a thread that would have used a connection no request recycles. "
                    "Should be zero. Source: conndiag_queries_total.",
                    "short",
                    [
                        _prom_target(
                            "sum by (context, action) (increase(conndiag_queries_total"
                            f"{{{V_ALIAS}, "
                            f'context=~"detached|forked|cross_thread"}}[$__rate_interval]))',
                            "{{context}} / {{action}}",
                            "A",
                        )
                    ],
                    bars=True,
                ),
                timeseries(
                    "Query duration percentiles",
                    "Percentiles of query duration (the time the database call took, as seen by "
                    "the execute wrapper), over all contexts. Source: "
                    "conndiag_query_duration_seconds.",
                    "s",
                    _quantile_targets("conndiag_query_duration_seconds", q),
                    width=24,
                ),
            ],
        ),
        (
            "Connections",
            [
                timeseries(
                    "Connections open",
                    "Database connections currently open, per instance and alias (every thread "
                    "holds its own). A count that keeps growing with traffic points to connections "
                    "held by threads no request recycles. Source: conndiag_connections_open.",
                    "short",
                    [
                        _prom_target(
                            f"sum by (instance, alias) (conndiag_connections_open{{{V_ALIAS}}})",
                            "{{instance}} {{alias}}",
                            "A",
                        )
                    ],
                    width=8,
                ),
                timeseries(
                    "Connections opened by context",
                    "New connections per second, by the context of the thread that opened them. "
                    "With CONN_MAX_AGE=0 expect about one per request; more means churn. "
                    "Source: conndiag_connections_opened_total.",
                    "ops",
                    [
                        _prom_target(
                            f"sum by (context) (rate(conndiag_connections_opened_total{{{V_ALIAS}}}"
                            f"[$__rate_interval]))",
                            "{{context}}",
                            "A",
                        )
                    ],
                    width=8,
                    stack=True,
                ),
                timeseries(
                    "Connections closed by reason",
                    "Connections closed per second, by reason: max_age and request_end (Django "
                    "around a request), unusable, health_check_failed, explicit, background_work "
                    "(conndiag's escape hatch), replaced_stale (replaced by conndiag before a "
                    "query) and abandoned (garbage-collected unclosed: its thread ended). "
                    "Source: conndiag_connections_closed_total.",
                    "ops",
                    [
                        _prom_target(
                            f"sum by (reason) (rate(conndiag_connections_closed_total{{{V_ALIAS}}}"
                            f"[$__rate_interval]))",
                            "{{reason}}",
                            "A",
                        )
                    ],
                    width=8,
                    stack=True,
                ),
                timeseries(
                    "Connection age at query",
                    "Percentiles of the age of the connection each query ran on, with the "
                    "server's wait_timeout as a dashed threshold line where conndiag knows it "
                    "(the highest wait_timeout among the selected aliases). Source: "
                    "conndiag_connection_age_seconds, conndiag_server_wait_timeout_seconds.",
                    "s",
                    [
                        *_quantile_targets("conndiag_connection_age_seconds", q, "alias"),
                        wait_timeout,
                    ],
                    threshold_ref=wait_line,
                ),
                timeseries(
                    "Connection idle time at query",
                    "Percentiles of how long the connection had been idle when a query ran on it. "
                    "A query on a connection idle past wait_timeout (dashed red line) fails with "
                    "2006 'MySQL server has gone away'. Source: conndiag_connection_idle_seconds, "
                    "conndiag_server_wait_timeout_seconds.",
                    "s",
                    [
                        *_quantile_targets("conndiag_connection_idle_seconds", q, "alias"),
                        wait_timeout,
                    ],
                    threshold_ref=wait_line,
                ),
                timeseries(
                    "Oldest and longest-idle connection",
                    "Age of the oldest open connection and idle time of the connection idle "
                    "longest, per instance and alias, against wait_timeout (dashed red line). An "
                    "idle time that reaches wait_timeout means the next query on that connection "
                    "fails. Source: conndiag_oldest_connection_opened_timestamp_seconds, "
                    "conndiag_longest_idle_connection_last_used_timestamp_seconds.",
                    "s",
                    [
                        _prom_target(
                            "time() - min by (instance, alias) "
                            "(conndiag_oldest_connection_opened_timestamp_seconds"
                            f"{{{V_ALIAS}}} < +Inf)",
                            "oldest {{instance}} {{alias}}",
                            "A",
                        ),
                        _prom_target(
                            "time() - min by (instance, alias) "
                            "(conndiag_longest_idle_connection_last_used_timestamp_seconds"
                            f"{{{V_ALIAS}}} < +Inf)",
                            "longest idle {{instance}} {{alias}}",
                            "B",
                        ),
                        wait_timeout,
                    ],
                    threshold_ref=wait_line,
                ),
                timeseries(
                    "Connection open time",
                    "Percentiles of the time taken to open a database connection (TCP, TLS, "
                    "authentication, session set-up). Source: "
                    "conndiag_connection_open_duration_seconds.",
                    "s",
                    _quantile_targets("conndiag_connection_open_duration_seconds", q, "alias"),
                ),
                timeseries(
                    "Connect failures by error class",
                    "Connection attempts that failed per second, by error class (refused, "
                    "too_many_connections, access_denied, other). Source: "
                    "conndiag_connection_open_failures_total.",
                    "ops",
                    [
                        _prom_target(
                            "sum by (error_class) (rate(conndiag_connection_open_failures_total"
                            f"{{{V_ALIAS}}}[$__rate_interval]))",
                            "{{error_class}}",
                            "A",
                        )
                    ],
                ),
            ],
        ),
        (
            "Errors",
            [
                timeseries(
                    "Connection errors by class and code",
                    "Database errors per interval, classified by driver code: gone_away (2006), "
                    "lost (2013, 2055, 1927, 1053), server_timeout (4031), refused, "
                    "too_many_connections, access_denied, other. Source: "
                    "conndiag_connection_errors_total.",
                    "short",
                    [
                        _prom_target(
                            "sum by (error_class, code) (increase(conndiag_connection_errors_total"
                            f"{{{V_ALIAS}}}[$__rate_interval]))",
                            "{{error_class}} ({{code}})",
                            "A",
                        )
                    ],
                    bars=True,
                ),
                timeseries(
                    "Stale connections found",
                    "Connections conndiag found idle past the server's wait_timeout before a "
                    "query, by context and whether conndiag replaced them (replaced=false: the "
                    "query ran on it and most likely failed). Source: "
                    "conndiag_stale_connections_total.",
                    "short",
                    [
                        _prom_target(
                            "sum by (context, replaced) (increase(conndiag_stale_connections_total"
                            f"{{{V_ALIAS}}}[$__rate_interval]))",
                            "{{context}} replaced={{replaced}}",
                            "A",
                        )
                    ],
                    bars=True,
                ),
                timeseries(
                    "conndiag internal errors",
                    "Errors inside conndiag itself per interval, by component (it never breaks a "
                    "query because of them; each is logged once as conndiag.internal_error). "
                    "Should be zero. Source: conndiag_internal_errors_total.",
                    "short",
                    [
                        _prom_target(
                            "sum by (component) (increase(conndiag_internal_errors_total"
                            f"{{{V_TARGET}}}[$__rate_interval]))",
                            "{{component}}",
                            "A",
                        )
                    ],
                    width=24,
                    height=6,
                    bars=True,
                ),
            ],
        ),
        (
            "Configuration",
            [
                table(
                    "CONN_MAX_AGE configuration per instance",
                    "One row per instance and alias: the CONN_MAX_AGE state (per_request = 0, "
                    "persistent = None, timed = N seconds), CONN_MAX_AGE in seconds (+Inf when "
                    "persistent), whether CONN_HEALTH_CHECKS is on, and the server's wait_timeout "
                    "and max_connections where known. CONN_MAX_AGE at or above wait_timeout "
                    "lets Django reuse connections the server already dropped. Source: "
                    "conndiag_config_info, conndiag_conn_max_age_seconds, "
                    "conndiag_server_wait_timeout_seconds, conndiag_server_max_connections.",
                    "none",
                    [
                        _prom_target(
                            "max by (instance, alias, vendor, conn_max_age_state, health_checks) "
                            f"(conndiag_config_info{{{V_ALIAS}}})",
                            "",
                            "A",
                            instant=True,
                            table=True,
                        ),
                        _prom_target(
                            "max by (instance, alias) "
                            f"(conndiag_conn_max_age_seconds{{{V_ALIAS}}})",
                            "",
                            "B",
                            instant=True,
                            table=True,
                        ),
                        _prom_target(
                            "max by (instance, alias) "
                            f"(conndiag_server_wait_timeout_seconds{{{V_ALIAS}}})",
                            "",
                            "C",
                            instant=True,
                            table=True,
                        ),
                        _prom_target(
                            "max by (instance, alias) "
                            f"(conndiag_server_max_connections{{{V_ALIAS}}})",
                            "",
                            "D",
                            instant=True,
                            table=True,
                        ),
                    ],
                    transformations=[
                        {"id": "merge", "options": {}},
                        {
                            "id": "organize",
                            "options": {
                                "excludeByName": {"Time": True, "Value #A": True},
                                "renameByName": {
                                    "Value #B": "CONN_MAX_AGE (s)",
                                    "Value #C": "wait_timeout (s)",
                                    "Value #D": "max_connections",
                                },
                            },
                        },
                    ],
                ),
                table(
                    "Query policy per context",
                    "What conndiag does with a query in each context, per instance: raise "
                    "(refuse it before it runs), log (run it, log a warning) or ignore. Source: "
                    "conndiag_policy_info.",
                    "none",
                    [
                        _prom_target(
                            "max by (instance, context, action) "
                            f"(conndiag_policy_info{{{V_TARGET}}})",
                            "",
                            "A",
                            instant=True,
                            table=True,
                        )
                    ],
                    transformations=[
                        {
                            "id": "organize",
                            "options": {"excludeByName": {"Time": True, "Value": True}},
                        },
                    ],
                    height=6,
                ),
            ],
        ),
    ]
    target_vars = [
        _datasource_var("prometheus", "Data source"),
        _query_var(
            "job",
            "label_values(conndiag_connections_opened_total, job)",
            PROM_DS,
            "Prometheus job scraping the Django processes",
        ),
        _query_var(
            "instance",
            'label_values(conndiag_connections_opened_total{job=~"$job"}, instance)',
            PROM_DS,
            "Scraped process (host:port)",
        ),
        _query_var(
            "alias",
            "label_values(conndiag_connections_opened_total"
            '{job=~"$job", instance=~"$instance"}, alias)',
            PROM_DS,
            "Django database alias (settings.DATABASES key)",
        ),
    ]
    prefix = config["grafana"]["uid_prefix"]
    return _dashboard(
        config,
        "connections",
        "conndiag / Database connections",
        "Lifecycle of Django's database connections as conndiag sees it: queries by context, "
        "connections opened, closed, aged and idle against the server's wait_timeout, "
        "errors by class, and the CONN_MAX_AGE configuration. See docs/dashboards.md.",
        target_vars,
        _layout(rows),
        [
            {
                "title": "conndiag logs",
                "type": "link",
                "url": f"/d/{prefix}-logs",
                "icon": "doc",
                "tooltip": "",
                "targetBlank": False,
                "asDropdown": False,
                "includeVars": False,
                "keepTime": True,
                "tags": [],
            }
        ],
    )


def loki_pipeline(selector: str, events: Iterable[str], extra: str = "") -> str:
    """``{selector} |= "conndiag." | json | __error__="" | event=~"a|b" [and extra]``."""
    names = list(events)
    event = f'event="{names[0]}"' if len(names) == 1 else f'event=~"{_regex(names)}"'
    condition = f"{event} and {extra}" if extra else event
    return f'{selector} |= "conndiag." | json | __error__="" | {condition}'


ANOMALY_EVENTS = (EV_REFUSED, EV_FLAGGED, EV_FAILED, EV_STALE, EV_CONNECT_FAILED, EV_INTERNAL)


def logs_dashboard(config: dict[str, Any]) -> dict[str, Any]:
    sel = config["loki"]["dashboard_selector"]
    alias = 'alias=~"$alias"'
    rows: list[tuple[str, list[dict[str, Any]]]] = [
        (
            "Anomalies",
            [
                timeseries(
                    "Anomalies by event",
                    "Count of conndiag's anomaly events per interval: conndiag.query.refused "
                    "(unsafe query refused), conndiag.query.flagged (unsafe query logged), "
                    "conndiag.query.failed, conndiag.connection.stale, conndiag.connection.failed "
                    "and conndiag.internal_error. Routine events are not counted.",
                    "short",
                    [
                        _loki_target(
                            f"sum by (event) (count_over_time("
                            f"{loki_pipeline(sel, ANOMALY_EVENTS, alias)} [$__auto]))",
                            "{{event}}",
                            "A",
                        )
                    ],
                    bars=True,
                    datasource=LOKI_DS,
                ),
                timeseries(
                    "Connection closes by reason",
                    "Connections closed per interval by reason, from conndiag.connection.closed "
                    "events (abandoned, unusable, health_check_failed and replaced_stale are "
                    "logged at warning level).",
                    "short",
                    [
                        _loki_target(
                            f"sum by (reason) (count_over_time("
                            f"{loki_pipeline(sel, [EV_CLOSED], alias)} [$__auto]))",
                            "{{reason}}",
                            "A",
                        )
                    ],
                    bars=True,
                    datasource=LOKI_DS,
                ),
                logs(
                    "Detached and forked queries",
                    "conndiag.query.refused and conndiag.query.flagged events: the context, the "
                    "thread, the request that started the work (method, path, view) and "
                    "conndiag's explanation with the fix.",
                    loki_pipeline(sel, [EV_REFUSED, EV_FLAGGED], alias)
                    + ' | line_format "{{.level}} {{.context}} alias={{.alias}} '
                    "thread={{.thread_name}} request={{.request_method}} {{.request_path}} "
                    'view={{.view}}: {{.message}}"',
                ),
                logs(
                    "Stale connections",
                    "conndiag.connection.stale events: a connection idle past the server's "
                    "wait_timeout was about to run a query; replaced=true means conndiag replaced "
                    "it first.",
                    loki_pipeline(sel, [EV_STALE], alias)
                    + ' | line_format "alias={{.alias}} connection={{.connection_id}} '
                    "idle={{.connection_idle_s}}s wait_timeout={{.wait_timeout_s}}s "
                    'replaced={{.replaced}} context={{.context}} thread={{.thread_name}}"',
                ),
                logs(
                    "Connection errors and their diagnosed cause",
                    "conndiag.query.failed and conndiag.connection.failed events: the error class "
                    "and driver code, where it happened, and the cause conndiag computed from the "
                    "connection's age, idle time and the server's wait_timeout.",
                    loki_pipeline(sel, [EV_FAILED, EV_CONNECT_FAILED], alias)
                    + ' | line_format "{{.event}} alias={{.alias}} {{.error_class}} '
                    "({{.error_code}}) context={{.context}} thread={{.thread_name}} "
                    'idle={{.connection_idle_s}}s: {{.cause}}"',
                ),
            ],
        ),
    ]
    variables = [
        _datasource_var("loki", "Data source"),
        _query_var(
            "job",
            "label_values(job)",
            LOKI_DS,
            "Loki job label of the Django processes' log streams",
        ),
        {
            "type": "textbox",
            "name": "alias",
            "label": "alias",
            "description": "Regular expression on the alias field of conndiag's events",
            "query": ".*",
            "current": {"selected": False, "text": ".*", "value": ".*"},
            "hide": 0,
            "options": [{"selected": True, "text": ".*", "value": ".*"}],
        },
    ]
    prefix = config["grafana"]["uid_prefix"]
    return _dashboard(
        config,
        "logs",
        "conndiag / Logs",
        "conndiag's anomaly log events from Loki: unsafe queries, stale connections, "
        "connection errors with their diagnosed cause. See docs/dashboards.md.",
        variables,
        _layout(rows),
        [
            {
                "title": "conndiag connections",
                "type": "link",
                "url": f"/d/{prefix}-connections",
                "icon": "dashboard",
                "tooltip": "",
                "targetBlank": False,
                "asDropdown": False,
                "includeVars": False,
                "keepTime": True,
                "tags": [],
            }
        ],
    )


# -- Prometheus rules -----------------------------------------------------------------------

# recording rule names (level:metric:operations)
R_WAIT_TIMEOUT = "job_instance_alias:conndiag_server_wait_timeout_seconds:max"
R_LONGEST_IDLE = "job_instance_alias:conndiag_longest_idle_connection_seconds:max"
R_OLDEST = "job_instance_alias:conndiag_oldest_connection_age_seconds:max"
R_OPENED_RATE = "job_instance_alias:conndiag_connections_opened:rate{window}"


def _new_or_increased(metric: str, matchers: str, by: str, window: str, threshold: float) -> str:
    """Counter increased by more than ``threshold`` within ``window``, or appeared in it.

    ``increase()`` needs two samples, so a labelled counter whose series is created by the
    very first event (value 1 at its first scrape) shows no increase; the second branch
    catches series that did not exist ``window`` ago.
    """
    sel = _sel(matchers)
    return (
        f"sum by ({by}) (increase({metric}{sel}[{window}])) > {threshold:g}\n"
        f"or\nsum by ({by}) ({metric}{sel} unless {metric}{sel} offset {window})"
        f" > {threshold:g}\n"
    )


def _alert(
    config: dict[str, Any],
    name: str,
    expr: str,
    summary: str,
    description: str,
    section: str = "alerts",
) -> dict[str, Any]:
    spec = config[section][name]
    return {
        "alert": name,
        "expr": expr,
        "for": spec["for"],
        "labels": {"severity": spec["severity"]},
        "annotations": {
            "summary": summary,
            "description": description,
            "runbook_url": _runbook(config, name),
        },
    }


def prometheus_rules(config: dict[str, Any]) -> dict[str, Any]:
    p = config["prometheus"]
    a = config["alerts"]
    base = p["rule_selector"]
    window = p["window"]
    by = _by(p["alert_by"])

    def s(*matchers: str) -> str:
        return _sel(base, *matchers)

    opened_rate = R_OPENED_RATE.format(window=window)
    lost = a["ConnDiagConnectionLost"]
    recording = [
        {
            "record": R_WAIT_TIMEOUT,
            "expr": f"max by ({by}) (conndiag_server_wait_timeout_seconds{s()})",
        },
        {
            "record": R_LONGEST_IDLE,
            "expr": f"time() - min by ({by}) "
            f"(conndiag_longest_idle_connection_last_used_timestamp_seconds{s()} < +Inf)",
        },
        {
            "record": R_OLDEST,
            "expr": f"time() - min by ({by}) "
            f"(conndiag_oldest_connection_opened_timestamp_seconds{s()} < +Inf)",
        },
        {
            "record": opened_rate,
            "expr": f"sum by ({by}) (rate(conndiag_connections_opened_total{s()}[{window}]))",
        },
    ]
    where = "on {{ $labels.instance }} (job {{ $labels.job }}), alias {{ $labels.alias }}"
    alerts = [
        _alert(
            config,
            "ConnDiagConnectionLost",
            _new_or_increased(
                "conndiag_connection_errors_total",
                _sel(base, f'error_class=~"{_regex(lost["error_classes"])}"')[1:-1],
                f"{by}, error_class",
                window,
                lost["threshold"],
            ),
            f"Database connection lost ({{{{ $labels.error_class }}}}) {where}",
            "Queries failed because the server dropped the connection "
            f"({_regex(lost['error_classes'])}: MySQL 2006/2013/4031) within {window}: the "
            "work of those queries is lost. Most often a connection idle past wait_timeout "
            "was reused (a thread outside the request cycle, or CONN_MAX_AGE >= "
            "wait_timeout). The conndiag.query.failed log events carry the diagnosed cause.",
        ),
        _alert(
            config,
            "ConnDiagConnectFailures",
            _new_or_increased(
                "conndiag_connection_open_failures_total",
                s()[1:-1],
                f"{by}, error_class",
                window,
                a["ConnDiagConnectFailures"]["threshold"],
            ),
            f"Cannot connect to the database ({{{{ $labels.error_class }}}}) {where}",
            f"Connection attempts failed within {window} with error class "
            "{{ $labels.error_class }} (refused: server down or unreachable; "
            "too_many_connections: max_connections reached; access_denied: credentials).",
        ),
        _alert(
            config,
            "ConnDiagDetachedQueries",
            _new_or_increased(
                "conndiag_queries_total",
                _sel(base, 'context="detached"')[1:-1],
                f"{by}, action",
                window,
                a["ConnDiagDetachedQueries"]["threshold"],
            ),
            f"Detached ORM queries ({{{{ $labels.action }}}}) {where}",
            "Code started by a request ran ORM queries outside that request's thread (a "
            "thread or pool started from a view, or work that outlived its response). "
            "action=raised: conndiag refused them, the work failed; action=logged: they ran "
            "on connections no request recycles. The conndiag.query.refused log events name "
            "the thread, view and request.",
        ),
        _alert(
            config,
            "ConnDiagForkedConnection",
            _new_or_increased(
                "conndiag_queries_total",
                _sel(base, 'context="forked"')[1:-1],
                f"{by}, action",
                window,
                a["ConnDiagForkedConnection"]["threshold"],
            ),
            f"Queries on a connection inherited across fork {where}",
            "A process ran queries on a database connection opened by its parent before it "
            "forked (gunicorn --preload, uWSGI without lazy-apps). Processes sharing a "
            "connection can read each other's results: fix the server configuration now.",
        ),
        _alert(
            config,
            "ConnDiagConnMaxAgeAboveWaitTimeout",
            f"max by ({by}) (conndiag_conn_max_age_seconds{s()})\n>= on ({by}) {R_WAIT_TIMEOUT}\n",
            f"CONN_MAX_AGE is at or above the server's wait_timeout {where}",
            "CONN_MAX_AGE (+Inf when persistent) is not below the server's wait_timeout, "
            "so Django keeps connections the server has already closed and the next query on "
            "them fails with 2006/2013 (health checks, where on, only run at request start "
            "and never in other threads). Set CONN_MAX_AGE below wait_timeout.",
        ),
        _alert(
            config,
            "ConnDiagIdleNearWaitTimeout",
            f"{R_LONGEST_IDLE}\n"
            f"> on ({by}) {a['ConnDiagIdleNearWaitTimeout']['ratio']:g} * {R_WAIT_TIMEOUT}\n",
            f"An open connection is idle close to wait_timeout {where}",
            "The longest-idle open connection has been idle more than "
            f"{a['ConnDiagIdleNearWaitTimeout']['ratio']:.0%} of the server's wait_timeout. "
            "If the thread holding it queries again after wait_timeout, the query fails "
            "with 2006 'MySQL server has gone away'.",
        ),
        _alert(
            config,
            "ConnDiagConnectionChurn",
            f"{opened_rate} > {a['ConnDiagConnectionChurn']['opened_per_second']:g}\n",
            f"High connection churn {where}",
            "More than "
            f"{a['ConnDiagConnectionChurn']['opened_per_second']:g} new database connections "
            f"per second over {window}: each costs a TCP and authentication round trip and "
            "a server thread. Per-request connections (CONN_MAX_AGE=0) under load, or "
            "threads that each open their own.",
        ),
        _alert(
            config,
            "ConnDiagNearMaxConnections",
            f"sum by (job, alias) (conndiag_connections_open{s()})\n"
            f"> on (job, alias) {a['ConnDiagNearMaxConnections']['ratio']:g} * "
            f"max by (job, alias) (conndiag_server_max_connections{s()})\n",
            "Open connections near the server's max_connections "
            "(job {{ $labels.job }}, alias {{ $labels.alias }})",
            "The connections open across all instances of the job exceed "
            f"{a['ConnDiagNearMaxConnections']['ratio']:.0%} of the server's max_connections; "
            "new connections will soon fail with 1040 'Too many connections'.",
        ),
    ]
    return {
        "groups": [
            {"name": "conndiag.rules", "interval": p["rule_interval"], "rules": recording},
            {"name": "conndiag.alerts", "interval": p["rule_interval"], "rules": alerts},
        ]
    }


# -- promtool unit tests --------------------------------------------------------------------

T_LABELS = {"job": "django", "instance": "web-1:8000", "alias": "default"}


def _series(metric: str, values: str, **labels: str) -> dict[str, str]:
    merged = {**T_LABELS, "vendor": "mysql", **labels}
    body = ", ".join(f'{k}="{v}"' for k, v in merged.items())
    return {"series": f"{metric}{{{body}}}", "values": values}


def _render(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)


def _expect(rule: dict[str, Any], **labels: str) -> dict[str, Any]:
    all_labels = {**labels, **rule["labels"]}
    return {
        "exp_labels": all_labels,
        "exp_annotations": {k: _render(v, all_labels) for k, v in rule["annotations"].items()},
    }


def _minutes(duration: str) -> int:
    match = re.fullmatch(r"(\d+)([smh])", duration)
    if match is None:
        msg = f"unsupported duration {duration!r} (use s, m or h)"
        raise ValueError(msg)
    value, unit = int(match.group(1)), match.group(2)
    return {"s": max(1, -(-value // 60)), "m": value, "h": value * 60}[unit]


def promtool_tests(config: dict[str, Any], rules: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One promtool test file per alert: a case that fires it, a case that keeps it quiet."""
    by_name = {r["alert"]: r for r in rules["groups"][1]["rules"]}
    a = config["alerts"]
    window = _minutes(config["prometheus"]["window"])
    t = T_LABELS

    def settle(name: str, extra: int = 1) -> int:
        """Minutes after which the alert, true from minute ``extra``, has passed its for:."""
        return window + _minutes(by_name[name]["for"]) + extra + 1

    cases: dict[str, list[tuple[str, list[dict[str, str]], int, list[dict[str, Any]]]]] = {}
    lost_class = a["ConnDiagConnectionLost"]["error_classes"][0]
    n = settle("ConnDiagConnectionLost") + window
    cases["ConnDiagConnectionLost"] = [
        (
            "fires when the error counter increases",
            [
                _series(
                    "conndiag_connection_errors_total",
                    f"0x{n} 1x{n}",
                    error_class=lost_class,
                    code="2006",
                )
            ],
            n + 1,
            [_expect(by_name["ConnDiagConnectionLost"], **t, error_class=lost_class)],
        ),
        (
            "fires when the first error creates the series",
            [
                _series(
                    "conndiag_connection_errors_total",
                    f"_x{n} 1x{n}",
                    error_class="lost",
                    code="2013",
                )
            ],
            n + 1,
            [_expect(by_name["ConnDiagConnectionLost"], **t, error_class="lost")],
        ),
        (
            "stays quiet on old errors and on other error classes",
            [
                _series(
                    "conndiag_connection_errors_total",
                    f"3x{3 * n}",
                    error_class=lost_class,
                    code="2006",
                ),
                _series(
                    "conndiag_connection_errors_total",
                    f"0+1x{3 * n}",
                    error_class="access_denied",
                    code="1045",
                ),
            ],
            3 * n,
            [],
        ),
    ]
    n = settle("ConnDiagConnectFailures")
    cases["ConnDiagConnectFailures"] = [
        (
            "fires while connection attempts keep failing",
            [
                _series(
                    "conndiag_connection_open_failures_total", f"0+1x{2 * n}", error_class="refused"
                )
            ],
            n,
            [_expect(by_name["ConnDiagConnectFailures"], **t, error_class="refused")],
        ),
        (
            "stays quiet when no attempt failed recently",
            [
                _series(
                    "conndiag_connection_open_failures_total", f"5x{3 * n}", error_class="refused"
                )
            ],
            3 * n,
            [],
        ),
    ]
    for name, context in (
        ("ConnDiagDetachedQueries", "detached"),
        ("ConnDiagForkedConnection", "forked"),
    ):
        n = settle(name)
        cases[name] = [
            (
                f"fires on {context} queries",
                [
                    _series(
                        "conndiag_queries_total", f"0+2x{2 * n}", context=context, action="raised"
                    )
                ],
                n,
                [_expect(by_name[name], **t, action="raised")],
            ),
            (
                f"stays quiet on request queries and on old {context} ones",
                [
                    _series(
                        "conndiag_queries_total",
                        f"0+50x{3 * n}",
                        context="request",
                        action="observed",
                    ),
                    _series(
                        "conndiag_queries_total", f"4x{3 * n}", context=context, action="raised"
                    ),
                ],
                3 * n,
                [],
            ),
        ]
    name = "ConnDiagConnMaxAgeAboveWaitTimeout"
    n = settle(name)
    cases[name] = [
        (
            "fires on a persistent connection (CONN_MAX_AGE=None)",
            [
                _series("conndiag_conn_max_age_seconds", " ".join(["+Inf"] * (n + 1))),
                _series("conndiag_server_wait_timeout_seconds", f"600x{n}"),
            ],
            n,
            [_expect(by_name[name], **t)],
        ),
        (
            "fires on CONN_MAX_AGE equal to wait_timeout",
            [
                _series("conndiag_conn_max_age_seconds", f"600x{n}"),
                _series("conndiag_server_wait_timeout_seconds", f"600x{n}"),
            ],
            n,
            [_expect(by_name[name], **t)],
        ),
        (
            "stays quiet below wait_timeout, and when wait_timeout is unknown",
            [
                _series("conndiag_conn_max_age_seconds", f"60x{n}"),
                _series("conndiag_server_wait_timeout_seconds", f"600x{n}"),
                _series(
                    "conndiag_conn_max_age_seconds", " ".join(["+Inf"] * (n + 1)), alias="other"
                ),
            ],
            n,
            [],
        ),
    ]
    name = "ConnDiagIdleNearWaitTimeout"
    ratio = a[name]["ratio"]
    wait = 600
    # last used at t=0: idle = t seconds; true once t > ratio * wait_timeout
    start = int(ratio * wait) // 60 + 1
    n = start + _minutes(by_name[name]["for"]) + 1
    cases[name] = [
        (
            "fires when the longest-idle connection nears wait_timeout",
            [
                _series(
                    "conndiag_longest_idle_connection_last_used_timestamp_seconds", f"1x{n + 1}"
                ),
                _series("conndiag_server_wait_timeout_seconds", f"{wait}x{n + 1}"),
            ],
            n,
            [_expect(by_name[name], **t)],
        ),
        (
            "stays quiet on busy connections and when none is open (gauge at +Inf)",
            [
                _series(
                    "conndiag_longest_idle_connection_last_used_timestamp_seconds", f"0+60x{n + 1}"
                ),
                _series("conndiag_server_wait_timeout_seconds", f"{wait}x{n + 1}"),
                _series(
                    "conndiag_longest_idle_connection_last_used_timestamp_seconds",
                    " ".join(["+Inf"] * (n + 1)),
                    alias="other",
                ),
                _series("conndiag_server_wait_timeout_seconds", f"{wait}x{n + 1}", alias="other"),
            ],
            n,
            [],
        ),
    ]
    name = "ConnDiagConnectionChurn"
    per_second = a[name]["opened_per_second"]
    n = settle(name)
    cases[name] = [
        (
            "fires on sustained connection churn",
            [
                _series(
                    "conndiag_connections_opened_total",
                    f"0+{int(per_second * 2 * 60)}x{n + 1}",
                    context="request",
                )
            ],
            n,
            [_expect(by_name[name], **t)],
        ),
        (
            "stays quiet below the threshold",
            [
                _series(
                    "conndiag_connections_opened_total",
                    f"0+{int(per_second * 60 / 2)}x{n + 1}",
                    context="request",
                )
            ],
            n,
            [],
        ),
    ]
    name = "ConnDiagNearMaxConnections"
    ratio = a[name]["ratio"]
    n = settle(name)
    high = int(100 * ratio / 2) + 1
    cases[name] = [
        (
            "fires when the job's instances together near max_connections",
            [
                _series("conndiag_connections_open", f"{high}x{n}"),
                _series("conndiag_connections_open", f"{high}x{n}", instance="web-2:8000"),
                _series("conndiag_server_max_connections", f"100x{n}"),
                _series("conndiag_server_max_connections", f"100x{n}", instance="web-2:8000"),
            ],
            n,
            [_expect(by_name[name], job="django", alias="default")],
        ),
        (
            "stays quiet well below max_connections",
            [
                _series("conndiag_connections_open", f"10x{n}"),
                _series("conndiag_server_max_connections", f"100x{n}"),
            ],
            n,
            [],
        ),
    ]
    files: dict[str, dict[str, Any]] = {}
    for alert, alert_cases in cases.items():
        tests = []
        for title, series, minute, expected in alert_cases:
            tests.append(
                {
                    "name": f"{alert} {title}",
                    "interval": "1m",
                    "input_series": series,
                    "alert_rule_test": [
                        {"eval_time": f"{minute}m", "alertname": alert, "exp_alerts": expected}
                    ],
                }
            )
        files[f"{PROM_TESTS_DIR}/{alert}.yml"] = {
            "rule_files": ["../conndiag-rules.yml"],
            "evaluation_interval": "1m",
            "tests": tests,
        }
    return files


# -- Loki rules -----------------------------------------------------------------------------


def loki_rules(config: dict[str, Any]) -> dict[str, Any]:
    sel = config["loki"]["rule_selector"]
    window = config["loki"]["window"]
    la = config["loki_alerts"]

    def count(
        by: str, events: Iterable[str], extra: str, threshold: float, over: str = window
    ) -> str:
        return (
            f"sum by ({by}) (count_over_time({loki_pipeline(sel, events, extra)} "
            f"[{over}])) > {threshold:g}\n"
        )

    lost = la["ConnDiagLogConnectionLost"]
    churn = la["ConnDiagLogConnectionChurn"]["opened_per_second"]
    where = "alias {{ $labels.alias }} (job {{ $labels.job }})"
    alerts = [
        _alert(
            config,
            "ConnDiagLogConnectionLost",
            count(
                "job, alias, error_class",
                [EV_FAILED, EV_CONNECT_FAILED],
                f'error_class=~"{_regex(lost["error_classes"])}"',
                lost["threshold"],
            ),
            f"Database connection lost ({{{{ $labels.error_class }}}}) on {where}",
            "conndiag logged conndiag.query.failed events with a connection-lost error "
            f"class within {window}; their cause field says why (idle past wait_timeout, "
            "persistent connection, forked process).",
            "loki_alerts",
        ),
        _alert(
            config,
            "ConnDiagLogConnectFailures",
            count(
                "job, alias, error_class",
                [EV_CONNECT_FAILED],
                "",
                la["ConnDiagLogConnectFailures"]["threshold"],
            ),
            f"Cannot connect to the database ({{{{ $labels.error_class }}}}) on {where}",
            f"conndiag.connection.failed events within {window}.",
            "loki_alerts",
        ),
        _alert(
            config,
            "ConnDiagLogDetachedQueries",
            count(
                "job, alias, event",
                [EV_REFUSED, EV_FLAGGED],
                'context="detached"',
                la["ConnDiagLogDetachedQueries"]["threshold"],
            ),
            f"Detached ORM queries on {where}",
            "Work started by a request ran ORM queries outside the request's thread "
            "(conndiag.query.refused: refused; conndiag.query.flagged: logged). The "
            "events name the thread, view and request.",
            "loki_alerts",
        ),
        _alert(
            config,
            "ConnDiagLogForkedConnection",
            count(
                "job, alias, event",
                [EV_REFUSED, EV_FLAGGED],
                'context="forked"',
                la["ConnDiagLogForkedConnection"]["threshold"],
            ),
            f"Queries on a connection inherited across fork on {where}",
            "A process used a connection opened before the server forked (gunicorn "
            "--preload, uWSGI without lazy-apps).",
            "loki_alerts",
        ),
        _alert(
            config,
            "ConnDiagLogStaleConnections",
            count(
                "job, alias, replaced",
                [EV_STALE],
                "",
                la["ConnDiagLogStaleConnections"]["threshold"],
            ),
            f"Connections idle past wait_timeout on {where}",
            "conndiag.connection.stale: a query was about to run on a connection idle "
            "longer than the server's wait_timeout (replaced=false: it most likely "
            "failed with 2006).",
            "loki_alerts",
        ),
        _alert(
            config,
            "ConnDiagLogPersistentConnections",
            count(
                "job, alias",
                [EV_OPENED],
                'vendor="mysql" and conn_max_age_state="persistent"',
                la["ConnDiagLogPersistentConnections"]["threshold"],
                la["ConnDiagLogPersistentConnections"].get("window", window),
            ),
            f"Persistent MySQL connections (CONN_MAX_AGE=None) on {where}",
            "Connections are opened with CONN_MAX_AGE=None, which is always at or above "
            "the server's wait_timeout: connections the server dropped get reused.",
            "loki_alerts",
        ),
        _alert(
            config,
            "ConnDiagLogConnectionChurn",
            f"sum by (job, alias) (rate({loki_pipeline(sel, [EV_OPENED])} [{window}]))"
            f" > {churn:g}\n",
            f"High connection churn on {where}",
            f"More than {churn:g} conndiag.connection.opened events per second over {window}.",
            "loki_alerts",
        ),
        _alert(
            config,
            "ConnDiagLogTooManyConnections",
            count(
                "job, alias",
                [EV_FAILED, EV_CONNECT_FAILED],
                'error_class="too_many_connections"',
                la["ConnDiagLogTooManyConnections"]["threshold"],
            ),
            f"Server refused connections: too many connections on {where}",
            "The server answered 1040/1203: max_connections (or the user's limit) is reached.",
            "loki_alerts",
        ),
    ]
    return {"groups": [{"name": "conndiag.log-alerts", "interval": "1m", "rules": alerts}]}


# -- output ---------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    pass


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_representer)

HEADER = "# Generated by dashboards/generate.py from dashboards/config.yaml: do not edit.\n"


def _yaml(data: Any) -> str:
    return HEADER + yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def build(config: dict[str, Any]) -> dict[str, str]:
    """Every generated file: path relative to dashboards/ -> content."""
    rules = prometheus_rules(config)
    files = {
        f"{GRAFANA_DIR}/conndiag-connections.json": _json(metrics_dashboard(config)),
        f"{GRAFANA_DIR}/conndiag-logs.json": _json(logs_dashboard(config)),
        PROM_RULES: _yaml(rules),
        LOKI_RULES: _yaml(loki_rules(config)),
    }
    for path, content in promtool_tests(config, rules).items():
        files[path] = _yaml(content)
    return files


def main(argv: list[str]) -> int:
    check = "--check" in argv
    files = build(load_config())
    stale = []
    for rel, content in files.items():
        path = HERE / rel
        if check:
            if not path.exists() or path.read_text() != content:
                stale.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    if stale:
        print("out of date (run python dashboards/generate.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
