"""The inventory benchmark works end to end (seconds, a small stock): both designs dispense, every order gets its
secrets, and no secret went to two orders - proves the harness, not the speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtest.bench_inventory import markdown


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_inventory_smoke_run_has_no_duplicates(tmp_path: Path) -> None:
    out = tmp_path / "inventory.json"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench_inventory", "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=100, env={**os.environ},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(out.read_text())
    assert report["problems"] == []
    assert report["stock"]["postgres_fsync"] == "on"
    assert report["stock"]["redis_appendfsync"] == "always"
    for design in ("ours", "peer"):
        data = report["designs"][design]
        check = data["check"]
        assert check["duplicates"] == 0, (design, check)
        assert check["distinct_secrets"] == check["recorded_secrets"] == check["acknowledged_secrets"] > 0, check
        for name, quantity in (("unary-x1", 1), ("unary-x10", 10), ("stream-x1", 1), ("stream-x10", 10)):
            result = data["results"][name]
            assert result["max_secrets_per_s"] > 0, (design, name)
            for step in [*result["ramp"], result["half"]]:
                assert set(step["outcomes"]) == {"1"}, (design, name, step["outcomes"])  # DISPENSED only
                assert step["secrets_dispensed"] == step["outcomes"]["1"] * quantity
    assert report["designs"]["ours"]["check"]["alarms"] == 0
    assert set(report["ratio_ours_over_peer"]) == {"unary-x1", "unary-x10", "stream-x1", "stream-x10"}
    report.update(date="today", machine="here")
    assert "| stream | 10 | peer |" in markdown(report)
