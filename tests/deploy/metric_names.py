"""The metric names the alerts (deploy/k8s/base/prometheusrule.yaml) and the data cockpit
(deploy/k8s/base/grafana/rgw-cockpit.json) read, as Prometheus scrapes them (`_total`, `_bucket`, `_count`, `_sum`
included), and the names the operations contract fixes.

`alert_metric_names()` and `dashboard_metric_names()` are compared with a live scrape elsewhere: every name they
return must be one a process exports. Left out: names the rules record themselves (`slo:*`, `sloth_slo_info`),
series Prometheus makes itself (`up`, `scrape_*`, `ALERTS`), PromQL functions, aggregations, keywords and label
names. The PromQL is read by a small scanner rather than a parser: strings, comments, label matchers `{...}`,
ranges and subqueries `[...]`, grouping clauses `by (...)`, `without (...)`, `on (...)`, `ignoring (...)`,
`group_left (...)`, `group_right (...)` and Grafana variables are taken out first; what is left are names,
numbers, operators and parentheses, and a name followed by `(` is a function.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES_PATH = ROOT / "deploy" / "k8s" / "base" / "prometheusrule.yaml"
DASHBOARD_PATH = ROOT / "deploy" / "k8s" / "base" / "grafana" / "rgw-cockpit.json"

# The operations contract (issue 10), histograms expanded into their series.
_HISTOGRAMS = (
    "grpc_server_handling_seconds",
    "rgw_redis_script_seconds",
    "rgw_ledger_batch_rows",
    "rgw_ledger_batch_seconds",
)
GATEWAY_METRICS: frozenset[str] = frozenset(
    {
        "grpc_server_started_total",
        "grpc_server_handled_total",
        "grpc_server_msg_received_total",
        "grpc_server_msg_sent_total",
        "rgw_redemption_outcomes_total",
        "rgw_stream_item_errors_total",
        "rgw_risk_decisions_total",
        "rgw_auth_failures_total",
        "rgw_dependency_up",
        "rgw_build_info",
        "rgw_redis_durability_info",
        *(f"{h}_{suffix}" for h in _HISTOGRAMS[:2] for suffix in ("bucket", "sum", "count")),
    }
)
WRITER_METRICS: frozenset[str] = frozenset(
    {
        "rgw_ledger_rows_written_total",
        "rgw_ledger_risk_events_written_total",
        "rgw_ledger_duplicates_total",
        "rgw_ledger_double_spend_alarms_total",
        "rgw_ledger_reversal_alarms_total",
        "rgw_ledger_reversals_written_total",
        "rgw_ledger_inventory_events_written_total",
        "rgw_ledger_dispenses_written_total",
        "rgw_ledger_dispense_alarms_total",
        "rgw_inventory_available",
        "rgw_inventory_low",
        "rgw_inventory_stock_refreshed_timestamp_seconds",
        "rgw_ledger_dead_letters_total",
        "rgw_ledger_write_retries_total",
        "rgw_ledger_reclaimed_entries_total",
        "rgw_ledger_postgres_up",
        "rgw_ledger_last_progress_timestamp_seconds",
        "rgw_outbox_entries",
        "rgw_outbox_oldest_entry_age_seconds",
        "rgw_dependency_up",
        "rgw_build_info",
        *(f"{h}_{suffix}" for h in _HISTOGRAMS[2:] for suffix in ("bucket", "sum", "count")),
    }
)
PROCESS_METRICS: frozenset[str] = frozenset(
    {
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "python_gc_collections_total",
        "python_info",
    }
)
CONTRACT_METRICS: frozenset[str] = GATEWAY_METRICS | WRITER_METRICS | PROCESS_METRICS

# Series Prometheus itself makes (per target, or for alerts): never scraped from a process.
SYNTHETIC_SERIES: frozenset[str] = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
        "ALERTS",
        "ALERTS_FOR_STATE",
    }
)
# Words that are operators or modifiers, not names (PromQL keywords are case-insensitive).
_KEYWORDS = frozenset(
    {"and", "or", "unless", "atan2", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
)
_LITERALS = frozenset({"inf", "nan"})

_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\[\[[^\]]*\]\]|\$[A-Za-z_]\w*")
_NAME_EQUALS = re.compile(r"__name__\s*=\s*(\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`)")
_TOKEN = re.compile(
    r"(?P<number>[0-9][0-9A-Za-z_.]*|\.[0-9][0-9A-Za-z_.]*)|(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<other>\S)"
)


def _strip_strings_and_comments(expr: str) -> str:
    """The expression with every string literal replaced by "" and every # comment removed."""
    out: list[str] = []
    i, n = 0, len(expr)
    while i < n:
        ch = expr[i]
        if ch in "\"'`":
            j = i + 1
            while j < n and expr[j] != ch:
                j += 2 if ch != "`" and expr[j] == "\\" else 1
            out.append('""')
            i = j + 1
        elif ch == "#":
            while i < n and expr[i] != "\n":
                i += 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _remove_bracketed(text: str, opening: str, closing: str) -> str:
    """Text without any opening...closing block (strings are gone, so these never nest)."""
    return re.sub(re.escape(opening) + r"[^" + re.escape(closing) + r"]*" + re.escape(closing), " ", text)


