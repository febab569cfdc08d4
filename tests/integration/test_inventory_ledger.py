"""Inventory events through the outbox into the ledger, against real Redis and Postgres: every kind lands as an
inventory_events row, a dispense or confirm as one dispenses row per secret use, a redelivery is harmless, a
secret use given to a second order is an alarm (row, error log, metric) - never a second row - and poison entries
are dead-lettered; inventory events share the batch transaction with redemptions."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from gateway import keys
from gateway.coderefs import KeyRing
from gateway.inventory import layout
from gateway.ledger.outbox import deadletter_key_for
from gateway.ledger.writer import LedgerWriter
from tests.conftest import T0_MS
from tests.integration.inventory_ledger_state import add_secret, append, clean_inventory, event, make_sku
from tests.integration.ledger_state import campaign_with_codes, redeem, writer


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@pytest_asyncio.fixture(loop_scope="session")
async def ledger(db: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    await clean_inventory(db)
    yield db


@pytest_asyncio.fixture(loop_scope="session")
async def one_writer(redis: Redis, migrated: str) -> AsyncIterator[LedgerWriter]:
    w = writer(redis, migrated, consumer="inventory-test")
    yield w
    await w.close()


async def run_until_idle(w: LedgerWriter) -> int:
    handled = 0
    for _ in range(50):
        if (n := await w.run_once()) == 0:
            return handled
        handled += n
    raise AssertionError("the writer kept finding work")


async def test_every_kind_lands_and_dispenses_are_rows_per_secret_use(
    ledger: asyncpg.Connection, redis: Redis, one_writer: LedgerWriter
) -> None:
    sku = await make_sku(ledger, reuse=2)
    a, b = await add_secret(ledger, redis, sku), await add_secret(ledger, redis, sku, supplier="sup-b", cost=70)
    written = metric("rgw_ledger_dispenses_written_total")
    await append(redis, sku, event("dispense", sku, "ord-1", [(a, 1), (b, 1)], at_ms=T0_MS + 5))
    await append(redis, sku, event("hold", sku, "ord-2", [(a, 2)]))
    await append(redis, sku, event("confirm", sku, "ord-2", [(a, 2)], at_ms=T0_MS + 9))
    await append(redis, sku, event("hold", sku, "ord-3", [(b, 2)]))
    await append(redis, sku, event("release", sku, "ord-3", [(b, 2)]))
    await append(redis, sku, event("expire", sku, "ord-4", []))

    assert await run_until_idle(one_writer) == 6

    kinds = await ledger.fetch("SELECT order_id, kind FROM inventory_events ORDER BY outbox_id")
    assert [(r["order_id"], r["kind"]) for r in kinds] == [
        ("ord-1", "dispense"), ("ord-2", "hold"), ("ord-2", "confirm"), ("ord-3", "hold"), ("ord-3", "release"),
        ("ord-4", "expire")]  # fmt: skip
    rows = await ledger.fetch("SELECT * FROM dispenses ORDER BY order_id, secret_id")
    got = [(r["secret_id"], r["use_number"], r["order_id"], r["supplier"], r["cost"], r["currency"]) for r in rows]
    assert got == [
        (a.id, 1, "ord-1", "sup-a", 100, "CNY"), (b.id, 1, "ord-1", "sup-b", 70, "CNY"),
        (a.id, 2, "ord-2", "sup-a", 100, "CNY")]  # fmt: skip
    assert {(r["brand_id"], r["sku_id"]) for r in rows} == {(1, sku.id)}
    assert int(rows[0]["dispensed_at"].timestamp() * 1000) == T0_MS + 5
    assert metric("rgw_ledger_dispenses_written_total") == written + 3
    assert await redis.xlen(layout.outbox_key(sku.id, 0)) == 0


async def test_a_redelivered_event_is_harmless(
    ledger: asyncpg.Connection, redis: Redis, one_writer: LedgerWriter
) -> None:
    sku = await make_sku(ledger)
    secret = await add_secret(ledger, redis, sku)
    fields = event("dispense", sku, "ord-1", [(secret, 1)])
    await append(redis, sku, fields)
    await run_until_idle(one_writer)
    duplicates, alarms = metric("rgw_ledger_duplicates_total"), metric("rgw_ledger_dispense_alarms_total")

    await append(redis, sku, fields)  # the same event delivered again (a writer died before its XACK)
    await run_until_idle(one_writer)

    assert await ledger.fetchval("SELECT count(*) FROM inventory_events") == 1
    assert await ledger.fetchval("SELECT count(*) FROM dispenses") == 1
    assert await ledger.fetchval("SELECT count(*) FROM dispense_alarms") == 0
    assert metric("rgw_ledger_duplicates_total") == duplicates + 1
    assert metric("rgw_ledger_dispense_alarms_total") == alarms


async def test_a_secret_use_given_to_a_second_order_is_an_alarm(
    ledger: asyncpg.Connection, redis: Redis, one_writer: LedgerWriter, caplog: pytest.LogCaptureFixture
) -> None:
    sku = await make_sku(ledger)
    secret, other = await add_secret(ledger, redis, sku), await add_secret(ledger, redis, sku)
    await append(redis, sku, event("dispense", sku, "ord-1", [(secret, 1)]))
    await run_until_idle(one_writer)
    alarms = metric("rgw_ledger_dispense_alarms_total")

    # a later batch, and within one batch: both clash with the first order
    await append(redis, sku, event("dispense", sku, "ord-2", [(secret, 1), (other, 1)]))
    await append(redis, sku, event("confirm", sku, "ord-3", [(secret, 1)]))
    with caplog.at_level(logging.ERROR, logger="rgw.writer"):
        await run_until_idle(one_writer)

    owners = await ledger.fetch("SELECT secret_id, order_id FROM dispenses ORDER BY secret_id")
    assert [(r["secret_id"], r["order_id"]) for r in owners] == [(secret.id, "ord-1"), (other.id, "ord-2")]
    found = await ledger.fetch("SELECT * FROM dispense_alarms ORDER BY conflicting_order")
    assert [(r["secret_id"], r["use_number"], r["first_order_id"], r["conflicting_order"]) for r in found] == [
        (secret.id, 1, "ord-1", "ord-2"), (secret.id, 1, "ord-1", "ord-3")]  # fmt: skip
    assert metric("rgw_ledger_dispense_alarms_total") == alarms + 2
    assert sum("SECRET IN TWO ORDERS" in r.getMessage() for r in caplog.records) == 2
    assert await ledger.fetchval("SELECT count(*) FROM inventory_events") == 3  # every event is recorded

    await append(redis, sku, event("confirm", sku, "ord-3", [(secret, 1)]))  # a new event, the same clash
    await run_until_idle(one_writer)
    assert await ledger.fetchval("SELECT count(*) FROM dispense_alarms") == 2  # raised once
    assert metric("rgw_ledger_dispense_alarms_total") == alarms + 2


async def test_poison_inventory_entries_are_dead_lettered(
    ledger: asyncpg.Connection, redis: Redis, one_writer: LedgerWriter
) -> None:
    sku = await make_sku(ledger)
    secret = await add_secret(ledger, redis, sku)
    good = event("dispense", sku, "ord-1", [(secret, 1)])
    bad = {layout.EVENT_FORMAT: good[layout.EVENT_FORMAT].replace("|dispense|", "|steal|")}
    bad_id = await append(redis, sku, bad)
    await append(redis, sku, good)
    dead = metric("rgw_ledger_dead_letters_total")

    await run_until_idle(one_writer)

    assert await ledger.fetchval("SELECT count(*) FROM dispenses") == 1
    letters: Any = await redis.xrange(deadletter_key_for(layout.outbox_key(sku.id, 0)))
    assert [(f["dl_origin_id"], "kind" in f["dl_reason"]) for _, f in letters] == [(bad_id, True)]
    assert metric("rgw_ledger_dead_letters_total") == dead + 1


async def test_inventory_and_redemptions_share_one_batch(
    ledger: asyncpg.Connection, redis: Redis, keyring: KeyRing, one_writer: LedgerWriter
) -> None:
    codes = await campaign_with_codes(ledger, redis, keyring, count=1)
    use = codes.use(0)
    await redeem(redis, use)
    sku = await make_sku(ledger)
    secret = await add_secret(ledger, redis, sku)
    await append(redis, sku, event("dispense", sku, "ord-1", [(secret, 1)]))

    assert await one_writer.run_once() == 2  # one batch, one transaction

    assert await ledger.fetchval("SELECT count(*) FROM redemptions WHERE redemption_id = $1", use.redemption_id) == 1
    assert await ledger.fetchval("SELECT order_id FROM dispenses") == "ord-1"
    assert await redis.scard(keys.OUTBOXES) >= 2
