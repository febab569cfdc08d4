"""Issuance at scale (gateway/campaigns/issuance.py, loader.py): a million codes in one call, compact in Redis;
a batch commits whole or not at all, Redis holds only committed codes, and an interrupted run is resumed to a
Postgres and a Redis that agree."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from gateway import codes, issuance, keys
from gateway.campaigns import issuance as batches
from gateway.campaigns.codegen import CodeFactory
from gateway.coderefs import KeyRing
from gateway.dev.servers import RedisServer
from gateway.durability import mark_initialised
from gateway.redis_client import connect_server as connect
from tests.conftest import T0_MS, gateway_environ
from tests.integration.conftest import DAY_MS, at
from tests.integration.issuance_helpers import (
    bucket_fields,
    issued,
    postgres_refs,
    redis_refs,
    rgw,
    rgw_background,
    sigkill,
    until,
)

MILLION = 1_000_000


async def _campaign(db: asyncpg.Connection, redis: Redis, keyring: KeyRing, **rules: Any) -> issuance.Campaign:
    return await issuance.create_campaign(
        db, redis, keyring, name=f"scale-{uuid.uuid4().hex[:8]}", valid_from=at(T0_MS - DAY_MS),
        valid_until=at(T0_MS + 30 * DAY_MS), **rules,
    )  # fmt: skip


async def _used_memory(redis: Redis) -> int:
    info: Any = await redis.info("memory")
    return int(info["used_memory"])


async def _sampled_bytes_per_code(redis: Redis, campaign_id: int, codes_in_shard: int) -> float:
    """MEMORY USAGE of 1,024 of the 65,536 buckets, scaled to all of them, per code."""
    total = 0
    for n in range(0, 16**keys.BUCKET_CHARS, 64):
        total += await redis.memory_usage(keys.bucket_key(campaign_id, 0, f"{n:04x}"), samples=0) or 0
    return total * 64 / codes_in_shard


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_million_codes_in_one_call(
    db: asyncpg.Connection, redis: Redis, keyring: KeyRing, tmp_path: Path
) -> None:
    configured: Any = await redis.config_get("hash-max-listpack-entries")
    await redis.config_set("hash-max-listpack-entries", 128)  # Redis' default: the layout must be compact there too
    try:
        campaign = await _campaign(db, redis, keyring)
        before = await _used_memory(redis)
        out = tmp_path / "million.txt"
        done = await issuance.issue_to_file(db, redis, keyring, campaign, count=MILLION, out=out)
        per_code_info = (await _used_memory(redis) - before) / MILLION
        per_code_sampled = await _sampled_bytes_per_code(redis, campaign.id, MILLION)
    finally:
        await redis.config_set("hash-max-listpack-entries", configured["hash-max-listpack-entries"])

    assert done.codes == done.added == MILLION
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    lines = out.read_text().split("\n")
    assert lines.pop() == "" and len(lines) == len(set(lines)) == MILLION
    route = codes.Route(campaign.id, 0)
    assert all(codes.parse(line) == route for line in lines)  # every check character (and layout) is valid
    counts = await db.fetchrow(
        "SELECT count(*) AS n, count(DISTINCT code_ref) AS refs FROM issued_codes WHERE campaign_id = $1", campaign.id
    )
    assert (counts["n"], counts["refs"]) == (MILLION, MILLION)
    assert await db.fetchval("SELECT state FROM code_batches WHERE id = $1", done.batch_id) == "active"
    assert await issued(redis, campaign.id, 0) == await bucket_fields(redis, campaign.id, 0) == MILLION
    assert not [k async for k in redis.scan_iter(match=keys.code_key(campaign.id, 0, "*"), count=10_000)]
    assert per_code_info <= 100 and per_code_sampled <= 100, (per_code_info, per_code_sampled)
    for line in lines[:: MILLION // 1000]:
        ref = keyring.ref(campaign.key_id, campaign.id, line).ref
        assert await redis.hget(keys.bucket_key(campaign.id, 0, ref), keys.bucket_field(ref)) is not None


async def test_codes_spread_over_shards_agree_with_postgres(
    db: asyncpg.Connection, redis: Redis, keyring: KeyRing, tmp_path: Path
) -> None:
    campaign = await _campaign(db, redis, keyring, shards=3)
    done = await issuance.issue_to_file(db, redis, keyring, campaign, count=30_000, out=tmp_path / "c.txt")
    assert done.added == 30_000
    for shard in range(3):
        in_redis = await redis_refs(redis, campaign.id, shard)
        assert set(in_redis) == await postgres_refs(db, campaign.id, shard)
        assert await issued(redis, campaign.id, shard) == len(in_redis) > 9_000
    issued_at = await db.fetchval("SELECT min(issued_at) FROM issued_codes WHERE campaign_id = $1", campaign.id)
    assert set(in_redis.values()) == {str(int(issued_at.timestamp()))}  # the bucket value: the issue time, s


async def test_a_consumer_that_stops_early_rolls_the_batch_back(
    db: asyncpg.Connection, redis: Redis, keyring: KeyRing
) -> None:
    campaign = await _campaign(db, redis, keyring)
    stream = batches.generate_stream(db, redis, keyring, campaign, 200_000, chunk=1_000)
    first = await anext(stream)
    assert isinstance(first, list) and len(first) == 1_000  # handed out inside the transaction...
    await stream.aclose()  # ...while the next chunk's COPY is in flight

    assert await db.fetchval("SELECT 1") == 1  # the connection is usable again
    assert await db.fetchval("SELECT count(*) FROM code_batches WHERE campaign_id = $1", campaign.id) == 0
    assert await db.fetchval("SELECT count(*) FROM issued_codes WHERE campaign_id = $1", campaign.id) == 0
    assert await bucket_fields(redis, campaign.id, 0) == await issued(redis, campaign.id, 0) == 0


async def test_a_cancelled_consumer_rolls_the_batch_back(
    db: asyncpg.Connection, redis: Redis, keyring: KeyRing
) -> None:
    campaign = await _campaign(db, redis, keyring)
    taken = 0

    async def consume() -> None:
        nonlocal taken
        async for item in batches.generate_stream(db, redis, keyring, campaign, 300_000):
            taken += len(item) if isinstance(item, list) else 0

    task = asyncio.create_task(consume())
    await until(lambda: taken >= 50_000)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await db.fetchval("SELECT count(*) FROM issued_codes WHERE campaign_id = $1", campaign.id) == 0
    assert await bucket_fields(redis, campaign.id, 0) == 0


async def test_a_duplicate_code_ref_regenerates_its_chunk(
    db: asyncpg.Connection, redis: Redis, keyring: KeyRing, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    campaign = await _campaign(db, redis, keyring)
    drawn: list[bytes] = []

    def recorded(n: int) -> bytes:
        drawn.append(os.urandom(n))
        return drawn[-1]

    replayed = iter(drawn[:1])

    def replay_once(n: int) -> bytes:  # the second batch's first draw repeats the first batch's
        return next(replayed, None) or os.urandom(n)

    first = await _generate(db, redis, keyring, campaign, 8_000, CodeFactory(campaign.id, 1, randbytes=recorded))
    replayed = iter(drawn[:1])
    caplog.set_level(logging.WARNING, logger="rgw.issuance")
    second = await _generate(db, redis, keyring, campaign, 8_000, CodeFactory(campaign.id, 1, randbytes=replay_once))

    assert "regenerating its chunk" in caplog.text
    assert len(set(first) | set(second)) == 16_000
    assert await db.fetchval("SELECT count(*) FROM issued_codes WHERE campaign_id = $1", campaign.id) == 16_000
    assert await issued(redis, campaign.id, 0) == await bucket_fields(redis, campaign.id, 0) == 16_000


async def _generate(
    db: asyncpg.Connection, redis: Redis, keyring: KeyRing, campaign: issuance.Campaign, count: int,
    factory: CodeFactory,
) -> list[str]:  # fmt: skip
    plain: list[str] = []
    async for item in batches.generate_stream(db, redis, keyring, campaign, count, factory=factory):
        if isinstance(item, list):
            plain += item
    return plain


async def test_a_campaign_with_a_loading_batch_gets_no_new_one(
    db: asyncpg.Connection, redis: Redis, keyring: KeyRing, tmp_path: Path
) -> None:
    campaign = await _campaign(db, redis, keyring)
    await db.execute(
        "INSERT INTO code_batches (id, campaign_id, kind, codes, state) VALUES ($1, $2, 'generated', 0, 'loading')",
        uuid.uuid4(), campaign.id,
    )  # fmt: skip
    with pytest.raises(batches.BatchesLoading, match="rgw codes resume"):
        await issuance.issue_to_file(db, redis, keyring, campaign, count=10, out=tmp_path / "x.txt")
    assert not (tmp_path / "x.txt").exists() and not (tmp_path / "x.txt.partial").exists()
    assert [b.codes for b in await batches.resume(db, redis, campaign_id=campaign.id)] == [0]
    await issuance.issue_to_file(db, redis, keyring, campaign, count=10, out=tmp_path / "x.txt")


async def test_a_batch_with_its_own_face_value_and_device_keeps_them_per_code(
    db: asyncpg.Connection, redis: Redis, keyring: KeyRing, tmp_path: Path
) -> None:
    campaign = await _campaign(db, redis, keyring, face_value=100, currency="CNY")
    own = await issuance.issue_to_file(db, redis, keyring, campaign, count=50, out=tmp_path / "own.txt",
                                       face_value=500, bound_device="phone-a")  # fmt: skip
    same = await issuance.issue_to_file(db, redis, keyring, campaign, count=50, out=tmp_path / "same.txt",
                                        face_value=100)  # fmt: skip
    rows = await db.fetch("SELECT batch_id, uses, valid_from, valid_until, face_value, bound_device FROM issued_codes"
                          " WHERE campaign_id = $1", campaign.id)  # fmt: skip
    assert {tuple(r)[1:] for r in rows if r["batch_id"] == own.batch_id} == {(None, None, None, 500, "phone-a")}
    assert {tuple(r)[1:] for r in rows if r["batch_id"] == same.batch_id} == {(None, None, None, None, None)}
    for code in (tmp_path / "own.txt").read_text().split():
        ref = keyring.ref(campaign.key_id, campaign.id, code).ref
        assert await redis.hgetall(keys.code_key(campaign.id, 0, ref)) == {"fv": "500", "dev": "phone-a"}
    for code in (tmp_path / "same.txt").read_text().split():
        assert not await redis.exists(
            keys.code_key(campaign.id, 0, keyring.ref(campaign.key_id, campaign.id, code).ref)
        )
    assert await bucket_fields(redis, campaign.id, 0) == await issued(redis, campaign.id, 0) == 100


async def test_loading_again_restores_what_redis_lost_and_counts_each_code_once(
    db: asyncpg.Connection, redis: Redis, keyring: KeyRing, tmp_path: Path
) -> None:
    campaign = await _campaign(db, redis, keyring, uses_per_code=2)
    await issuance.issue_codes(db, redis, keyring, campaign, count=5_000, out=tmp_path / "c.txt")
    # a row from before migration 0007 (every rule written out): only what differs from the campaign is loaded
    old, odd = os.urandom(32), os.urandom(32)
    await db.copy_records_to_table("issued_codes", columns=["code_ref", "key_id", "campaign_id", "shard", "uses",
                                   "valid_from", "valid_until", "batch_id"], records=[
        (old, campaign.key_id, campaign.id, 0, 2, campaign.valid_from, campaign.valid_until, uuid.uuid4()),
        (odd, campaign.key_id, campaign.id, 0, 5, campaign.valid_from, at(T0_MS), uuid.uuid4()),
    ])  # fmt: skip
    assert await issuance.load_codes(db, redis, campaign_id=campaign.id) == 5_002
    assert await issued(redis, campaign.id, 0) == 5_002
    lost = [keys.bucket_key(campaign.id, 0, f"{n:04x}") for n in range(0, 65_536, 16)]
    gone = sum([await redis.hlen(key) for key in lost])
    await redis.delete(*lost)
    await redis.hincrby(keys.budget_key(campaign.id, 0), "iss", -gone)

    assert await issuance.load_codes(db, redis, campaign_id=campaign.id) == 5_002
    assert await issued(redis, campaign.id, 0) == await bucket_fields(redis, campaign.id, 0) == 5_002
    assert set(await redis_refs(redis, campaign.id, 0)) == await postgres_refs(db, campaign.id)
    assert not await redis.exists(keys.code_key(campaign.id, 0, old.hex()))
    odd_vu = str(T0_MS)
    assert await redis.hgetall(keys.code_key(campaign.id, 0, odd.hex())) == {"uses": "5", "vu": odd_vu}


# -- Interrupted runs: a real `rgw codes generate` killed before and after its commit ------------------------------

KILLED = 300_000


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, to pause."""
    with RedisServer.start(data_dir=tmp_path / "redis", appendonly=False) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="session")
