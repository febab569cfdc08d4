"""Terminal sightings: noted in memory on calls, written in one statement per interval, registered terminals only."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import pytest

from gateway.tenancy.sightings import Sightings, flush, flush_once
from tests.conftest import T0_MS
from tests.integration.conftest import Tenants


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


async def _seen(db: asyncpg.Connection, terminal_id: int) -> tuple[datetime | None, datetime | None]:
    row = await db.fetchrow("SELECT first_seen_at, last_seen_at FROM terminals WHERE id = $1", terminal_id)
    assert row is not None
    return row["first_seen_at"], row["last_seen_at"]


async def test_first_and_last_seen_of_registered_terminals_only(db: asyncpg.Connection, tenants: Tenants) -> None:
    sightings = Sightings()
    sightings.saw(1, "store-1", "till-1", T0_MS + 5_000)
    sightings.saw(1, "store-1", "till-1", T0_MS)  # an older sighting does not move last_seen back
    sightings.saw(1, "store-1", "unregistered", T0_MS)
    sightings.saw(tenants.other_brand, "store-1", "till-1", T0_MS)  # another brand's store of the same name
    assert await flush(db, sightings.take()) == 1
    assert await _seen(db, tenants.terminal.id) == (_at(T0_MS + 5_000), _at(T0_MS + 5_000))

    sightings.saw(1, "store-1", "till-1", T0_MS + 60_000)
    await flush(db, sightings.take())
    assert await _seen(db, tenants.terminal.id) == (_at(T0_MS + 5_000), _at(T0_MS + 60_000))
    assert await db.fetchval("SELECT count(*) FROM terminals WHERE last_seen_at IS NOT NULL") == 1


def test_memory_is_bounded_per_interval() -> None:
    sightings = Sightings(limit=3)
    for n in range(10):
        sightings.saw(1, "s", f"t{n}", T0_MS)
    sightings.saw(1, "s", "t0", T0_MS + 1)  # one already noted is still updated
    assert sightings.take() == {(1, "s", "t0"): T0_MS + 1, (1, "s", "t1"): T0_MS, (1, "s", "t2"): T0_MS}


async def test_a_failed_flush_keeps_its_sightings(caplog: pytest.LogCaptureFixture) -> None:
    sightings = Sightings()
    sightings.saw(1, "store-1", "till-1", T0_MS)

    async def unreachable() -> asyncpg.Connection:
        raise OSError("connection refused")

    await flush_once(sightings, unreachable)
    assert sightings.take() == {(1, "store-1", "till-1"): T0_MS}
    assert "not recorded" in caplog.text
