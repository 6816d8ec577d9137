"""The generated Grafana dashboards and the expressions of every dashboard and rule file.

Dashboards: up to date with the generator, valid against Grafana's published JSON schema,
and passing checks modelled on grafana/dashboard-linter's rules. Expressions: every PromQL
expression parses (promtool) and selects only metrics conndiag exports; every LogQL
expression parses (@grafana/lezer-logql) and uses only fields of conndiag's log schema.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import conndiag.events
from dashboards import checks, generate
from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"
SCHEMAS = DASHBOARDS / "schemas"

# Enumerated by grafana/dashboard-linter's panel-units-rule (from Grafana's unit categories);
# the subset a connection dashboard can sensibly use.
VALID_UNITS = frozenset(
    {
        "none",
        "string",
        "short",
        "percent",
        "percentunit",
        "ns",
        "µs",
        "ms",
        "s",
        "m",
        "h",
        "d",
        "dtdurations",
        "dateTimeAsIso",
        "dateTimeFromNow",
        "cps",
        "ops",
        "reqps",
        "rps",
        "wps",
        "iops",
        "cpm",
        "opm",
        "rpm",
        "wpm",
        "bool",
        "bool_yes_no",
        "bytes",
    }
)
RANGE_FUNCTIONS = ("rate", "irate", "increase")
LOKI_BUILTIN_LABELS = frozenset({"__error__", "__error_details__", "__line__"})


def _tool(path: str | None, name: str) -> str:
    if path is None:
        unavailable(f"{name} is not installed (apt-get install prometheus, or nodejs npm)")
    return path


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return generate.load_config()


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict[str, Any]]:
    return checks.dashboards()


@pytest.fixture(scope="module")
def prom_dashboards(dashboards: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in dashboards.values() if checks.datasource_kind(d) == "prometheus"]


@pytest.fixture(scope="module")
def exported() -> dict[str, tuple[str, tuple[str, ...]]]:
    return checks.exported_metrics()


def _all_promql() -> list[tuple[str, str]]:
    return checks.dashboard_exprs("prometheus") + checks.rule_exprs(generate.PROM_RULES)


def _all_logql() -> list[tuple[str, str]]:
    return checks.dashboard_exprs("loki") + checks.rule_exprs(generate.LOKI_RULES)


# -- generated, committed, up to date -------------------------------------------------------


def test_generated_files_are_up_to_date(config: dict[str, Any]) -> None:
    """Regenerating from config.yaml reproduces every committed file byte for byte."""
    files = generate.build(config)
    stale = [
        rel
        for rel, content in files.items()
        if not (DASHBOARDS / rel).exists() or (DASHBOARDS / rel).read_text() != content
    ]
    assert stale == [], f"run `python dashboards/generate.py`; out of date: {stale}"


def test_no_stray_generated_files(config: dict[str, Any]) -> None:
    """Every dashboard, rule and promtool test file on disk is one the generator writes."""
    files = set(generate.build(config))
    on_disk = {
        str(p.relative_to(DASHBOARDS))
        for pattern in (
            "grafana/*.json",
            "prometheus/*.yml",
            "prometheus/tests/*.yml",
            "loki/*.yml",
        )
        for p in DASHBOARDS.glob(pattern)
    }
    assert on_disk - files == set()


def test_thresholds_and_severities_come_from_the_config(config: dict[str, Any]) -> None:
    """Changing a threshold, a severity and a selector in the config changes the output."""
    changed = json.loads(json.dumps(config))
    changed["alerts"]["ConnDiagConnectionChurn"]["opened_per_second"] = 42
    changed["alerts"]["ConnDiagDetachedQueries"]["severity"] = "critical"
    changed["prometheus"]["rule_selector"] = 'job="django"'
    rules = {r["alert"]: r for r in generate.prometheus_rules(changed)["groups"][1]["rules"]}
    assert "> 42" in rules["ConnDiagConnectionChurn"]["expr"]
    assert rules["ConnDiagDetachedQueries"]["labels"]["severity"] == "critical"
    assert (
        'conndiag_queries_total{job="django", context="detached"}'
        in (rules["ConnDiagDetachedQueries"]["expr"])
    )


# -- Grafana's JSON schema ------------------------------------------------------------------


def test_dashboards_validate_against_grafana_schema(dashboards: dict[str, dict[str, Any]]) -> None:
    """Every dashboard is valid against Grafana's published dashboard JSON schema."""
    schema = json.loads((SCHEMAS / "dashboard.jsonschema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{name}: {list(e.absolute_path)}: {e.message[:200]}"
        for name, dash in dashboards.items()
        for e in validator.iter_errors(dash)
    ]
    assert errors == []
    assert len(dashboards) == 2


def test_panel_options_validate_against_panel_schemas(
    dashboards: dict[str, dict[str, Any]],
) -> None:
    """Each panel's options and custom field config are valid for its panel type's schema."""
    checked = 0
    errors = []
    for name, dash in dashboards.items():
        for panel in checks.panels(dash):
            path = SCHEMAS / f"{panel['type']}.jsonschema.json"
            if not path.exists():
                continue
            schema = json.loads(path.read_text())
            for key, value in (
                ("Options", panel["options"]),
                ("FieldConfig", panel["fieldConfig"]["defaults"].get("custom")),
            ):
                if key not in schema["definitions"] or value is None:
                    continue
                sub = {**schema, "$ref": f"#/definitions/{key}"}
                errors += [
                    f"{name}: {panel['title']}: {key}: {e.message[:200]}"
                    for e in jsonschema.Draft7Validator(sub).iter_errors(value)
                ]
                checked += 1
    assert errors == []
    assert checked > 20


def test_schema_validation_rejects_a_broken_dashboard(
    dashboards: dict[str, dict[str, Any]],
) -> None:
    """The schema check is not vacuous: a panel with a string gridPos fails it."""
    schema = json.loads((SCHEMAS / "dashboard.jsonschema.json").read_text())
    broken = json.loads(json.dumps(next(iter(dashboards.values()))))
    broken["panels"][1]["gridPos"] = "top-left"
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken)) != []