async def own_client(own_redis: RedisServer) -> AsyncIterator[Redis]:
    client = connect(own_redis.url, pool_size=4, timeout_s=10)
    await mark_initialised(client, "tests")
    yield client
    await client.aclose()


async def _state(db: asyncpg.Connection, campaign_id: int) -> str | None:
    state: str | None = await db.fetchval("SELECT state FROM code_batches WHERE campaign_id = $1", campaign_id)
    return state


async def test_killed_before_the_commit_leaves_nothing(
    db: asyncpg.Connection, own_client: Redis, own_redis: RedisServer, migrated: str, keyring: KeyRing,
    tmp_path: Path,
) -> None:  # fmt: skip
    campaign = await _campaign(db, own_client, keyring)
    env, out = gateway_environ(own_redis.url, migrated), tmp_path / "codes.txt"
    partial = out.with_name("codes.txt.partial")
    proc = rgw_background(env, "codes", "generate", "--campaign", str(campaign.id), "--count", str(KILLED),
                          "--out", str(out))  # fmt: skip
    await until(lambda: partial.exists() and partial.stat().st_size > 0)
    sigkill(proc)

    assert partial.stat().st_size < KILLED * 18  # killed half way through the codes (17-character codes + \n)
    assert not out.exists()
    assert await _state(db, campaign.id) is None
    assert await db.fetchval("SELECT count(*) FROM issued_codes WHERE campaign_id = $1", campaign.id) == 0
    assert await bucket_fields(own_client, campaign.id, 0) == await issued(own_client, campaign.id, 0) == 0


