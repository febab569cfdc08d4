"""inventory_status and the stock gauges against real Redis and Postgres: available, expiring, expired, held and
dispensed by supplier, totals and the low flag; an unknown SKU is NOT_FOUND."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from gateway.inventory.status import find_skus, inventory_status, refresh_stock_metrics
from gateway.tenancy.model import NotFoundError
from tests.conftest import T0_MS
from tests.integration.inventory_ledger_state import (
    DAY_MS,
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


async def test_stock_by_supplier(ledger: asyncpg.Connection, redis: Redis, migrated: str) -> None:
    sku = await make_sku(ledger, low_stock=3)
    await add_secret(ledger, redis, sku, expiry_ms=T0_MS + 30 * DAY_MS)
    await add_secret(ledger, redis, sku, expiry_ms=T0_MS + 2 * DAY_MS)  # expiring within 7 days
    await add_secret(ledger, redis, sku, expiry_ms=T0_MS - 1)  # expired with its dispense left
    held = await add_secret(ledger, redis, sku, supplier="sup-b")
    given = await add_secret(ledger, redis, sku, supplier="sup-b")
    for secret in (held, given):
        await take(redis, secret)
    await put_order(redis, sku, "ord-h", [(held, 1)], state="held", hold_until_ms=T0_MS + 60_000)
    await put_order(redis, sku, "ord-d", [(given, 1)], state="dispensed")
    await append(redis, sku, event("dispense", sku, "ord-d", [(given, 1)]))
    await drain(redis, migrated)

    [stock] = await inventory_status(ledger, redis, await find_skus(ledger, 1, sku.code), now_ms=T0_MS)

    figures = [(s.supplier, s.available, s.held, s.dispensed, s.expired, s.expiring) for s in stock.suppliers]
    assert figures == [("sup-a", 2, 0, 0, 1, 1), ("sup-b", 0, 1, 1, 0, 0)]
    assert (stock.total.available, stock.total.held, stock.total.dispensed, stock.low) == (2, 1, 1, True)

    assert await refresh_stock_metrics(ledger, redis, now_ms=T0_MS) >= 1
    labels = {"brand": "1", "sku": sku.code}
    assert REGISTRY.get_sample_value("rgw_inventory_available", labels) == 2
    assert REGISTRY.get_sample_value("rgw_inventory_low", labels) == 1


async def test_an_unknown_sku_is_not_found(ledger: asyncpg.Connection) -> None:
    with pytest.raises(NotFoundError):
        await find_skus(ledger, 1, "no-such-sku")
