"""The ledger partitioning plan (docs/migrations/partition_ledger_by_month.sql, not applied by `rgw migrate`) runs on
a database migrated to the current schema that already holds ledger rows: the existing table becomes a partition
without a scan or a rewrite, new rows of later months land in their monthly partitions, the writer's own SQL
(gateway/ledger/store.py) keeps working unchanged, and `code_uses` still refuses a second row for a code use.

It runs on a database of its own on the session's Postgres, created and dropped here, so no other test sees it."""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from gateway.db.migrate import migrate
from gateway.ids import uuid7
from gateway.ledger.events import LedgerRow
from gateway.ledger.store import write_batch

PLAN = Path(__file__).resolve().parents[2] / "docs" / "migrations" / "partition_ledger_by_month.sql"
STEP_2 = "-- STEP 2"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)


@pytest_asyncio.fixture
async def fresh(migrated: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a new database on the session's Postgres, with every migration applied; dropped after."""
    name = f"partition_plan_{os.getpid()}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(migrated)
    await admin.execute(f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(migrated, database=name)
    try:
        await migrate(conn)
        yield conn
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


def month_start(moment: datetime, months: int) -> datetime:
    """The first instant of the UTC month `months` after the one holding `moment`."""
    index = moment.year * 12 + moment.month - 1 + months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def ledger_row(at: datetime, *, code_ref: bytes | None = None, use_number: int = 1) -> LedgerRow:
    """A redemption as the writer records it, with a UUIDv7 made from its own time (as the gateway makes them)."""
    ms = (at - EPOCH) // MS
    return LedgerRow(
        redemption_id=uuid.UUID(uuid7(ms)), code_ref=code_ref or os.urandom(32), key_id="k2", use_number=use_number,
        campaign_id=7, shard=0, caller="cl_plan/till-1", store_id="store-1", terminal_id="till-1",
        customer_device_id="dev-1", latitude=51.5, longitude=-0.12, accuracy_m=10.0, redeemed_at=at,
        fingerprint="fp", idempotency_scope="", outbox_id=f"{ms}-0", client_id="cl_plan", brand_id=1, face_value=0,
    )  # fmt: skip


async def placed(conn: asyncpg.Connection) -> dict[uuid.UUID, str]:
    """Each ledger row's table: the partition it is stored in (the plain table before the plan)."""
    rows = await conn.fetch("SELECT redemption_id, tableoid::regclass::text AS part FROM redemptions")
    return {r["redemption_id"]: r["part"] for r in rows}


async def relfilenode(conn: asyncpg.Connection, table: str) -> int:
    return int(await conn.fetchval("SELECT relfilenode FROM pg_class WHERE oid = $1::regclass", table))


async def test_the_floor_of_a_millisecond_orders_every_uuid7_of_it(fresh: asyncpg.Connection) -> None:
    step_1, _ = PLAN.read_text().split(STEP_2)
    await fresh.execute(step_1.split("-- STEP 1")[0])  # the two functions only
    for ms in (0, 1_780_272_000_000, 1_780_272_000_001, 253_402_300_799_998, (datetime.now(UTC) - EPOCH) // MS):
        at = EPOCH + ms * MS
        floor = await fresh.fetchval("SELECT ledger_uuid7_floor($1)", at)
        assert uuid7_ms(floor) == ms
        for _ in range(50):
            assert uuid.UUID(uuid7(ms)) >= floor
            assert uuid.UUID(uuid7(ms + 1)) > floor
            if ms:
                assert uuid.UUID(uuid7(ms - 1)) < floor


def uuid7_ms(value: uuid.UUID) -> int:
    return value.int >> 80


async def test_the_plan_partitions_the_ledger_by_month_in_place(fresh: asyncpg.Connection) -> None:
    step_1, step_2 = PLAN.read_text().split(STEP_2)
    now: datetime = await fresh.fetchval("SELECT now()")
    # Rows the ledger holds before the plan (this month), and one the writer adds between the two steps.
    before = [ledger_row(now - timedelta(minutes=2)), ledger_row(now - timedelta(minutes=1))]
    assert (await write_batch(fresh, before)).inserted == 2
    original_file = await relfilenode(fresh, "redemptions")

    async with fresh.transaction():
        await fresh.execute(step_1)
    between = ledger_row(now)
    assert (await write_batch(fresh, [between])).inserted == 1

    messages: list[str] = []
    fresh.add_log_listener(lambda _conn, message: messages.append(str(message.message)))
    await fresh.execute("SET client_min_messages = debug1")
    async with fresh.transaction():
        await fresh.execute(STEP_2 + step_2)
    await fresh.execute("RESET client_min_messages")

    # The old table is now the first partition, the same file (no rewrite), and ATTACH did not scan it.
    assert await fresh.fetchval("SELECT relkind::text FROM pg_class WHERE oid = 'redemptions'::regclass") == "p"
    assert await relfilenode(fresh, "redemptions_legacy") == original_file
    assert any("redemptions_legacy" in m and "implied by existing constraints" in m for m in messages), messages
    # Partitions: the legacy one up to the month after next, then two monthly ones, and the default.
    month_2, month_3 = month_start(now, 2), month_start(now, 3)
    names = {f"redemptions_p{m:%Y_%m}" for m in (month_2, month_3)}
    parts = await fresh.fetch("SELECT inhrelid::regclass::text AS name FROM pg_inherits"
                              " WHERE inhparent = 'redemptions'::regclass")  # fmt: skip
    assert {p["name"] for p in parts} == {"redemptions_legacy", "redemptions_default", *names}
    assert await fresh.fetchval("SELECT ledger_create_month_partitions(3)") == 0  # the daily job: idempotent

    # The writer's unchanged SQL (COPY into a LIKE-redemptions staging table, ON CONFLICT (redemption_id)) routes
    # rows of two later months to their partitions, a row of this month and of next month to the legacy one, and
    # a row no partition was made for yet to the default one.
    later = {
        ledger_row(month_2 + timedelta(days=3)): f"redemptions_p{month_2:%Y_%m}",
        ledger_row(month_3 - timedelta(milliseconds=1)): f"redemptions_p{month_2:%Y_%m}",
        ledger_row(month_3): f"redemptions_p{month_3:%Y_%m}",
        ledger_row(month_3 + timedelta(days=20)): f"redemptions_p{month_3:%Y_%m}",
        ledger_row(month_2 - timedelta(milliseconds=1)): "redemptions_legacy",
        ledger_row(now + timedelta(seconds=1)): "redemptions_legacy",
        ledger_row(month_start(now, 6)): "redemptions_default",
    }
    assert (await write_batch(fresh, list(later))).inserted == len(later)
    expected = {row.redemption_id: "redemptions_legacy" for row in [*before, between]}
    expected |= {row.redemption_id: part for row, part in later.items()}
    assert await placed(fresh) == expected
    assert await fresh.fetchval("SELECT count(*) FROM code_uses") == len(expected)

    # A redelivered event is still a duplicate, not a second row (the primary key is still redemption_id).
    first = next(iter(later))
    again = await write_batch(fresh, [first])
    assert (again.inserted, again.duplicates, again.alarms) == (0, 1, [])

    # A different redemption of the same code use, months later: recorded (it was acknowledged) in its own month's
    # partition, refused by code_uses, raised as a double-spend alarm - uniqueness did not move into the partitions.
    clash = ledger_row(month_3 + timedelta(days=1), code_ref=first.code_ref, use_number=first.use_number)
    result = await write_batch(fresh, [clash])
    assert result.inserted == 1
    assert [(a.first_redemption_id, a.conflicting_redemption_id) for a in result.alarms] == [
        (first.redemption_id, clash.redemption_id)
    ]
    owner = await fresh.fetchval(
        "SELECT redemption_id FROM code_uses WHERE code_ref = $1 AND use_number = $2", first.code_ref, 1
    )
    assert owner == first.redemption_id
    with pytest.raises(asyncpg.UniqueViolationError):
        await fresh.execute(
            "INSERT INTO code_uses (code_ref, use_number, redemption_id) VALUES ($1, 1, $2)",
            first.code_ref, clash.redemption_id,
        )  # fmt: skip
    assert (await placed(fresh))[clash.redemption_id] == f"redemptions_p{month_3:%Y_%m}"
