"""The data cockpit (数据驾驶舱), deploy/k8s/base/grafana/rgw-cockpit.json: valid Grafana JSON whose every query
reads only contract metrics and the SLO recording rules, never groups by an unbounded label, and parses as PromQL
(promtool). Fast: no servers."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.metric_names import (
    CONTRACT_METRICS,
    DASHBOARD_PATH,
    SYNTHETIC_SERIES,
    dashboard_exprs,
    dashboard_metric_names,
    iter_panels,
    load_dashboard,
    metric_names_in_expr,
    recorded_names,
)

# Labels whose values are unbounded (or per customer): grouping by them would make one series per code, till...
UNBOUNDED_LABELS = frozenset(
    {
        "code",
        "code_ref",
        "terminal",
        "terminal_id",
        "store",
        "store_id",
        "key",
        "key_id",
        "api_key",
        "campaign",
        "campaign_id",
        "client",
        "client_id",
        "device",
        "customer_device_id",
        "redemption_id",
        "idempotency_key",
        "batch_id",
    }
)
# Panels the cockpit must have: each tuple's words, all found in one panel title (case-insensitive).
REQUIRED_PANELS = (
    ("redemptions/s", "outcome"),
    ("latency", "p50", "p95", "p99"),
    ("error ratio", "faults"),
    ("error budget left",),
    ("declines", "reason"),
    ("risk denials", "reason"),
    ("shadow",),
    ("lockouts",),
    ("outbox backlog",),
    ("oldest outbox entry",),
    ("writer throughput",),
    ("batch latency",),
    ("dead letters", "double spends"),
    ("auth failures",),
    ("redis script latency",),
    ("dependency up",),
    ("build info",),
)
GRAFANA_SUBSTITUTES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h", "$namespace": ".*"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in iter_panels(dashboard) if p.get("type") != "row"]


def test_the_dashboard_is_grafana_json(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] == "rgw-cockpit"
    assert dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in iter_panels(dashboard)]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids))


def test_every_panel_has_a_title_a_place_and_queries(dashboard: dict[str, Any]) -> None:
    for panel in iter_panels(dashboard):
        assert panel["title"].strip(), panel["id"]
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
    for panel in _panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in targets:
            assert target["refId"] and str(target["expr"]).strip(), panel["title"]


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in iter_panels(dashboard):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, (panel["title"], taken.get((x, y)))
                taken[(x, y)] = panel["title"]


def test_required_panels_are_present(dashboard: dict[str, Any]) -> None:
    titles = [p["title"].lower() for p in _panels(dashboard)]
    for words in REQUIRED_PANELS:
        assert any(all(w in title for w in words) for title in titles), words


def test_queries_read_only_contract_metrics_and_recorded_slo_series(dashboard: dict[str, Any]) -> None:
    assert dashboard_metric_names() <= CONTRACT_METRICS, dashboard_metric_names() - CONTRACT_METRICS
    recorded = recorded_names()
    for expr in dashboard_exprs(dashboard):
        for name in metric_names_in_expr(expr):
            assert name in CONTRACT_METRICS or name in recorded or name in SYNTHETIC_SERIES, (name, expr)


def test_the_slo_panels_read_the_recording_rules(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(dashboard_exprs(dashboard))
    assert "slo:period_error_budget_remaining:ratio" in exprs
    assert "slo:sli_error:ratio_rate5m" in exprs


def _grouping_labels(expr: str) -> set[str]:
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    labels: set[str] = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", text):
        labels |= {label.strip() for label in clause.split(",") if label.strip()}
    return labels


def test_grouping_labels_parser() -> None:
    expr = 'sum by (le, grpc_method) (x) / on(job) group_left(version) y{a="by (code)"} without (instance)'
    assert _grouping_labels(expr) == {"le", "grpc_method", "job", "version", "instance"}


def test_no_query_groups_by_an_unbounded_label(dashboard: dict[str, Any]) -> None:
    for expr in dashboard_exprs(dashboard):
        assert _grouping_labels(expr).isdisjoint(UNBOUNDED_LABELS), expr
    for panel in _panels(dashboard):
        for target in panel["targets"]:
            legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert legend_labels.isdisjoint(UNBOUNDED_LABELS), (panel["title"], target["legendFormat"])


def test_every_query_is_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses each query (Grafana's variables replaced by values), as a recording rule."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: scripts/system_deps.sh installs it (Debian package prometheus)")
    rules = []
    for index, expr in enumerate(dashboard_exprs(dashboard)):
        for variable, value in GRAFANA_SUBSTITUTES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{index}:check", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_path_is_the_one_kustomize_packages() -> None:
    kustomization = yaml.safe_load((DASHBOARD_PATH.parents[1] / "kustomization.yaml").read_text())
    files = [f for generator in kustomization.get("configMapGenerator", []) for f in generator.get("files", [])]
    assert "grafana/rgw-cockpit.json" in files
