"""The Prometheus and Loki alert rules: valid, complete, documented, and unit-tested.

``promtool check rules`` validates the Prometheus rule file and ``promtool test rules`` runs
the generated unit tests, in which every alert has a case that fires it and a case that keeps
it quiet. promtool missing fails the test under ``CI=true`` and skips it elsewhere.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards import checks, generate
from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"
PROM_DIR = DASHBOARDS / "prometheus"
SEVERITIES = {"critical", "warning", "info"}


def _promtool() -> str:
    return require_tool("promtool", "prometheus")


def _alerts(path: str) -> list[dict[str, Any]]:
    return [r for r in checks.rules(path) if "alert" in r]


def _runbook_anchors() -> set[str]:
    """GitHub-style anchors of the runbook's headings."""
    text = (ROOT / "docs" / "runbook.md").read_text()
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+)$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_promtool_check_rules() -> None:
    """promtool accepts the Prometheus rule file (syntax, PromQL, templates)."""
    result = subprocess.run(
        [_promtool(), "check", "rules", str(PROM_DIR / "conndiag-rules.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules() -> None:
    """Every promtool unit test passes: each alert fires on its firing input and stays
    quiet on its quiet input, with the expected labels and annotations."""
    files = sorted(PROM_DIR.glob("tests/*.yml"))
    result = subprocess.run(
        [_promtool(), "test", "rules", *map(str, files)],
        cwd=PROM_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(files)


def test_promtool_test_rules_detects_a_wrong_expectation(tmp_path: Path) -> None:
    """The unit tests are not vacuous: a test expecting silence where the alert fires fails."""
    source = yaml.safe_load((PROM_DIR / "tests" / "ConnDiagDetachedQueries.yml").read_text())
    source["rule_files"] = [str(PROM_DIR / "conndiag-rules.yml")]
    source["tests"] = source["tests"][:1]
    source["tests"][0]["alert_rule_test"][0]["exp_alerts"] = []
    path = tmp_path / "wrong.yml"
    path.write_text(yaml.safe_dump(source))
    result = subprocess.run(
        [_promtool(), "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0


def test_every_alert_has_firing_and_quiet_tests() -> None:
    """Each Prometheus alert has its own test file with at least one case expecting it to
    fire and one expecting no alert."""
    for alert in _alerts(generate.PROM_RULES):
        path = PROM_DIR / "tests" / f"{alert['alert']}.yml"
        data = yaml.safe_load(path.read_text())
        cases = [t for test in data["tests"] for t in test["alert_rule_test"]]
        assert all(c["alertname"] == alert["alert"] for c in cases)
        assert any(c["exp_alerts"] for c in cases), alert["alert"]
        assert any(not c["exp_alerts"] for c in cases), alert["alert"]


@pytest.mark.parametrize("path", [generate.PROM_RULES, generate.LOKI_RULES])
def test_alerts_are_complete(path: str) -> None:
    """Every alert has for:, a known severity, a summary, a description and a runbook_url
    whose anchor is a section of docs/runbook.md."""
    anchors = _runbook_anchors()
    alerts = _alerts(path)
    assert len(alerts) >= 7
    for alert in alerts:
        assert re.fullmatch(r"\d+[smh]", alert["for"]), alert["alert"]
        assert alert["labels"]["severity"] in SEVERITIES
        annotations = alert["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}
        assert annotations["summary"] and len(annotations["description"]) > 40
        base, anchor = annotations["runbook_url"].split("#")
        assert base == generate.load_config()["runbook_base_url"]
        assert anchor == alert["alert"].lower()
        assert anchor in anchors, f"docs/runbook.md has no section {alert['alert']}"


def test_alert_names_are_unique() -> None:
    """No alert name is used twice across the Prometheus and Loki rule files."""
    names = [a["alert"] for p in (generate.PROM_RULES, generate.LOKI_RULES) for a in _alerts(p)]
    assert len(names) == len(set(names))


def test_issue_failure_modes_are_covered() -> None:
    """The failure modes issue #6 lists each have a Prometheus alert and a Loki alert."""
    prom = {a["alert"] for a in _alerts(generate.PROM_RULES)}
    loki = {a["alert"] for a in _alerts(generate.LOKI_RULES)}
    assert {
        "ConnDiagConnectionLost",
        "ConnDiagConnectFailures",
        "ConnDiagDetachedQueries",
        "ConnDiagForkedConnection",
        "ConnDiagConnMaxAgeAboveWaitTimeout",
        "ConnDiagIdleNearWaitTimeout",
        "ConnDiagConnectionChurn",
        "ConnDiagNearMaxConnections",
    } == prom
    assert {
        "ConnDiagLogConnectionLost",
        "ConnDiagLogConnectFailures",
        "ConnDiagLogDetachedQueries",
        "ConnDiagLogForkedConnection",
        "ConnDiagLogStaleConnections",
        "ConnDiagLogPersistentConnections",
        "ConnDiagLogConnectionChurn",
        "ConnDiagLogTooManyConnections",
    } == loki


def test_docs_describe_every_alert() -> None:
    """docs/dashboards.md names every alert of both rule files."""
    doc = (ROOT / "docs" / "dashboards.md").read_text()
    names = [a["alert"] for p in (generate.PROM_RULES, generate.LOKI_RULES) for a in _alerts(p)]
    assert [n for n in names if n not in doc] == []


def test_recording_rules_follow_naming_convention() -> None:
    """Recording rules are named level:metric:operation and aggregate by their level."""
    for rule in checks.rules(generate.PROM_RULES):
        if "record" not in rule:
            continue
        level, _, _ = rule["record"].split(":")
        assert f"by ({', '.join(level.split('_'))})" in rule["expr"], rule["record"]
