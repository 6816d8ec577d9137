"""``manage.py conndiag``: the doctor; ``manage.py conndiag connections``: the inspector.

For each database alias: the effective settings, the server facts (read on a connection of
its own, closed before returning), and what conndiag's system checks say; with
``--metrics-url``, the live picture from a running site's Prometheus metrics. Human-readable
by default, ``--json`` for machines.

``connections`` lists every database connection of every live process of this host, joined
with each server's own list (see :mod:`conndiag.inspector`): a table, or ``--json``. Exit
status 0 when nothing is flagged, 1 when a connection is flagged, 2 when a server's list
could not be read.

Doctor exit status: 0 nothing wrong; 1 warnings (a W check, or the metrics show errors, stale or
abandoned connections, refused queries); 2 errors (an E check, or the metrics could not be
read). Deploy gates can fail on any non-zero status, or on 2 only.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections import defaultdict
from typing import Any

from django.core.checks import CheckMessage
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from conndiag import checks, conf
from conndiag.state import conn_max_age_state

EXIT_OK, EXIT_WARNINGS, EXIT_ERRORS = 0, 1, 2
#: share of max_connections in use above which the live picture warns
CONNECTIONS_WARN_RATIO = 0.8


def _message(message: CheckMessage) -> dict[str, Any]:
    return {
        "id": message.id,
        "level": "error" if message.is_serious() else "warning",
        "message": message.msg,
        "hint": message.hint,
    }


def effective_config() -> dict[str, Any]:
    """The parsed ``CONNDIAG`` setting with every default filled in (the token never shown).

    Built from the setting's own key table, so a new key cannot be missing here.
    """
    config = conf.get_config()
    shown: dict[str, Any] = {}
    for key, (attr, _) in conf._KEYS.items():
        value = getattr(config, attr)
        if key == "METRICS_TOKEN":
            value = "(set)" if value else None
        elif key == "POLICY":
            value = dict(value)
        elif key == "METRICS_ALLOWED_IPS":
            value = [str(n) for n in value]
        shown[key] = value
    return shown


def database_settings(alias: str) -> dict[str, Any]:
    """What matters about one alias's connection settings (never the password)."""
    db = connections[alias]
    sd = db.settings_dict
    max_age = sd.get("CONN_MAX_AGE", 0)
    return {
        "engine": sd.get("ENGINE"),
        "vendor": db.vendor,
        "host": sd.get("HOST") or None,
        "port": sd.get("PORT") or None,
        "name": sd.get("NAME"),
        "conn_max_age": max_age,
        "conn_max_age_state": conn_max_age_state(max_age),
        "health_checks": bool(sd.get("CONN_HEALTH_CHECKS", False)),
        "init_command": (sd.get("OPTIONS") or {}).get("init_command"),
    }


# --- the live picture -------------------------------------------------------------------------


def fetch_metrics(url: str, token: str | None, timeout: float) -> str:
    request = urllib.request.Request(url)  # noqa: S310 - the operator's own URL
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return response.read().decode("utf-8")  # type: ignore[no-any-return]