# -- checks modelled on grafana/dashboard-linter ---------------------------------------------


def test_template_datasource_rule(dashboards: dict[str, dict[str, Any]]) -> None:
    """Exactly one datasource variable, named datasource and labelled "Data source"."""
    for dash in dashboards.values():
        ds = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
        assert len(ds) == 1, dash["title"]
        assert ds[0]["name"] == "datasource"
        assert ds[0]["label"] == "Data source"
        assert ds[0]["query"] in ("prometheus", "loki")


@pytest.mark.parametrize("name", ["job", "instance", "alias"])
def test_template_job_instance_alias_rules(
    prom_dashboards: list[dict[str, Any]], name: str
) -> None:
    """job, instance and alias are multi-select query variables on $datasource, labelled by
    their name, with allValue .+ and a label_values(..., <name>) query."""
    assert prom_dashboards
    for dash in prom_dashboards:
        var = {v["name"]: v for v in dash["templating"]["list"]}[name]
        assert var["type"] == "query"
        assert var["label"] == name
        assert var["datasource"]["uid"] == "${datasource}"
        assert var["multi"] is True
        assert var["includeAll"] is True
        assert var["allValue"] == ".+"
        assert re.fullmatch(rf"label_values\(\w+(\{{.*\}})?, {name}\)", var["query"])


def test_logs_dashboard_has_job_variable(dashboards: dict[str, dict[str, Any]]) -> None:
    """The Loki dashboard filters on the job stream label (its streams need no instance)."""
    logs = [d for d in dashboards.values() if checks.datasource_kind(d) == "loki"]
    assert len(logs) == 1
    job = {v["name"]: v for v in logs[0]["templating"]["list"]}["job"]
    assert job["datasource"]["uid"] == "${datasource}"
    assert job["multi"] is True
    assert job["allValue"] == ".+"


def test_panel_datasource_rule(dashboards: dict[str, dict[str, Any]]) -> None:
    """Every panel and every target uses the templated ${datasource}."""
    for dash in dashboards.values():
        for panel in checks.panels(dash):
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_panel_title_description_rule(dashboards: dict[str, dict[str, Any]]) -> None:
    """Every panel has a title and a description of some substance."""
    for dash in dashboards.values():
        for panel in checks.panels(dash):
            assert panel["title"].strip()
            assert len(panel["description"]) >= 60, panel["title"]


def test_panel_units_rule(dashboards: dict[str, dict[str, Any]]) -> None:
    """Every panel has a valid unit (from Grafana's unit ids)."""
    for dash in dashboards.values():
        for panel in checks.panels(dash):
            assert panel["fieldConfig"]["defaults"].get("unit") in VALID_UNITS, panel["title"]


def test_panel_ids_unique_and_grid_in_bounds(dashboards: dict[str, dict[str, Any]]) -> None:
    """Panel ids are unique and no panel leaves the 24-column grid or overlaps another."""
    for dash in dashboards.values():
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids))
        cells: set[tuple[int, int]] = set()
        for p in dash["panels"]:
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24
            area = {
                (x, y)
                for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])
            }
            assert not area & cells, p["title"]
            cells |= area


