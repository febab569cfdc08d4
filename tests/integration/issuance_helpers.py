"""What the issuance tests read back: a campaign shard's codes in Redis (its bucket hashes) and in Postgres."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import asyncpg
from redis.asyncio import Redis

from gateway import keys

BUCKETS = [f"{n:0{keys.BUCKET_CHARS}x}" for n in range(16**keys.BUCKET_CHARS)]
_ROUND = 4096


async def redis_refs(redis: Redis, campaign_id: int, shard: int) -> dict[str, str]:
    """Every issued code of the shard in Redis: its first REF_CHARS hex characters -> the bucket field's value."""
    found: dict[str, str] = {}
    for start in range(0, len(BUCKETS), _ROUND):
        part = BUCKETS[start : start + _ROUND]
        async with redis.pipeline(transaction=False) as pipe:
            for bucket in part:
                pipe.hgetall(keys.bucket_key(campaign_id, shard, bucket))
            hashes: list[dict[str, str]] = await pipe.execute()
        for bucket, fields in zip(part, hashes, strict=True):
            found.update({bucket + field: value for field, value in fields.items()})
    return found


async def bucket_fields(redis: Redis, campaign_id: int, shard: int) -> int:
    """The shard's bucket fields, counted with one HLEN per possible bucket (no SCAN: the buckets are known)."""
    total = 0
    for start in range(0, len(BUCKETS), _ROUND):
        async with redis.pipeline(transaction=False) as pipe:
            for bucket in BUCKETS[start : start + _ROUND]:
                pipe.hlen(keys.bucket_key(campaign_id, shard, bucket))
            total += sum(await pipe.execute())
    return total


async def issued(redis: Redis, campaign_id: int, shard: int) -> int:
    """The shard's `iss` counter."""
    value: Any = await redis.hget(keys.budget_key(campaign_id, shard), "iss")
    return int(value or 0)


async def postgres_refs(db: asyncpg.Connection, campaign_id: int, shard: int | None = None) -> set[str]:
    """The campaign's (shard's) code_refs in Postgres, cut to what Redis keeps."""
    rows = await db.fetch(
        "SELECT code_ref FROM issued_codes WHERE campaign_id = $1 AND ($2::int IS NULL OR shard = $2)",
        campaign_id, shard,
    )  # fmt: skip
    return {bytes(row["code_ref"]).hex()[: keys.REF_CHARS] for row in rows}


async def until(condition: Callable[[], Any], *, timeout: float = 30, interval: float = 0.005) -> Any:
    """Poll `condition` (a function or coroutine function) until it gives a truthy value; that value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {timeout}s: {condition}")
        await asyncio.sleep(interval)


RGW = [sys.executable, "-m", "gateway.cli"]


def rgw(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `rgw` to completion."""
    return subprocess.run([*RGW, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


def rgw_background(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """Start `rgw` and return at once (to be signalled)."""
    return subprocess.Popen([*RGW, *args], env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def sigkill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process started by rgw_background (alive until then) and close its pipe."""
    assert proc.poll() is None, f"process {proc.pid} ended before it was to be killed (exit {proc.returncode})"
    proc.kill()
    proc.communicate()