def live_picture(text: str, now: float | None = None) -> dict[str, Any]:
    """Per alias, conndiag's metrics summed over processes and labels, plus findings."""
    from prometheus_client.parser import text_string_to_metric_families

    now = time.time() if now is None else now
    aliases: dict[str, dict[str, Any]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(float))
    )
    internal_errors = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if not name.startswith("conndiag_") or name.endswith("_created"):
                continue
            if name == "conndiag_internal_errors_total":
                internal_errors += value
                continue
            alias = labels.get("alias")
            if alias is None:
                continue
            picture = aliases[alias]
            if name == "conndiag_connections_open":
                picture["open"]["now"] += value
            elif name == "conndiag_connections_opened_total":
                picture["opened"][labels.get("context", "?")] += value
            elif name == "conndiag_connections_closed_total":
                picture["closed"][labels.get("reason", "?")] += value
            elif name == "conndiag_connection_errors_total":
                key = f"{labels.get('error_class', '?')}/{labels.get('code', '?')}"
                picture["errors"][key] += value
            elif name == "conndiag_connection_open_failures_total":
                picture["connect_failures"][labels.get("error_class", "?")] += value
            elif name == "conndiag_stale_connections_total":
                replaced = labels.get("replaced") == "true"
                picture["stale"]["replaced" if replaced else "not_replaced"] += value
            elif name == "conndiag_queries_total":
                picture["queries"][f"{labels.get('context', '?')}/{labels.get('action', '?')}"] += (
                    value
                )
            elif name == "conndiag_server_wait_timeout_seconds":
                picture["server"]["wait_timeout_s"] = value
            elif name == "conndiag_server_max_connections":
                picture["server"]["max_connections"] = max(
                    value, picture["server"].get("max_connections", 0)
                )
            elif name == "conndiag_oldest_connection_opened_timestamp_seconds" and math.isfinite(
                value
            ):
                oldest = picture["open"].get("oldest_age_s", 0.0)
                picture["open"]["oldest_age_s"] = max(oldest, now - value)
    result: dict[str, Any] = {
        alias: {section: dict(values) for section, values in picture.items()}
        for alias, picture in sorted(aliases.items())
    }
    return {
        "aliases": result,
        "internal_errors": internal_errors,
        "findings": findings(result, internal_errors),
    }


def findings(aliases: dict[str, dict[str, Any]], internal_errors: float) -> list[str]:
    """What in the live picture means something is wrong."""
    found: list[str] = []
    for alias, p in aliases.items():
        errors = sum(p.get("errors", {}).values())
        if errors:
            detail = ", ".join(f"{k}: {v:g}" for k, v in sorted(p["errors"].items()))
            found.append(f"{alias}: {errors:g} connection errors ({detail})")
        failures = sum(p.get("connect_failures", {}).values())
        if failures:
            found.append(f"{alias}: {failures:g} failed connects")
        stale = p.get("stale", {}).get("not_replaced", 0)
        if stale:
            found.append(f"{alias}: {stale:g} queries ran on stale connections (not replaced)")
        abandoned = p.get("closed", {}).get("abandoned", 0)
        if abandoned:
            found.append(
                f"{alias}: {abandoned:g} connections abandoned by threads that ended "
                "without closing them"
            )
        refused = sum(v for k, v in p.get("queries", {}).items() if k.endswith("/raised"))
        if refused:
            found.append(f"{alias}: {refused:g} queries refused by conndiag's policy")
        limit = p.get("server", {}).get("max_connections")
        open_now = p.get("open", {}).get("now", 0)
        if limit and open_now >= CONNECTIONS_WARN_RATIO * limit:
            found.append(f"{alias}: {open_now:g} connections open of max_connections={limit:g}")
    if internal_errors:
        found.append(f"{internal_errors:g} failures of conndiag's own code")
    return found


# --- the command ------------------------------------------------------------------------------