def test_target_rate_interval_rule() -> None:
    """Every range in a dashboard query is $__rate_interval (PromQL) or $__auto (LogQL)."""
    for where, expr in checks.dashboard_exprs("prometheus"):
        assert set(re.findall(r"\[([^\]]*)\]", expr)) <= {"$__rate_interval"}, where
    for where, expr in checks.dashboard_exprs("loki"):
        assert set(re.findall(r"\[([^\]]*)\]", expr)) <= {"$__auto"}, where


def test_target_counter_agg_rule(exported: dict[str, tuple[str, tuple[str, ...]]]) -> None:
    """Every counter and histogram bucket in a dashboard is directly inside rate/increase
    over $__rate_interval."""
    cumulative = {n for n, (kind, _) in exported.items() if kind in ("counter", "histogram")}
    for where, expr in checks.dashboard_exprs("prometheus"):
        for name in checks.promql_metric_names(expr) & cumulative:
            uses = len(re.findall(rf"\b{name}\b", expr))
            wrapped = len(
                re.findall(
                    rf"\b(?:{'|'.join(RANGE_FUNCTIONS)})\({name}\{{[^}}]*\}}\[\$__rate_interval\]\)",
                    expr,
                )
            )
            assert uses == wrapped, f"{where}: {name} not wrapped in rate/increase"


def test_target_job_instance_rule() -> None:
    """Every metric selector in a Prometheus dashboard filters on $job and $instance, and on
    $alias where the metric has an alias label."""
    no_alias = {"conndiag_policy_info", "conndiag_internal_errors_total"}
    for where, expr in checks.dashboard_exprs("prometheus"):
        for name, matchers in checks.promql_selectors(expr):
            assert 'job=~"$job"' in matchers, f"{where}: {name}"
            assert 'instance=~"$instance"' in matchers, f"{where}: {name}"
            if name not in no_alias:
                assert 'alias=~"$alias"' in matchers, f"{where}: {name}"


def test_logs_dashboard_queries_use_the_job_variable() -> None:
    """Every LogQL dashboard query selects streams with $job and filters on $alias."""
    exprs = checks.dashboard_exprs("loki")
    assert len(exprs) >= 4
    for where, expr in exprs:
        assert '{job=~"$job"}' in expr, where
        assert 'alias=~"$alias"' in expr, where


def test_key_panels_present(prom_dashboards: list[dict[str, Any]]) -> None:
    """The connections dashboard has the panels the issue asks for."""
    titles = {p["title"] for d in prom_dashboards for p in checks.panels(d)}
    assert {
        "Queries by context",
        "Detached and forked queries caught",
        "Connections open",
        "Connections opened by context",
        "Connections closed by reason",
        "Connection age at query",
        "Connection idle time at query",
        "Oldest and longest-idle connection",
        "Connection errors by class and code",
        "Query duration percentiles",
        "CONN_MAX_AGE configuration per instance",
    } <= titles


def test_age_panels_draw_wait_timeout_as_threshold(prom_dashboards: list[dict[str, Any]]) -> None:
    """Age and idle panels turn the wait_timeout query into a dashed threshold line."""
    for dash in prom_dashboards:
        for panel in checks.panels(dash):
            refs = {t["refId"]: t["expr"] for t in panel["targets"]}
            if "W" not in refs:
                continue
            assert "conndiag_server_wait_timeout_seconds" in refs["W"]
            assert panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == (
                "dashed"
            )
            (transform,) = panel["transformations"]
            assert transform["id"] == "configFromData"
            assert transform["options"]["configRefId"] == "W"


# -- PromQL: parses, and uses only conndiag's metrics ----------------------------------------


def test_every_promql_expression_parses() -> None:
    """promtool parses every dashboard query and every rule expression."""
    promtool = _tool(checks.promtool(), "promtool")
    exprs = _all_promql()
    assert len(exprs) > 30
    assert checks.promql_parse_errors(exprs, promtool) == []


def test_promql_parse_check_catches_errors() -> None:
    """The parse check reports exactly the broken expression."""
    promtool = _tool(checks.promtool(), "promtool")
    exprs = [("good", "sum(rate(x_total[5m]))"), ("bad", "sum(rate(x_total[5m])")]
    errors = checks.promql_parse_errors(exprs, promtool)
    assert len(errors) == 1
    assert errors[0].startswith("bad:")


def test_every_metric_used_is_exported_by_conndiag(
    exported: dict[str, tuple[str, tuple[str, ...]]],
) -> None:
    """Every metric name in a dashboard or rule is a series conndiag.metrics exports (or a
    recording rule defined in the rule file)."""
    recorded = {r["record"] for r in checks.rules(generate.PROM_RULES) if "record" in r}
    used: set[str] = set()
    for where, expr in _all_promql():
        names = checks.promql_metric_names(expr)
        unknown = names - set(exported) - recorded
        assert unknown == set(), f"{where}: {unknown}"
        used |= names
    # the extraction finds names at all, and the dashboards cover nearly every family
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used & set(exported)}
    all_families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exported}
    assert all_families - families == set()


