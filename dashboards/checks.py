"""Helpers the dashboard and rule tests share: collect expressions, parse them, list names.

Kept beside the generator (not in the library) because they exist only to check the
generated files: PromQL is parsed by the real ``promtool``, LogQL by Grafana's own grammar
(``@grafana/lezer-logql``, run by ``logql/check.cjs`` under node).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
LOGQL_DIR = HERE / "logql"

#: what Grafana substitutes for the dashboards' variables, for parsing and evaluation
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__auto": "1m",
    "$__interval": "1m",
    "$job": ".*",
    "$instance": ".*",
    "$alias": ".*",
}

PROMQL_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "atan2",
        "inf",
        "nan",
    }
)
#: PromQL functions and aggregations the generated expressions may use
PROMQL_FUNCTIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "rate",
        "irate",
        "increase",
        "histogram_quantile",
        "time",
        "clamp_min",
        "topk",
        "bottomk",
        "absent",
        "vector",
        "label_values",
    }
)


def substitute(expr: str) -> str:
    """``expr`` with Grafana's variables replaced the way the e2e test and parsers need."""
    for var, value in sorted(GRAFANA_SUBSTITUTIONS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    return expr


# -- collecting expressions -----------------------------------------------------------------


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted((HERE / "grafana").glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included, rows themselves excluded."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def datasource_kind(dashboard: dict[str, Any]) -> str:
    for var in dashboard["templating"]["list"]:
        if var["type"] == "datasource":
            return str(var["query"])
    msg = f"dashboard {dashboard['title']!r} has no datasource variable"
    raise LookupError(msg)


def dashboard_exprs(kind: str) -> list[tuple[str, str]]:
    """``(where, expr)`` of every target of every ``kind`` (prometheus|loki) dashboard."""
    found = []
    for name, dash in dashboards().items():
        if datasource_kind(dash) != kind:
            continue
        for panel in panels(dash):
            for target in panel.get("targets", []):
                found.append((f"{name}: {panel['title']} [{target['refId']}]", target["expr"]))
    return found


def rule_file(path: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((HERE / path).read_text())
    return data


def rules(path: str) -> list[dict[str, Any]]:
    return [rule for group in rule_file(path)["groups"] for rule in group["rules"]]


def rule_exprs(path: str) -> list[tuple[str, str]]:
    return [(rule.get("alert") or rule["record"], rule["expr"]) for rule in rules(path)]


# -- PromQL ---------------------------------------------------------------------------------


def promtool() -> str | None:
    return shutil.which("promtool")


def promql_parse_errors(exprs: list[tuple[str, str]], promtool_path: str) -> list[str]:
    """Parse every expression with ``promtool check rules`` (one group per expression)."""
    groups = [
        {
            "name": f"expr-{i}",
            "rules": [{"record": f"conndiag_check:expr_{i}", "expr": substitute(expr)}],
        }
        for i, (_, expr) in enumerate(exprs)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "exprs.yml"
        path.write_text(yaml.safe_dump({"groups": groups}))
        result = subprocess.run(
            [promtool_path, "check", "rules", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    if result.returncode == 0:
        return []
    output = result.stdout + result.stderr
    errors = []
    for i, (where, expr) in enumerate(exprs):
        if re.search(rf'group "expr-{i}"|expr_{i}\b', output):
            errors.append(f"{where}: {expr}")
    return errors or [output]


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACES = re.compile(r"\{[^{}]*\}")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (a small lexer: strings, matchers, groupings,
    ranges and durations removed; what remains that is not a keyword or a function call
    is a metric name)."""
    text = _STRING.sub('""', substitute(expr))
    text = _BRACES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _RANGE.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group(0)
        rest = text[match.end() :].lstrip()
        before = text[: match.start()]
        if rest.startswith("(") or word.lower() in PROMQL_KEYWORDS:
            continue
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue  # part of a number such as 1e3
        names.add(word)
    return names


_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^{}]*\})?")


def promql_selectors(expr: str) -> list[tuple[str, str]]:
    """``(metric, matchers)`` of every vector selector in ``expr``."""
    names = promql_metric_names(expr)
    text = _STRING.sub(lambda m: m.group(0).replace("{", "(").replace("}", ")"), expr)
    found = []
    for match in _SELECTOR.finditer(text):
        if match.group(1) in names:
            found.append((match.group(1), match.group(2) or ""))
    return found


def promql_grouping_labels(expr: str) -> set[str]:
    labels = set()
    for match in _GROUPING.finditer(_STRING.sub('""', expr)):
        inner = match.group(0)[match.group(0).index("(") + 1 : -1]
        labels.update(label.strip() for label in inner.split(",") if label.strip())
    return labels


# -- conndiag's exported metrics ------------------------------------------------------------


def exported_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every series name conndiag exports -> (type, label names), from conndiag.metrics
    built on a fresh registry (counters' ``_total``, histograms' ``_bucket``/``_sum``/
    ``_count``)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    from conndiag.metrics import build_metrics

    metrics = build_metrics(CollectorRegistry())
    exported: dict[str, tuple[str, tuple[str, ...]]] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        name, kind, labels = value._name, value._type, tuple(value._labelnames)
        if kind == "counter":
            exported[f"{name}_total"] = (kind, labels)
        elif kind == "histogram":
            exported[f"{name}_bucket"] = (kind, (*labels, "le"))
            exported[f"{name}_sum"] = (kind, labels)
            exported[f"{name}_count"] = (kind, labels)
        else:
            exported[name] = (kind, labels)
    return exported


# -- LogQL ----------------------------------------------------------------------------------


def node() -> str | None:
    return shutil.which("node")


def ensure_logql_parser(npm: str | None = None) -> None:
    """``npm ci`` in dashboards/logql when its node_modules is missing."""
    if (LOGQL_DIR / "node_modules" / "@grafana" / "lezer-logql").is_dir():
        return
    npm = npm or shutil.which("npm")
    if npm is None:
        msg = "npm is needed to install @grafana/lezer-logql (dashboards/logql)"
        raise RuntimeError(msg)
    subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=LOGQL_DIR,
        check=True,
        capture_output=True,
        timeout=300,
        env={**os.environ, "CI": "true"},
    )


def logql_check(exprs: list[str], node_path: str) -> list[dict[str, Any]]:
    """Parse each expression with @grafana/lezer-logql: errors and identifiers."""
    result = subprocess.run(
        [node_path, str(LOGQL_DIR / "check.cjs")],
        input=json.dumps([substitute(e) for e in exprs]),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    parsed: list[dict[str, Any]] = json.loads(result.stdout)
    return parsed


_TEMPLATE_FIELD = re.compile(r"\{\{\s*\.([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


def logql_template_fields(expr: str) -> set[str]:
    """Field names used in ``line_format``/``label_format`` templates (``{{.field}}``)."""
    return set(_TEMPLATE_FIELD.findall(expr))


_EVENT_VALUE = re.compile(r'\bevent=~?"([^"]*)"')


def logql_event_names(expr: str) -> set[str]:
    names = set()
    for match in _EVENT_VALUE.finditer(expr):
        names.update(match.group(1).split("|"))
    return names


# -- conndiag's log schema ------------------------------------------------------------------


def events_source_fields(path: Path) -> set[str]:
    """Field names conndiag/events.py can emit: keys of the field dicts it builds and the
    keyword arguments of its ``_log`` calls."""
    tree = ast.parse(path.read_text())
    fields: set[str] = set()
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    for node_ in (n for f in functions for n in ast.walk(f)):
        if isinstance(node_, ast.Dict):
            fields.update(
                k.value
                for k in node_.keys
                if isinstance(k, ast.Constant) and isinstance(k.value, str)
            )
        elif (
            isinstance(node_, ast.Subscript)
            and isinstance(node_.value, ast.Name)
            and node_.value.id == "fields"
            and isinstance(node_.slice, ast.Constant)
        ):
            fields.add(node_.slice.value)
        elif (
            isinstance(node_, ast.Call)
            and isinstance(node_.func, ast.Attribute)
            and node_.func.attr == "_log"
        ):
            fields.update(kw.arg for kw in node_.keywords if kw.arg is not None)
    return fields