class Command(BaseCommand):
    help = (
        "Diagnose database connections: effective settings, server facts and conndiag's "
        "checks for each alias, and the live picture from a running site's metrics. Exit "
        "status: 0 fine, 1 warnings, 2 errors."
    )
    requires_system_checks: list[str] = []  # the doctor runs conndiag's checks itself

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "action",
            nargs="?",
            choices=["connections"],
            help="connections: list every connection of every live process of this host, "
            "joined with the servers' own lists (default: the doctor).",
        )
        parser.add_argument(
            "--database",
            action="append",
            dest="databases",
            metavar="ALIAS",
            help="An alias to examine (repeat for several; default: every alias).",
        )
        parser.add_argument(
            "--metrics-url",
            help="A running site's conndiag metrics URL, e.g. http://127.0.0.1:8000/metrics",
        )
        parser.add_argument(
            "--metrics-token",
            help="Bearer token for the metrics URL (default: CONNDIAG['METRICS_TOKEN']).",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=5.0,
            help="Seconds to wait for the metrics URL (default 5).",
        )
        parser.add_argument("--json", action="store_true", help="Print one JSON document.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options.get("action") == "connections":
            self.handle_connections(options)
            return
        report = self.build_report(options)
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2, sort_keys=True, default=str))
        else:
            self.print_human(report)
        code = report["exit_status"]
        if code != EXIT_OK:
            msg = (
                f"conndiag found {report['summary']['errors']} error(s) and "
                f"{report['summary']['warnings']} warning(s)."
            )
            raise CommandError(msg, returncode=code)

    def handle_connections(self, options: dict[str, Any]) -> None:
        from conndiag import inspector

        aliases = self.aliases(options)
        report = inspector.inspect(aliases)
        failed = [a for a, r in report["aliases"].items() if r["server"]["error"]]
        code = EXIT_ERRORS if failed else EXIT_WARNINGS if report["flagged"] else EXIT_OK
        report["exit_status"] = code
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2, sort_keys=True, default=str))
        else:
            self.print_connections(report, inspector.display_rows(report))
        if code != EXIT_OK:
            msg = f"{report['flagged']} connection(s) flagged" + (
                f"; could not read the server's connections of {', '.join(failed)}"
                if failed
                else ""
            )
            raise CommandError(msg, returncode=code)

    def aliases(self, options: dict[str, Any]) -> list[str]:
        aliases: list[str] = options.get("databases") or list(connections)
        unknown = [a for a in aliases if a not in connections]
        if unknown:
            msg = f"Unknown database alias(es): {', '.join(unknown)}."
            raise CommandError(msg)
        return aliases

    def print_connections(self, report: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        w = self.stdout.write
        columns = [
            ("alias", "ALIAS"),
            ("server_id", "ID"),
            ("client", "CLIENT"),
            ("owner", "OWNER (pid/thread)"),
            ("age", "AGE"),
            ("idle", "IDLE"),
            ("wait_timeout", "WAIT_TIMEOUT"),
            ("conn_max_age", "MAX_AGE"),
            ("queries", "QUERIES"),
            ("request", "REQUEST"),
            ("state", "STATE"),
        ]
        processes = report["processes"]
        w(
            f"{len(processes)} live process(es) on {report['host']} publish to "
            f"{report['directory']}"
            + ("" if report["publishing"] else " (this process does not: INSPECTOR is False)")
        )
        for alias, alias_report in report["aliases"].items():
            server = alias_report["server"]
            if server["error"]:
                w(self.style.ERROR(f"{alias}: the server's list failed: {server['error']}"))
            elif not server["available"]:
                w(f"{alias}: {alias_report['vendor']} has no server-side list; published only")
        table = [[label for _, label in columns] + ["FLAGS"]]
        for row in rows:
            table.append([str(row[key]) for key, _ in columns] + [" ".join(row["flags"]) or "-"])
        widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
        for n, line in enumerate(table):
            text = "  ".join(
                cell.ljust(width) for cell, width in zip(line, widths, strict=True)
            ).rstrip()
            if n and rows[n - 1]["flags"]:
                text = self.style.WARNING(text)
            w(text)
        if not rows:
            w("(no connections)")
        counts = report["flag_counts"]
        w("")
        if counts:
            w(
                self.style.WARNING(
                    f"{report['flagged']} flagged: "
                    + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                )
            )
        else:
            w(self.style.SUCCESS(f"{len(rows)} connection(s), nothing flagged"))

    # -- building ----------------------------------------------------------------------------

    def build_report(self, options: dict[str, Any]) -> dict[str, Any]:
        aliases = self.aliases(options)
        static: list[CheckMessage] = []
        for check in checks.STATIC_CHECKS:
            static.extend(check())
        config_error = any(m.id == "conndiag.E001" for m in static)
        report: dict[str, Any] = {
            "conndiag": None if config_error else effective_config(),
            "checks": [_message(m) for m in static],
            "databases": {},
            "metrics": None,
        }
        everything = list(static)
        for alias in aliases:
            facts, messages = checks.database_report(alias)
            everything.extend(messages)
            report["databases"][alias] = {
                "settings": database_settings(alias),
                "server": facts,
                "checks": [_message(m) for m in messages],
            }
        metrics_findings: list[str] = []
        metrics_failed = False
        url = options.get("metrics_url")
        if url:
            token = options.get("metrics_token")
            if token is None and not config_error:
                token = conf.get_config().metrics_token
            try:
                picture = live_picture(fetch_metrics(url, token, options["timeout"]))
            except (OSError, ValueError, urllib.error.URLError) as exc:
                metrics_failed = True
                report["metrics"] = {"url": url, "error": f"{type(exc).__name__}: {exc}"}
            else:
                metrics_findings = picture["findings"]
                report["metrics"] = {"url": url, **picture}
        errors = sum(1 for m in everything if m.is_serious()) + int(metrics_failed)
        warnings = sum(1 for m in everything if not m.is_serious()) + len(metrics_findings)
        report["summary"] = {"errors": errors, "warnings": warnings}
        report["exit_status"] = EXIT_ERRORS if errors else EXIT_WARNINGS if warnings else EXIT_OK
        return report

    # -- printing ----------------------------------------------------------------------------

    def print_human(self, report: dict[str, Any]) -> None:
        w = self.stdout.write
        style = self.style

        def messages(items: list[dict[str, Any]], indent: str) -> None:
            for m in items:
                paint = style.ERROR if m["level"] == "error" else style.WARNING
                w(indent + paint(f"{m['id']}: {m['message']}"))
                if m["hint"]:
                    w(f"{indent}  HINT: {m['hint']}")

        w(style.MIGRATE_HEADING("conndiag settings"))
        if report["conndiag"] is None:
            w("  (invalid: see conndiag.E001 below)")
        else:
            for key, value in report["conndiag"].items():
                w(f"  {key}: {value}")
        w(style.MIGRATE_HEADING("Checks"))
        if report["checks"]:
            messages(report["checks"], "  ")
        else:
            w("  " + style.SUCCESS("no problem found"))
        for alias, db in report["databases"].items():
            s = db["settings"]
            w(style.MIGRATE_HEADING(f"Database {alias!r} ({s['vendor']})"))
            where = f"{s['host'] or 'local'}:{s['port'] or 'default'}/{s['name']}"
            w(f"  server: {where}")
            w(
                f"  CONN_MAX_AGE: {s['conn_max_age']} ({s['conn_max_age_state']}), "
                f"health checks: {'on' if s['health_checks'] else 'off'}"
            )
            if s["init_command"]:
                w(f"  init_command: {s['init_command']}")
            facts = db["server"]
            if facts:
                w("  server facts: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
            elif s["vendor"] not in ("mysql", "postgresql"):
                w("  server facts: none (no server-side idle timeout)")
            if db["checks"]:
                messages(db["checks"], "  ")
            else:
                w("  " + style.SUCCESS("no problem found"))
        metrics = report["metrics"]
        if metrics is not None:
            w(style.MIGRATE_HEADING(f"Live picture ({metrics['url']})"))
            if "error" in metrics:
                w("  " + style.ERROR(f"could not read the metrics: {metrics['error']}"))
            else:
                for alias, picture in metrics["aliases"].items():
                    w(f"  {alias}:")
                    for section, values in picture.items():
                        shown = ", ".join(f"{k}={v:g}" for k, v in sorted(values.items()))
                        w(f"    {section}: {shown}")
                for finding in metrics["findings"]:
                    w("  " + style.WARNING(finding))
                if not metrics["findings"]:
                    w("  " + style.SUCCESS("nothing wrong in the metrics"))
        summary = report["summary"]
        w("")
        line = f"{summary['errors']} error(s), {summary['warnings']} warning(s)"
        w(style.SUCCESS(line) if report["exit_status"] == EXIT_OK else style.WARNING(line))