async def test_stopped_before_the_commit_removes_its_partial_file(
    db: asyncpg.Connection, own_client: Redis, own_redis: RedisServer, migrated: str, keyring: KeyRing,
    tmp_path: Path,
) -> None:  # fmt: skip
    campaign = await _campaign(db, own_client, keyring)
    env, out = gateway_environ(own_redis.url, migrated), tmp_path / "codes.txt"
    partial = out.with_name("codes.txt.partial")
    proc = rgw_background(env, "codes", "generate", "--campaign", str(campaign.id), "--count", str(KILLED),
                          "--out", str(out))  # fmt: skip
    await until(lambda: partial.exists() and partial.stat().st_size > 0)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 143, stderr
    assert not partial.exists() and not out.exists()
    assert await _state(db, campaign.id) is None
    assert await db.fetchval("SELECT count(*) FROM issued_codes WHERE campaign_id = $1", campaign.id) == 0
    assert await bucket_fields(own_client, campaign.id, 0) == 0


async def test_killed_after_the_commit_is_resumed_to_agreement(
    db: asyncpg.Connection, own_client: Redis, own_redis: RedisServer, migrated: str, keyring: KeyRing,
    tmp_path: Path,
) -> None:  # fmt: skip
    campaign = await _campaign(db, own_client, keyring)
    env, out = gateway_environ(own_redis.url, migrated), tmp_path / "codes.txt"
    proc = rgw_background(env, "codes", "generate", "--campaign", str(campaign.id), "--count", str(KILLED),
                          "--out", str(out))  # fmt: skip
    await until(lambda: _state(db, campaign.id), timeout=60)  # committed: the batch row is visible
    own_redis.pause()  # the load cannot finish...
    try:
        sigkill(proc)  # ...before the process dies
    finally:
        own_redis.resume()

    assert await _state(db, campaign.id) == "loading"
    assert await db.fetchval("SELECT count(*) FROM issued_codes WHERE campaign_id = $1", campaign.id) == KILLED
    assert await issued(own_client, campaign.id, 0) == await bucket_fields(own_client, campaign.id, 0) < KILLED
    again = rgw(env, "codes", "generate", "--campaign", str(campaign.id), "--count", "5", "--out",
                str(tmp_path / "more.txt"))  # fmt: skip
    assert again.returncode == 1 and "rgw codes resume" in again.stderr

    resumed = rgw(env, "codes", "resume", "--campaign", str(campaign.id))

    assert resumed.returncode == 0, resumed.stderr
    assert await _state(db, campaign.id) == "active"
    in_redis = await redis_refs(own_client, campaign.id, 0)
    assert set(in_redis) == await postgres_refs(db, campaign.id)
    assert await issued(own_client, campaign.id, 0) == len(in_redis) == KILLED
    handed_out = out if out.exists() else out.with_name("codes.txt.partial")  # renamed right after the commit
    plain = handed_out.read_text().split()
    assert len(plain) == KILLED
    assert {keyring.ref(campaign.key_id, campaign.id, c).ref[: keys.REF_CHARS] for c in plain[:2000]} <= set(in_redis)
    assert rgw(env, "codes", "resume").stderr.strip() == "no batch was waiting to be loaded"


async def test_cli_generate_with_face_value_and_device(
    db: asyncpg.Connection, redis: Redis, redis_url: str, migrated: str, keyring: KeyRing, tmp_path: Path
) -> None:
    campaign = await _campaign(db, redis, keyring, currency="EUR")
    out = tmp_path / "c.txt"
    result = rgw(gateway_environ(redis_url, migrated), "codes", "generate", "--campaign", str(campaign.id),
                 "--count", "20", "--out", str(out), "--face-value", "250", "--bound-device", "dev-9")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "issued 20 codes" in result.stderr and not any(c in result.stderr for c in out.read_text().split())
    rows = await db.fetch("SELECT DISTINCT face_value, bound_device FROM issued_codes WHERE campaign_id = $1",
                          campaign.id)  # fmt: skip
    assert [tuple(r) for r in rows] == [(250, "dev-9")]
    over_limit = rgw(gateway_environ(redis_url, migrated), "codes", "generate", "--campaign", str(campaign.id),
                     "--count", "10000001", "--out", str(tmp_path / "big.txt"))  # fmt: skip
    assert over_limit.returncode == 2 and "10,000,000" in over_limit.stderr
