"""The benchmark harness works end to end (seconds, tiny rates): it proves the harness, not the speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtest.bench_report import markdown


def _bench(out: Path, only: str, timeout: float) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--smoke", "--workers", "1", "--only", only, "--out", str(out),
         "--no-markdown"],
        capture_output=True, text=True, timeout=timeout, env={**os.environ},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads((out / "bench.json").read_text())
    return report


@pytest.mark.slow
@pytest.mark.timeout(720)
def test_bench_smoke_run_writes_results(tmp_path: Path) -> None:
    variants = "ceiling,redeem,stream,redeem-hot,peer,peer-stream,redeem-risk-off,redeem-risk,redeem-risk-2calls,redis"
    steps = "interleaved-risk,burst"
    report = _bench(tmp_path, f"{variants},{steps}", timeout=460)
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert report["problems"] == []
    results = report["variants"]
    assert set(results) == set(variants.split(",")) - {"redis"}
    for name, variant in results.items():
        cpu = variant["results"]["cpu"]
        assert cpu["completed"] == cpu["sent"] > 0, name
        assert cpu["errors"] == 0, (name, cpu["statuses"])
        assert cpu["cpu_us_per_call"]["server"] > 0, name
        assert variant["results"]["max_calls_per_s"] > 0, name
    redeemed = results["redeem"]["results"]["cpu"]["outcomes"]
    assert set(redeemed) == {"1"}  # every fresh code redeemed exactly once
    hot = results["redeem-hot"]["results"]
    assert all(step["over_redeemed"] == 0 for step in [hot["cpu"], hot["half"], *hot["ramp"]])
    assert hot["cpu"]["outcomes"]["1"] == 2 * 20  # exactly the hot codes' uses were granted
    stream = results["stream"]["results"]["cpu"]
    assert stream["outcomes"]["1"] == stream["completed"] * 8  # 8 redemptions per message
    assert report["redis"]["runs"][0]["rps"] > 0
    assert report["ratios"]["redeem_cpu_per_call_vs_ceiling"] is not None
    _assert_risk_figures(report)
    _assert_partial_run_keeps_the_rest(tmp_path, report)


def _assert_partial_run_keeps_the_rest(out: Path, first: dict[str, Any]) -> None:
    """A run of one part (here the metrics-and-access-log comparison) into the same results replaces that part
    only: the other figures, the chart and the markdown built from them stay."""
    chart = (out / "bench.png").stat().st_mtime_ns
    report = _bench(out, "interleaved-observe", timeout=200)
    assert report["variants"] == first["variants"] and report["burst"] == first["burst"]
    assert report["interleaved_risk"] == first["interleaved_risk"] and report["redis"] == first["redis"]
    assert [update["parts"] for update in report["updates"]] == [["interleaved-observe"]]
    assert report["problems"] == []
    assert (out / "bench.png").stat().st_mtime_ns == chart
    observe = report["interleaved_observe"]
    assert observe["denied"] == dict.fromkeys(("ceiling-unobserved", "ceiling", "redeem-unobserved", "redeem"), 0)
    lines, calls = observe["access_log_lines"], observe["calls"]
    assert lines["ceiling"] == calls["ceiling"] > 0 and lines["redeem"] == calls["redeem"] > 0  # one line per call
    assert lines["ceiling-unobserved"] == lines["redeem-unobserved"] == 0
    assert all(observe["median_us"][name] > 0 for name in lines), observe["median_us"]
    assert report["ratios"]["ceiling_cpu_with_vs_without_observe"] == observe["observe"]["ceiling"]["ratio"]
    assert report["ratios"]["redeem_cpu_with_vs_without_observe"] is not None
    text = markdown(report)
    assert "**Metrics and access log.**" in text and "**Risk engine.**" in text and "Limiter burst:" in text
    assert "| redeem-hot |" in text and "Measured again" in text


def _assert_risk_figures(report: dict[str, Any]) -> None:
    """Every rule enforced denied nothing (a like-for-like comparison with the engine off), and the burst admitted
    exactly its limit."""
    for name in ("redeem-risk-off", "redeem-risk", "redeem-risk-2calls"):
        res = report["variants"][name]["results"]
        assert all(set(step["outcomes"]) == {"1"} for step in [res["cpu"], res["half"], *res["ramp"]]), name
        assert all(step["denied"] == 0 for step in [res["cpu"], res["half"], *res["ramp"]]), name
    risk = report["interleaved_risk"]
    assert risk["denied"] == {"redeem-risk-off": 0, "redeem-risk": 0, "redeem-risk-2calls": 0}
    assert risk["ratio"] is not None and risk["server_ratio"] is not None and risk["median_p99_ms"]["redeem-risk"] > 0
    assert risk["two_calls_ratio"] is not None
    assert report["ratios"]["risk_cpu_per_call_every_rule_vs_engine_off"] == risk["ratio"]
    burst = report["burst"]
    assert burst["admitted"] == burst["limit"] == 10 and burst["exact"]
    assert burst["answers"] == {"OUTCOME_REDEEMED": 10, "RESOURCE_EXHAUSTED": 40}
    assert 0 < burst["first_throttled_retry_after_ms"] <= 60_000
    assert burst["controls"]["ok"], burst["controls"]
