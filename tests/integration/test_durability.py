"""Start-up refuses a Redis that could lose acknowledged redemptions, unless a relaxed level is chosen."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.dev.servers import RedisServer, free_port
from gateway.durability import DurabilityError, check_durability, durability_problems
from gateway.redis_client import connect
from tests.conftest import gateway_environ


def serve_briefly(redis_url: str, database_url: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run `rgw serve` until it either refuses to start or has served for a moment."""
    env = gateway_environ(redis_url, database_url, RGW_GRPC_ADDR=f"127.0.0.1:{free_port()}", **extra)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve"], env={**os.environ, **env}, stderr=subprocess.PIPE, text=True
    )
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.terminate()
    _, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


def test_serve_refuses_redis_without_aof(tmp_path: Path, migrated: str) -> None:
    with RedisServer.start(data_dir=tmp_path / "r", appendonly=False) as redis:
        refused = serve_briefly(redis.url, migrated, RGW_REDIS_DURABILITY="always")
    assert refused.returncode == 1
    assert "appendonly is 'no': set appendonly yes" in refused.stderr


def test_everysec_needs_the_explicit_relaxed_level(tmp_path: Path, migrated: str) -> None:
    with RedisServer.start(data_dir=tmp_path / "r", appendonly=True, appendfsync="everysec") as redis:
        refused = serve_briefly(redis.url, migrated, RGW_REDIS_DURABILITY="always")
        relaxed = serve_briefly(redis.url, migrated, RGW_REDIS_DURABILITY="everysec")
    assert refused.returncode == 1 and "RGW_REDIS_DURABILITY=everysec" in refused.stderr
    assert relaxed.returncode == 0, relaxed.stderr  # served, then stopped cleanly by SIGTERM


@pytest.mark.parametrize(
    ("config", "level", "expected"),
    [
        ({"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "noeviction"}, "always", []),
        ({"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}, "everysec", []),
        (
            {"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "allkeys-lru"},
            "always",
            ["maxmemory-policy"],
        ),
        (
            {"appendonly": "no", "appendfsync": "no", "maxmemory-policy": "noeviction"},
            "everysec",
            ["appendonly", "appendfsync"],
        ),
        ({"appendonly": "no"}, "none", []),
    ],
)
def test_durability_rules(config: dict[str, str], level: str, expected: list[str]) -> None:
    problems = durability_problems(config, level)
    assert [p.split(" ")[0] for p in problems] == expected


async def test_check_reads_the_live_config(tmp_path: Path) -> None:
    with RedisServer.start(data_dir=tmp_path / "r", appendonly=True, appendfsync="always") as server:
        client = connect(server.url, pool_size=1, timeout_s=2)
        try:
            assert (await check_durability(client, "always"))["appendfsync"] == "always"
            await client.config_set("maxmemory-policy", "allkeys-lru")
            with pytest.raises(DurabilityError, match="maxmemory-policy noeviction"):
                await check_durability(client, "always")
        finally:
            await client.aclose()
