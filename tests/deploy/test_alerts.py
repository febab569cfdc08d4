"""The PrometheusRule (deploy/k8s/base/prometheusrule.yaml): promtool accepts it, its unit tests pass
(deploy/prometheus-tests/), every alert is labelled, annotated and linked to its runbook section, and every name it
reads is a contract metric or one of its own recording rules. Fast: promtool only, no servers."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.metric_names import (
    CONTRACT_METRICS,
    ROOT,
    SYNTHETIC_SERIES,
    alert_metric_names,
    iter_rules,
    load_rule,
    metric_names_in_expr,
    recorded_names,
    rule_groups,
)

UNIT_TESTS_DIR = ROOT / "deploy" / "prometheus-tests"
RUNBOOK = ROOT / "deploy" / "RUNBOOK.md"
RUNBOOK_URL = "https://github.com/rgw/redemption-gateway/blob/main/deploy/RUNBOOK.md"
UNIT_TEST_FILES = sorted(UNIT_TESTS_DIR.glob("*_test.yaml"))
SEVERITIES = {"page", "ticket"}
SLOS = ("availability", "latency")
SLOTH_RECORDS = (
    *(f"slo:sli_error:ratio_rate{w}" for w in ("5m", "30m", "1h", "2h", "6h", "1d", "3d")),
    "slo:objective:ratio",
    "slo:error_budget:ratio",
    "slo:time_period:days",
    "slo:current_burn_rate:ratio",
    "slo:period_burn_rate:ratio",
    "slo:period_error_budget_remaining:ratio",
)


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in iter_rules() if "alert" in rule]


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: scripts/system_deps.sh installs it (Debian package prometheus)")
    return path


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with rules.yaml (spec.groups of the PrometheusRule, as promtool reads rule files) and a copy of
    every unit-test file, whose rule_files name rules.yaml."""
    directory = tmp_path_factory.mktemp("promrules")
    (directory / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    for path in UNIT_TEST_FILES:
        shutil.copy(path, directory / path.name)
    return directory


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def unit_test_results(rules_dir: Path) -> dict[str, tuple[int, str]]:
    """`promtool test rules` of every unit-test file, run side by side (each takes seconds)."""
    promtool = _promtool()
    running = {
        path.name: subprocess.Popen(
            [promtool, "test", "rules", path.name],
            cwd=rules_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for path in UNIT_TEST_FILES
    }
    results = {}
    for name, process in running.items():
        output, _ = process.communicate(timeout=300)
        results[name] = (process.returncode, output)
    return results


def test_the_rule_is_a_prometheus_operator_rule() -> None:
    doc = load_rule()
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"] == "rgw-alerts"
    assert doc["metadata"]["labels"]["prometheus"] == "k8s"
    assert doc["metadata"]["labels"]["role"] == "alert-rules"


def test_promtool_check_rules(rules_dir: Path) -> None:
    result = _run("check", "rules", "--lint=all", "--lint-fatal", "rules.yaml", cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("test_file", UNIT_TEST_FILES, ids=[p.name for p in UNIT_TEST_FILES])
def test_promtool_unit_tests(unit_test_results: dict[str, tuple[int, str]], test_file: Path) -> None:
    returncode, output = unit_test_results[test_file.name]
    assert returncode == 0, output
    assert "SUCCESS" in output


def _unit_tests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in UNIT_TEST_FILES:
        yield path, yaml.safe_load(path.read_text())


def _alert_cases() -> Iterator[dict[str, Any]]:
    for _, doc in _unit_tests():
        for group in doc["tests"]:
            yield from group.get("alert_rule_test", [])


def test_unit_tests_read_the_extracted_rules_in_dependency_order() -> None:
    """Recording rules must be evaluated before the alerts that read them at each step; promtool's default order
    is random, so every file lists every group, in the rule file's order."""
    names = [group["name"] for group in rule_groups()]
    for path, doc in _unit_tests():
        assert doc["rule_files"] == ["rules.yaml"], path.name
        assert doc["group_eval_order"] == names, path.name


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    firing = {case["alertname"] for case in _alert_cases() if case["exp_alerts"]}
    quiet = {case["alertname"] for case in _alert_cases() if not case["exp_alerts"]}
    alerts = {rule["alert"] for rule in _alerts()}
    assert alerts - firing == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown quiet"
    assert (firing | quiet) - alerts == set(), "unit tests of alerts that do not exist"


def test_the_required_scenarios_are_covered() -> None:
    """The scenarios of issue 10, by the words of each test group's series: a storm of Unavailable pages, a storm
    of declines does not (see slo_availability_test.yaml for the full set)."""
    storm, declines = _groups_checking("RgwAvailabilityFastBurn")
    assert any('grpc_code="Unavailable"' in s["series"] for s in storm["input_series"])
    decline_codes = {
        code
        for s in declines["input_series"]
        if "grpc_server_handled_total" in s["series"] and "RedemptionService" in s["series"]
        for code in re.findall(r'grpc_code="(\w+)"', s["series"])
    }
    assert {"NotFound", "InvalidArgument", "ResourceExhausted", "OK"} <= decline_codes
    assert decline_codes.isdisjoint({"Unknown", "Internal", "Unavailable", "DeadlineExceeded", "DataLoss"})


def _groups_checking(alertname: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The first test group where the alert fires, and the first where it is checked quiet at every step it is
    checked."""
    fires: dict[str, Any] | None = None
    quiet: dict[str, Any] | None = None
    for _, doc in _unit_tests():
        for group in doc["tests"]:
            cases = [c for c in group.get("alert_rule_test", []) if c["alertname"] == alertname]
            if not cases:
                continue
            if fires is None and any(c["exp_alerts"] for c in cases):
                fires = group
            if quiet is None and all(not c["exp_alerts"] for c in cases):
                quiet = group
    assert fires is not None and quiet is not None, alertname
    return fires, quiet


def _github_anchor(heading: str, seen: dict[str, int]) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to dashes, -1, -2... for
    repeats."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    return slug if count == 0 else f"{slug}-{count}"


def runbook_anchors() -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    in_fence = False
    for line in RUNBOOK.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and (match := re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)):
            anchors.add(_github_anchor(match.group(1), seen))
    return anchors


def test_github_anchor_slugs() -> None:
    seen: dict[str, int] = {}
    assert _github_anchor("RgwOutboxBacklogGrowing", seen) == "rgwoutboxbackloggrowing"
    assert _github_anchor("Availability and latency SLOs", seen) == "availability-and-latency-slos"
    assert _github_anchor("Investigating faults", seen) == "investigating-faults"
    assert _github_anchor("Investigating faults", seen) == "investigating-faults-1"
    assert (
        _github_anchor("Risk engine: rate limits, lockout — enforced", seen)
        == "risk-engine-rate-limits-lockout--enforced"
    )


@pytest.mark.parametrize("alert", _alerts(), ids=lambda rule: str(rule["alert"]))
def test_every_alert_is_labelled_annotated_and_has_a_runbook_section(alert: dict[str, Any]) -> None:
    assert alert["labels"]["severity"] in SEVERITIES
    annotations = alert["annotations"]
    assert annotations["summary"].strip()
    assert annotations["description"].strip()
    url = annotations["runbook_url"]
    base, _, anchor = url.partition("#")
    assert base == RUNBOOK_URL
    assert anchor == alert["alert"].lower(), "a section headed by the alert's own name"
    assert anchor in runbook_anchors(), f"deploy/RUNBOOK.md has no section {alert['alert']}"


def test_every_runbook_link_inside_the_runbook_resolves() -> None:
    anchors = runbook_anchors()
    links = set(re.findall(r"\]\(#([^)]+)\)", RUNBOOK.read_text(encoding="utf-8")))
    assert links - anchors == set()


def test_alert_names_are_unique() -> None:
    names = [rule["alert"] for rule in _alerts()]
    assert len(names) == len(set(names))


def test_every_name_an_alert_reads_is_recorded_here_or_a_contract_metric() -> None:
    recorded = recorded_names()
    for rule in iter_rules():
        for name in metric_names_in_expr(str(rule["expr"])):
            assert name in recorded or name in CONTRACT_METRICS or name in SYNTHETIC_SERIES, (rule, name)
            if ":" in name:
                assert name in recorded, f"recording rule {name} is used but not defined"


def test_alerts_read_only_contract_metrics() -> None:
    names = alert_metric_names()
    assert names <= CONTRACT_METRICS, names - CONTRACT_METRICS
    # The rules do read the SLO sources and the writer's state.
    assert {"grpc_server_handled_total", "grpc_server_handling_seconds_bucket", "rgw_outbox_entries"} <= names


def test_slo_recording_rules_have_sloths_shape() -> None:
    for slo in SLOS:
        labels_by_record: dict[str, dict[str, str]] = {}
        for rule in iter_rules():
            if "record" in rule and rule.get("labels", {}).get("sloth_slo") == slo:
                labels_by_record[rule["record"]] = rule["labels"]
        assert set(SLOTH_RECORDS) <= set(labels_by_record), (slo, set(SLOTH_RECORDS) - set(labels_by_record))
        for record, labels in labels_by_record.items():
            assert labels["sloth_id"] == f"redemption-gateway-{slo}", record
            assert labels["sloth_service"] == "redemption-gateway", record
            if record.startswith("slo:sli_error:ratio_rate"):
                assert labels["sloth_window"] == record.removeprefix("slo:sli_error:ratio_rate")


def test_burn_rate_alerts_follow_the_sre_workbook() -> None:
    """Per SLO: 14.4x over 1h and 5m, 6x over 6h and 30m (page); 3x over 1d and 2h, 1x over 3d and 6h (ticket)."""
    budget = {"availability": "0.001", "latency": "0.01"}
    table = {
        "FastBurn": ("1h", "5m", "14.4", "page"),
        "MediumBurn": ("6h", "30m", "6", "page"),
        "SlowBurn": ("1d", "2h", "3", "ticket"),
        "ChronicBurn": ("3d", "6h", "1", "ticket"),
    }
    alerts = {rule["alert"]: rule for rule in _alerts()}
    for slo in SLOS:
        for suffix, (long_w, short_w, factor, severity) in table.items():
            rule = alerts[f"Rgw{slo.capitalize()}{suffix}"]
            expr = re.sub(r"\s+", " ", rule["expr"])
            threshold = budget[slo] if factor == "1" else rf"\({factor} \* {budget[slo]}\)"
            for window in (long_w, short_w):
                pattern = rf'slo:sli_error:ratio_rate{window}\{{sloth_id="redemption-gateway-{slo}"\}}\) > {threshold}'
                assert re.search(pattern, expr), (rule["alert"], window)
            assert " and " in expr
            assert rule["labels"]["severity"] == severity


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le, grpc_method) (rate(foo_bucket{job="x",le="0.1"}[5m]))', {"foo_bucket"}),
        ("a_total / on (job) group_left (version) b_info", {"a_total", "b_info"}),
        ("sum(rate(a_total[5m] offset 1h)) without (instance) > bool 1e-3", {"a_total"}),
        ('label_replace(up{job="x"}, "dst", "$1", "src", "(.*)")', {"up"}),
        ('{__name__="named_metric", job="x"} or vector(0)', {"named_metric"}),
        ("max_over_time(rate(c_total[5m])[1h:1m]) # a comment with fake_name\n", {"c_total"}),
        ('histogram_quantile(0.99, sum by (le) (rate(h_bucket{job=~"$job"}[$__rate_interval])))', {"h_bucket"}),
        (
            "slo:sli_error:ratio_rate5m{sloth_id='x'} > (14.4 * 0.001) and time() - ts_seconds > 120",
            {"slo:sli_error:ratio_rate5m", "ts_seconds"},
        ),
        ('absent(up{job="rgw-gateway"} == 1) unless on() Inf > NaN', {"up"}),
        ("count by (a, b) (x_info and (time() - start_seconds) < 1800)", {"x_info", "start_seconds"}),
        ('rate(a_total{s="}{[]"}[5m]) / ignoring(code) rate(b_total{c=`x"y`}[5m])', {"a_total", "b_total"}),
    ],
)
def test_metric_names_in_expr(expr: str, names: set[str]) -> None:
    assert metric_names_in_expr(expr) == names


def test_recorded_and_synthetic_names_are_left_out() -> None:
    names = alert_metric_names()
    assert not any(":" in name for name in names)
    assert "up" not in names
    assert "sloth_slo_info" not in names
