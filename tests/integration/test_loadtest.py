"""`make loadtest` in miniature: every Locust scenario for a few seconds against a throw-away local stack.

Locust runs in subprocesses only (`loadtest.run_loadtest` starts it): importing locust monkey-patches the standard
library with gevent, which must never happen in the pytest process.
"""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Below pytest's 120 s per-test timeout, so a hung run is stopped by us - and stops its servers - first.
RUN_TIMEOUT_S = 100

# (scenario, request name) pairs a healthy run must show: the fresh and hot codes are redeemed, the attacker's
# guesses are NOT_FOUND and its typos INVALID_ARGUMENT (expected, so not failures) until the lockout engages and
# declines it LOCKED_OUT, retries are replayed.
EXPECTED = {
    ("LaunchPeak", "Redeem:OUTCOME_REDEEMED"),
    ("HotCodes", "Redeem:OUTCOME_REDEEMED"),
    ("Attacker", "Redeem:OUTCOME_NOT_FOUND"),
    ("Attacker", "Redeem:INVALID_ARGUMENT"),
    ("Attacker", "Redeem:OUTCOME_RISK_DENIED:LOCKED_OUT"),
    ("Mixed", "Validate:OUTCOME_REDEEMABLE"),
    ("Mixed", "Redeem:OUTCOME_REDEEMED"),
    ("Mixed", "Redeem:OUTCOME_REDEEMED:replayed"),
}


def _run(results: Path) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable, "-m", "loadtest.run_loadtest", "--users", "8", "--spawn-rate", "8", "--duration", "5",
        "--fresh", "20000", "--hot-uses", "20000", "--results", str(results),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # run_loadtest unwinds on SIGTERM: Locust, gateway and servers stop
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"the load test overran {RUN_TIMEOUT_S}s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out)


def _stats(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open(newline="") as handle:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(handle)}


def _data_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))[1:]


@pytest.mark.slow
def test_every_scenario_runs_headless_without_failures(tmp_path: Path) -> None:
    results = tmp_path / "results"
    run = _run(results)
    assert run.returncode == 0, run.stdout[-6000:]
    for name in ("locust_stats.csv", "locust_failures.csv", "locust_exceptions.csv", "locust.html"):
        assert (results / name).stat().st_size > 0, name
    assert _data_rows(results / "locust_failures.csv") == []
    assert _data_rows(results / "locust_exceptions.csv") == []
    stats = _stats(results / "locust_stats.csv")
    assert EXPECTED <= stats.keys(), sorted(stats)
    assert stats[("", "Aggregated")]["Failure Count"] == "0"
    # Each fresh code is handed to one user once: the launch peak never meets a code already used.
    assert {name for kind, name in stats if kind == "LaunchPeak"} == {"Redeem:OUTCOME_REDEEMED"}
    # The lockout engaged for the attacker (10 failures lock its terminal) and for nobody else.
    assert int(stats[("Attacker", "Redeem:OUTCOME_RISK_DENIED:LOCKED_OUT")]["Request Count"]) > 0
    honest = {(kind, name) for kind, name in stats if kind not in ("Attacker", "")}
    assert not {(kind, name) for kind, name in honest if "RISK_DENIED" in name or "RESOURCE_EXHAUSTED" in name}
    assert "attacker: " in run.stdout and " lockout" in run.stdout
    assert "loadtest: passed" in run.stdout