def test_labels_used_exist_on_the_metrics(exported: dict[str, tuple[str, tuple[str, ...]]]) -> None:
    """Every label a selector matches on is one conndiag (or Prometheus: job, instance)
    puts on that metric."""
    for where, expr in _all_promql():
        for name, matchers in checks.promql_selectors(expr):
            if name not in exported:
                continue
            allowed = {*exported[name][1], "job", "instance"}
            labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
            assert labels <= allowed, f"{where}: {name} has no {labels - allowed}"


def test_metric_extraction() -> None:
    """The metric-name lexer skips functions, keywords, labels, strings and durations."""
    expr = (
        'histogram_quantile(0.95, sum by (le, alias) (rate(a_bucket{x=~"b|c"}[5m])))'
        " > on (job) 0.8 * max by (job) (b_seconds offset 5m) or time() - c unless d"
    )
    assert checks.promql_metric_names(expr) == {"a_bucket", "b_seconds", "c", "d"}


# -- LogQL: parses, and uses only the log schema ---------------------------------------------


@pytest.fixture(scope="module")
def logql_results() -> list[dict[str, Any]]:
    node = _tool(checks.node(), "node")
    checks.ensure_logql_parser()
    return checks.logql_check([expr for _, expr in _all_logql()], node)


def test_every_logql_expression_parses(logql_results: list[dict[str, Any]]) -> None:
    """@grafana/lezer-logql parses every Loki dashboard query and Loki rule without error."""
    assert len(logql_results) >= 12
    errors = [(r["expr"], r["errors"]) for r in logql_results if r["errors"]]
    assert errors == []


def test_logql_parse_check_catches_errors() -> None:
    """The LogQL check reports a broken expression (unclosed parenthesis, bad filter)."""
    node = _tool(checks.node(), "node")
    checks.ensure_logql_parser()
    results = checks.logql_check(
        ['sum(count_over_time({job="x"}[5m])', '{job="x"} | json | a=b', '{job="x"} | json'], node
    )
    assert [bool(r["errors"]) for r in results] == [True, True, False]


def test_logql_fields_are_in_the_log_schema(
    logql_results: list[dict[str, Any]], config: dict[str, Any]
) -> None:
    """Every field a LogQL expression filters, groups or formats on is in the documented
    log schema, and every stream label is a configured stream label."""
    fields = {f for group in config["log_fields"].values() for f in group}
    stream_labels = set(config["loki"]["stream_labels"])
    for result in logql_results:
        for ident in result["identifiers"]:
            if ident["stream"]:
                assert ident["name"] in stream_labels, result["expr"]
            else:
                assert ident["name"] in fields | stream_labels | LOKI_BUILTIN_LABELS, (
                    f"{ident['name']!r} in {result['expr']}"
                )
        assert checks.logql_template_fields(result["expr"]) <= fields, result["expr"]
    used = {i["name"] for r in logql_results for i in r["identifiers"]}
    assert {"event", "error_class", "context", "alias"} <= used


def test_logql_event_names_are_conndiag_events() -> None:
    """Every event name a LogQL expression matches is one conndiag emits, and the
    generator's event constants are conndiag.events' own."""
    names = set().union(*(checks.logql_event_names(e) for _, e in _all_logql()))
    assert names
    assert names <= set(conndiag.events.EVENTS)
    ours = {v for k, v in vars(generate).items() if k.startswith("EV_")}
    assert ours <= set(conndiag.events.EVENTS)


def test_log_schema_matches_events_source(config: dict[str, Any]) -> None:
    """The documented field list is exactly what conndiag/events.py emits, plus the server
    facts (conndiag/serverfacts.py) and structlog's event/level/timestamp."""
    emitted = checks.events_source_fields(ROOT / "conndiag" / "events.py")
    assert set(config["log_fields"]["events"]) == emitted
    facts_source = (ROOT / "conndiag" / "serverfacts.py").read_text()
    for name in config["log_fields"]["server_facts"]:
        assert f'"{name}"' in facts_source
    assert config["log_fields"]["structlog"] == ["event", "level", "timestamp"]


# -- documentation ---------------------------------------------------------------------------


def test_docs_describe_every_panel(dashboards: dict[str, dict[str, Any]]) -> None:
    """docs/dashboards.md names every panel of every dashboard."""
    doc = (ROOT / "docs" / "dashboards.md").read_text()
    missing = [
        p["title"] for d in dashboards.values() for p in checks.panels(d) if p["title"] not in doc
    ]
    assert missing == []
