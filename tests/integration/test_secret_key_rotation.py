"""`rgw keys rotate` (gateway/inventory/rotation.py): every secret is re-encrypted under the active key in
Postgres and Redis, a concurrent dispense's counters are never undone, the old key can be removed afterwards,
and a rotation rerun - or one interrupted between Postgres and Redis - is harmless."""

from __future__ import annotations

import asyncpg
import pytest_asyncio
from redis.asyncio import Redis

from gateway.inventory import importing, layout, model, rotation
from gateway.inventory.loader import parse_secret_record
from gateway.inventory.model import Sku
from tests.conftest import gateway_environ
from tests.integration.inventory_helpers import (
    assert_redis_matches_postgres,
    csv_lines,
    plaintexts,
    redis_secrets,
    ring,
    row,
    secret_env,
)
from tests.integration.issuance_helpers import rgw

SECRETS = {f"ROT-{n:05d}" for n in range(2_500)}


@pytest_asyncio.fixture(loop_scope="session")
async def sku(db: asyncpg.Connection, redis: Redis) -> Sku:
    made = await model.create_sku(db, redis, brand_id=1, code="rot", name="Rotation", shards=2, reuse=3)
    done = await importing.import_csv(db, redis, ring("s1"), 1, csv_lines(row("rot", s) for s in sorted(SECRETS)),
                                      all_or_nothing=True)  # fmt: skip
    assert done.imported == len(SECRETS)
    return made


async def _key_ids(db: asyncpg.Connection, redis: Redis, sku: Sku) -> tuple[set[str], set[str]]:
    pg = {r["key_id"] for r in await db.fetch("SELECT DISTINCT key_id FROM secrets")}
    return pg, {fields["key_id"] for _, fields in (await redis_secrets(redis, sku)).values()}


async def test_rotation_reencrypts_everything_and_the_old_key_can_go(
    db: asyncpg.Connection, redis: Redis, sku: Sku
) -> None:
    # a dispense took a use of one secret meanwhile (its record's counters changed in Redis)
    shard = 0
    taken_id = next(iter(await redis.hkeys(layout.secrets_key(sku.id, shard))))
    record = parse_secret_record(str(await redis.hget(layout.secrets_key(sku.id, shard), taken_id)))
    record.update(left="2", used="1")
    await redis.hset(layout.secrets_key(sku.id, shard), taken_id, "|".join(record.values()))

    done = await rotation.rotate(db, redis, ring("s2", "s1", "s2"), chunk=700)

    assert (done.reencrypted, done.redis_records, done.left) == (len(SECRETS), len(SECRETS), 0)
    assert await _key_ids(db, redis, sku) == ({"s2"}, {"s2"})
    only_new = ring("s2", "s2")  # s1 removed
    assert await plaintexts(db, only_new, sku.id) == SECRETS
    after = parse_secret_record(str(await redis.hget(layout.secrets_key(sku.id, shard), taken_id)))
    assert (after["left"], after["used"], after["key_id"]) == ("2", "1", "s2")
    await redis.hset(
        layout.secrets_key(sku.id, shard), taken_id, "|".join({**after, "left": "3", "used": "0"}.values())
    )
    assert await assert_redis_matches_postgres(db, redis, sku, only_new) == len(SECRETS)

    again = await rotation.rotate(db, redis, ring("s2", "s1", "s2"))
    assert (again.reencrypted, again.redis_records, again.left) == (0, 0, 0)
    assert await plaintexts(db, only_new, sku.id) == SECRETS


async def test_a_rotation_interrupted_before_redis_is_finished_by_a_rerun(
    db: asyncpg.Connection, redis: Redis, sku: Sku
) -> None:
    before = {i: f for i, (_, f) in (await redis_secrets(redis, sku)).items()}
    await rotation.rotate(db, redis, ring("s2", "s1", "s2"))
    # as if killed after the Postgres commits: Redis still holds the s1 records
    async with redis.pipeline(transaction=False) as pipe:
        for secret_id, fields in before.items():
            pipe.hset(layout.secrets_key(sku.id, await _shard_of(db, secret_id)), str(secret_id),
                      "|".join(fields.values()))  # fmt: skip
        await pipe.execute()
    assert (await _key_ids(db, redis, sku))[1] == {"s1"}

    rerun = await rotation.rotate(db, redis, ring("s2", "s1", "s2"))

    assert (rerun.reencrypted, rerun.redis_records, rerun.left) == (0, len(SECRETS), 0)
    assert await assert_redis_matches_postgres(db, redis, sku, ring("s2", "s2")) == len(SECRETS)


async def _shard_of(db: asyncpg.Connection, secret_id: int) -> int:
    shard: int = await db.fetchval("SELECT shard FROM secrets WHERE id = $1", secret_id)
    return shard


async def test_the_cli_rotates(db: asyncpg.Connection, redis: Redis, redis_url: str, migrated: str, sku: Sku) -> None:
    env = gateway_environ(redis_url, migrated, **secret_env("s2"))
    first = rgw(env, "keys", "rotate", "--brand", "1")
    second = rgw(env, "keys", "rotate")

    assert first.returncode == 0, first.stderr
    assert f"re-encrypted {len(SECRETS)} secret(s) under key 's2'" in first.stdout
    assert second.returncode == 0 and "re-encrypted 0 secret(s)" in second.stdout
    assert await assert_redis_matches_postgres(db, redis, sku, ring("s2", "s2")) == len(SECRETS)
