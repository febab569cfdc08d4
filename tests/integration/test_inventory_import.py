"""Importing card secrets (gateway/inventory/importing.py, loader.py, `rgw inventory import|resume`): good rows
land encrypted in Postgres and indexed in Redis per the layout; bad rows are named by line and reason, never by
their secret; all-or-nothing refuses everything; a secret is never imported twice; a canary secret shows up in no
Redis value, Postgres column or log line; an import killed after its commit is resumed to agreement."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from gateway import keys
from gateway.dev.servers import RedisServer
from gateway.durability import mark_initialised
from gateway.inventory import importing, layout, model
from gateway.inventory.importing import Record
from gateway.inventory.model import Sku
from gateway.redis_client import connect_server as connect
from gateway.validation import InvalidRequest
from tests.conftest import gateway_environ
from tests.integration.inventory_helpers import (
    assert_redis_matches_postgres,
    csv_lines,
    plaintexts,
    ring,
    row,
    secret_env,
    write_csv,
)
from tests.integration.issuance_helpers import rgw, rgw_background, sigkill, until

CANARY = "CANARY-Zq7w-91xx-PLANTED"


@pytest_asyncio.fixture(loop_scope="session")
async def sku(db: asyncpg.Connection, redis: Redis) -> Sku:
    return await model.create_sku(db, redis, brand_id=1, code="mgtv-month", name="Mango TV month", shards=3)


async def _import(db: asyncpg.Connection, redis: Redis, lines: list[str], *, all_or_nothing: bool = False
                  ) -> importing.ImportResult:  # fmt: skip
    return await importing.import_csv(db, redis, ring(), 1, lines, all_or_nothing=all_or_nothing, actor="tests")


async def test_creating_a_sku_publishes_every_shard(db: asyncpg.Connection, redis: Redis, sku: Sku) -> None:
    for shard in range(3):
        assert await redis.hgetall(layout.meta_key(sku.id, shard)) == {"brand": "1", "reuse": "1", "max": "100"}
        outbox = layout.outbox_key(sku.id, shard)
        assert await redis.sismember(keys.OUTBOXES, outbox)
        groups: Any = await redis.xinfo_groups(outbox)
        assert [g["name"] for g in groups] == [keys.LEDGER_GROUP]
    assert await model.get_sku_by_code(db, 1, "mgtv-month") == sku
    assert [s.code for s in await model.list_skus(db, 1)] == ["mgtv-month"]


async def test_a_bad_sku_is_refused_with_every_field(db: asyncpg.Connection, redis: Redis) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await model.create_sku(db, redis, brand_id=1, code="-Bad", name="", reuse=0, shards=65, max_per_order=0,
                               low_stock=-1)  # fmt: skip
    assert {v.field for v in caught.value.violations} == {"code", "name", "reuse", "shards", "max_per_order",
                                                           "low_stock"}  # fmt: skip
    assert await db.fetchval("SELECT count(*) FROM skus") == 0


async def test_a_good_file_is_imported_and_loaded_per_the_layout(
    db: asyncpg.Connection, redis: Redis, sku: Sku
) -> None:
    lines = csv_lines([row("mgtv-month", f"SECRET-{n:04d}", supplier=f"sup-{n % 2}", cost=1000 + n) for n in range(50)])

    result = await _import(db, redis, lines)

    assert result.refused == [] and result.imported == 50 and result.batch_id is not None
    assert await db.fetchval("SELECT state FROM secret_batches WHERE id = $1", result.batch_id) == "active"
    assert await assert_redis_matches_postgres(db, redis, sku, ring()) == 50
    assert await plaintexts(db, ring(), sku.id) == {f"SECRET-{n:04d}" for n in range(50)}
    shards = await db.fetch("SELECT DISTINCT shard FROM secrets WHERE sku_id = $1", sku.id)
    assert len(shards) > 1  # random among the SKU's shards


async def test_bad_rows_are_named_by_line_and_reason(db: asyncpg.Connection, redis: Redis, sku: Sku) -> None:
    past = datetime.now(UTC) - timedelta(days=1)
    lines = csv_lines([
        row("mgtv-month", "GOOD-1"),                         # line 2
        row("mgtv-month", "BAD-SUP", supplier="no spaces"),  # 3
        row("mgtv-month", "x" * 257),                        # 4
        "mgtv-month,sup-a,BAD-COST,12.5,CNY,2030-01-01",     # 5
        row("mgtv-month", "BAD-CUR", currency="cny"),        # 6
        "mgtv-month,sup-a,BAD-TIME,1,CNY,next tuesday",      # 7
        row("iqiyi-year", "UNKNOWN"),                        # 8
        row("mgtv-month", "OLD", expires=past),              # 9
        row("mgtv-month", "GOOD-1"),                         # 10
        "mgtv-month,sup-a,TOO-FEW",                          # 11
        row("mgtv-month", "  GOOD-2 "),                      # 12
        row("mgtv-month", "GOOD-2"),                         # 13: the same once trimmed
        "mgtv-month,sup-a,,1,CNY,2030-01-01",                # 14: an empty secret
    ])  # fmt: skip

    result = await _import(db, redis, lines)

    assert [r.describe() for r in result.refused] == [
        "line 3: MALFORMED(supplier)", "line 4: MALFORMED(secret)", "line 5: MALFORMED(cost)",
        "line 6: MALFORMED(currency)", "line 7: MALFORMED(expires_at)", "line 8: UNKNOWN_SKU", "line 9: EXPIRED",
        "line 10: DUPLICATE", "line 11: MALFORMED(columns)", "line 13: DUPLICATE", "line 14: MALFORMED(secret)",
    ]  # fmt: skip
    assert result.imported == 2
    assert await plaintexts(db, ring(), sku.id) == {"GOOD-1", "GOOD-2"}
    assert await db.fetchval("SELECT refused FROM secret_batches WHERE id = $1", result.batch_id) == 11


async def test_all_or_nothing_refuses_everything(db: asyncpg.Connection, redis: Redis, sku: Sku) -> None:
    lines = csv_lines([row("mgtv-month", "A-1"), row("mgtv-month", "A-2", currency="X"), row("mgtv-month", "A-3")])

    result = await _import(db, redis, lines, all_or_nothing=True)

    assert result.batch_id is None and result.imported == 0
    assert [r.describe() for r in result.refused] == ["line 3: MALFORMED(currency)"]
    assert await db.fetchval("SELECT count(*) FROM secrets") == 0
    assert await db.fetchval("SELECT count(*) FROM secret_batches") == 0
    assert await redis.hlen(layout.secrets_key(sku.id, 0)) == 0


async def test_a_secret_imported_before_is_refused(db: asyncpg.Connection, redis: Redis, sku: Sku) -> None:
    first = await _import(db, redis, csv_lines([row("mgtv-month", "ONCE-1"), row("mgtv-month", "ONCE-2")]))
    again = await _import(db, redis, csv_lines([row("mgtv-month", "NEW-1"), row("mgtv-month", " ONCE-2")]))
    strict = await _import(db, redis, csv_lines([row("mgtv-month", "NEW-2"), row("mgtv-month", "ONCE-1")]),
                           all_or_nothing=True)  # fmt: skip

    assert first.imported == 2
    assert again.imported == 1 and [r.describe() for r in again.refused] == ["line 3: DUPLICATE"]
    assert strict.imported == 0 and [r.describe() for r in strict.refused] == ["line 3: DUPLICATE"]
    assert await plaintexts(db, ring(), sku.id) == {"ONCE-1", "ONCE-2", "NEW-1"}


async def test_records_of_a_stream_are_named_by_position(db: asyncpg.Connection, redis: Redis, sku: Sku) -> None:
    later = datetime.now(UTC) + timedelta(days=3)
    records = [Record(1, "mgtv-month", "sup-a", "S-1", 10, "CNY", later),
               Record(2, "mgtv-month", "sup-a", "S-2", None, "CNY", later),
               Record(3, "mgtv-month", "sup-a", "S-3", 10, "CNY", None)]  # fmt: skip

    result = await importing.import_records(db, redis, ring(), 1, records, all_or_nothing=False)

    assert [r.describe("record") for r in result.refused] == ["record 2: MALFORMED(cost)",
                                                              "record 3: MALFORMED(expires_at)"]  # fmt: skip
    assert "S-2" not in repr(records[1])


async def test_a_canary_secret_is_nowhere_in_plaintext(
    db: asyncpg.Connection, redis: Redis, sku: Sku, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    lines = csv_lines([row("mgtv-month", CANARY), row("mgtv-month", CANARY), row("mgtv-month", "OTHER-1")])

    result = await _import(db, redis, lines)
    await importing.resume(db, redis)

    assert result.imported == 2 and await plaintexts(db, ring(), sku.id) == {CANARY, "OTHER-1"}
    needles = (CANARY, CANARY.encode().hex(), CANARY.lower())
    for key in [str(k) async for k in redis.scan_iter(count=1000)]:
        kind = str(await redis.type(key))
        readers: dict[str, Any] = {"hash": redis.hgetall, "zset": lambda k: redis.zrange(k, 0, -1, withscores=True),
                       "set": redis.smembers, "string": redis.get, "stream": redis.xrange,
                       "list": lambda k: redis.lrange(k, 0, -1)}  # fmt: skip
        text = repr(await readers[kind](key)) + key
        assert not any(n in text for n in needles), key
    for table in ("skus", "secret_batches", "secrets", "audit_log"):
        for r in await db.fetch(f"SELECT t::text AS row FROM {table} t"):
            assert not any(n in r["row"] for n in needles), table
    logged = "\n".join(caplog.text.splitlines()) + "".join(repr(r.args) for r in caplog.records)
    assert not any(n in logged for n in needles)


async def test_the_cli_imports_prints_refused_lines_and_exits_2(
    db: asyncpg.Connection, redis: Redis, redis_url: str, migrated: str, sku: Sku, tmp_path: Path
) -> None:
    env = gateway_environ(redis_url, migrated, **secret_env())
    good = write_csv(tmp_path / "good.csv", [row("mgtv-month", "CLI-1"), row("mgtv-month", "CLI-2")])
    mixed = write_csv(tmp_path / "mixed.csv", [row("mgtv-month", "CLI-3"), row("mgtv-month", "CLI-1")])

    ok = rgw(env, "inventory", "import", "--brand", "default", "--file", str(good))
    refused = rgw(env, "inventory", "import", "--brand", "1", "--file", str(mixed), "--all-or-nothing")
    partly = rgw(env, "inventory", "import", "--brand", "1", "--file", str(mixed))

    assert ok.returncode == 0, ok.stderr
    assert "imported 2 secret(s)" in ok.stdout
    assert refused.returncode == 2 and refused.stdout.splitlines()[0] == "line 3: DUPLICATE"
    assert "nothing was imported" in refused.stdout
    assert partly.returncode == 2 and "imported 1 secret(s)" in partly.stdout
    assert all("CLI-" not in out for r in (ok, refused, partly) for out in (r.stdout, r.stderr))
    assert await assert_redis_matches_postgres(db, redis, sku, ring()) == 3
    listed = rgw(env, "sku", "list", "--brand", "1")
    assert listed.returncode == 0 and "mgtv-month" in listed.stdout


async def test_the_cli_creates_a_sku(db: asyncpg.Connection, redis: Redis, redis_url: str, migrated: str) -> None:
    env = gateway_environ(redis_url, migrated, **secret_env())
    made = rgw(env, "sku", "create", "--brand", "1", "--code", "iqiyi-year", "--name", "iQiyi year", "--reuse",
               "3", "--shards", "2")  # fmt: skip
    again = rgw(env, "sku", "create", "--brand", "1", "--code", "iqiyi-year", "--name", "iQiyi year")

    assert made.returncode == 0, made.stderr
    created = await model.get_sku_by_code(db, 1, "iqiyi-year")
    assert (created.reuse, created.shards) == (3, 2)
    assert await redis.hget(layout.meta_key(created.id, 1), "reuse") == "3"
    assert again.returncode == 1 and "already" in again.stderr


# -- A real `rgw inventory import` killed after its commit, then resumed ------------------------------------------

KILLED = 60_000


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer.start(data_dir=tmp_path / "redis", appendonly=False) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="session")
async def own_client(own_redis: RedisServer) -> AsyncIterator[Redis]:
    client = connect(own_redis.url, pool_size=4, timeout_s=10)
    await mark_initialised(client, "tests")
    yield client
    await client.aclose()


async def test_killed_after_the_commit_is_resumed_to_agreement(
    db: asyncpg.Connection, own_client: Redis, own_redis: RedisServer, migrated: str, tmp_path: Path
) -> None:
    sku = await model.create_sku(db, own_client, brand_id=1, code="big", name="Big", shards=2)
    env = gateway_environ(own_redis.url, migrated, **secret_env())
    path = write_csv(tmp_path / "big.csv", [row("big", f"K-{n:08d}", cost=n % 977) for n in range(KILLED)])
    proc = rgw_background(env, "inventory", "import", "--brand", "1", "--file", str(path))
    await until(lambda: db.fetchval("SELECT state FROM secret_batches"), timeout=90)  # committed
    own_redis.pause()  # the load cannot finish...
    try:
        sigkill(proc)  # ...before the process dies
    finally:
        own_redis.resume()

    assert await db.fetchval("SELECT state FROM secret_batches") == "loading"
    assert await db.fetchval("SELECT count(*) FROM secrets") == KILLED
    in_redis = sum([await own_client.hlen(layout.secrets_key(sku.id, s)) for s in range(2)])
    assert in_redis < KILLED

    started = time.monotonic()
    resumed = rgw(env, "inventory", "resume")
    took = time.monotonic() - started

    assert resumed.returncode == 0, resumed.stderr
    assert f"{KILLED} secrets loaded" in resumed.stdout
    assert await db.fetchval("SELECT state FROM secret_batches") == "active"
    assert await assert_redis_matches_postgres(db, own_client, sku, ring()) == KILLED
    assert rgw(env, "inventory", "resume").stdout.strip() == "no secret batch was waiting to be loaded"
    print(f"resume of {KILLED} secrets ({in_redis} loaded before the kill): {took:.2f}s")
