"""The `rgw` commands a newcomer and an operator use, run as real processes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import asyncpg
from redis.asyncio import Redis

from gateway import codes, keys
from tests.conftest import gateway_environ

RGW = [sys.executable, "-m", "gateway.cli"]


def rgw(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RGW, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


async def test_campaign_create_and_codes_generate(
    redis_url: str, migrated: str, db: asyncpg.Connection, redis: Redis, tmp_path: Path
) -> None:
    env = gateway_environ(redis_url, migrated)
    created = rgw(env, "campaign", "create", "--name", "launch", "--uses-per-code", "2", "--shards", "3")
    assert created.returncode == 0, created.stderr
    campaign_id = int(created.stdout.strip())
    out = tmp_path / "codes.txt"

    generated = rgw(env, "codes", "generate", "--campaign", str(campaign_id), "--count", "2500", "--out", str(out))

    assert generated.returncode == 0, generated.stderr
    issued = out.read_text().split()
    assert len(issued) == len(set(issued)) == 2500
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    routes = {codes.parse(c) for c in issued}
    assert {r.campaign_id for r in routes} == {campaign_id} and {r.shard for r in routes} == {0, 1, 2}
    assert await db.fetchval("SELECT count(*) FROM issued_codes WHERE campaign_id = $1", campaign_id) == 2500
    dump = " ".join(str(r) for r in await db.fetch("SELECT * FROM issued_codes LIMIT 50"))
    assert not any(code in dump for code in issued)  # never plaintext in Postgres
    loaded = 0
    for shard in range(3):
        assert await redis.hget(keys.meta_key(campaign_id, shard), "uses") == "2"
        loaded += int(await redis.hget(keys.budget_key(campaign_id, shard), "iss") or 0)
    assert loaded == 2500


async def test_generate_refuses_to_overwrite_codes(redis_url: str, migrated: str, redis: Redis, tmp_path: Path) -> None:
    env = gateway_environ(redis_url, migrated)
    campaign_id = rgw(env, "campaign", "create", "--name", "x").stdout.strip()
    out = tmp_path / "codes.txt"
    out.write_text("precious\n")
    result = rgw(env, "codes", "generate", "--campaign", campaign_id, "--count", "1", "--out", str(out))
    assert result.returncode == 1 and "refusing to overwrite" in result.stderr
    assert out.read_text() == "precious\n"


def test_bad_configuration_names_the_variable() -> None:
    result = rgw({"RGW_MAX_CONCURRENT_RPCS": "lots"}, "serve")
    assert result.returncode == 2 and "RGW_MAX_CONCURRENT_RPCS" in result.stderr
    missing_keys = rgw({"RGW_CODE_KEYS": ""}, "serve")
    assert missing_keys.returncode == 1 and "RGW_CODE_KEYS is required" in missing_keys.stderr
