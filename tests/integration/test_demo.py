"""`make run`'s demo: the brand, store, terminal and POS key it makes, and the command its banner prints."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.clock import ManualClock, SystemClock
from gateway.dev import run
from gateway.settings import Settings
from tests.conftest import gateway_environ
from tests.integration.conftest import RunningGateway


def _rgw(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)  # fmt: skip


async def test_the_banner_command_redeems_once_then_declines(
    gateway: RunningGateway,
    redis_url: str,
    migrated: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    clock: ManualClock,
) -> None:
    monkeypatch.chdir(tmp_path)  # the demo writes its codes under ./.local
    clock.value = SystemClock().now_ms()  # the demo campaign starts a minute ago
    settings = Settings.from_env(gateway_environ(redis_url, migrated))
    demo = await run.prepare_demo(settings)
    again = await run.prepare_demo(settings)  # a second `make run` finds the tenant and makes a new key
    assert (again.brand, again.store, again.terminal) == (demo.brand, demo.store, demo.terminal)
    banner = run._banner(settings, demo)
    command = next(line.strip() for line in banner.splitlines() if "redeem --addr" in line)
    key = re.search(r"RGW_API_KEY=(\S+)", command)
    assert key is not None and key.group(1) == demo.api_key
    args = command.split(" redeem ", 1)[1].split()
    args[args.index("--addr") + 1] = gateway.target
    env = {"RGW_API_KEY": demo.api_key, "RGW_CODE_KEYS": "", "RGW_DATABASE_URL": migrated}

    for _ in range(100):  # the gateway hears of the new key within a moment
        first = await asyncio.to_thread(_rgw, env, "redeem", *args)
        if "UNAUTHENTICATED" not in first.stderr:
            break
        await asyncio.sleep(0.05)
    second = await asyncio.to_thread(_rgw, env, "redeem", *args)
    keyless = await asyncio.to_thread(_rgw, {**env, "RGW_API_KEY": ""}, "redeem", *args)

    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["outcome"] == "OUTCOME_REDEEMED"
    assert json.loads(second.stdout)["outcome"] == "OUTCOME_ALREADY_REDEEMED"
    assert keyless.returncode == 2 and "RGW_API_KEY" in keyless.stderr
    assert demo.api_key not in first.stderr + second.stderr + keyless.stderr