def metric_names_in_expr(expr: str) -> set[str]:
    """Every metric (series) name a PromQL expression selects, recording-rule names included."""
    names: set[str] = set()
    for quoted in _NAME_EQUALS.findall(expr):
        names.add(quoted[1:-1])
    text = _strip_strings_and_comments(expr)
    text = _GRAFANA_VARIABLE.sub(" ", text)
    text = _remove_bracketed(text, "{", "}")
    text = _remove_bracketed(text, "[", "]")
    previous = None
    while previous != text:  # nested parentheses never occur inside a grouping clause, but be safe
        previous, text = text, _GROUPING.sub(" ", text)
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(text)]
    for index, (kind, value) in enumerate(tokens):
        if kind != "name":
            continue
        if value.lower() in _KEYWORDS or value.lower() in _LITERALS:
            continue
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if following == "(":
            continue  # a function or an aggregation
        names.add(value)
    return names


def load_rule(path: Path = RULES_PATH) -> dict[str, Any]:
    """The PrometheusRule document."""
    with path.open(encoding="utf-8") as f:
        doc: dict[str, Any] = yaml.safe_load(f)
    return doc


def rule_groups(path: Path = RULES_PATH) -> list[dict[str, Any]]:
    """spec.groups of the PrometheusRule: what promtool reads as `groups:`."""
    groups: list[dict[str, Any]] = load_rule(path)["spec"]["groups"]
    return groups


def iter_rules(path: Path = RULES_PATH) -> Iterator[dict[str, Any]]:
    """Every rule (recording and alerting) of the PrometheusRule."""
    for group in rule_groups(path):
        yield from group["rules"]


def recorded_names(path: Path = RULES_PATH) -> set[str]:
    """The series the recording rules make."""
    return {rule["record"] for rule in iter_rules(path) if "record" in rule}


def _scraped(names: Iterable[str], recorded: set[str]) -> set[str]:
    return {name for name in names if name not in recorded and name not in SYNTHETIC_SERIES}


def alert_metric_names(path: Path = RULES_PATH) -> set[str]:
    """Scraped metric names every rule of the PrometheusRule reads."""
    names: set[str] = set()
    for rule in iter_rules(path):
        names |= metric_names_in_expr(str(rule["expr"]))
    return _scraped(names, recorded_names(path))


def load_dashboard(path: Path = DASHBOARD_PATH) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        doc: dict[str, Any] = json.load(f)
    return doc


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' collapsed children included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and the templating variables' queries."""
    exprs = [str(t["expr"]) for p in iter_panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        exprs.extend(_variable_exprs(text))
    return exprs


def _variable_exprs(query: str) -> list[str]:
    """The PromQL inside a Grafana Prometheus variable query (label_values(expr, label), query_result(expr))."""
    query = query.strip()
    match = re.fullmatch(r"label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)", query, re.S)
    if match:
        return [match.group(1)]
    if re.fullmatch(r"label_values\(\s*[A-Za-z_][A-Za-z0-9_]*\s*\)|label_names\(\s*\)|metrics\(.*\)", query, re.S):
        return []
    match = re.fullmatch(r"query_result\((.*)\)", query, re.S)
    if match:
        return [match.group(1)]
    return [query] if query else []


def dashboard_metric_names(path: Path = DASHBOARD_PATH, rules_path: Path = RULES_PATH) -> set[str]:
    """Scraped metric names the data cockpit reads (the SLO series it reads come from the recording rules)."""
    names: set[str] = set()
    for expr in dashboard_exprs(load_dashboard(path)):
        names |= metric_names_in_expr(expr)
    return _scraped(names, recorded_names(rules_path))
