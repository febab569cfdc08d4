"""Terminal sightings: noted in memory on calls, written in one statement per interval, registered terminals only."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import pytest

from gateway.dev.servers import free_port
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.tenancy.sightings import Sightings, flush, flush_once
from tests.conftest import T0_MS
from tests.integration.conftest import Issue, RunningGateway, Tenants


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
    unreachable = await asyncpg.create_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/x", min_size=0)
    try:
        await flush_once(sightings, unreachable)
    finally:
        await unreachable.close()
    assert sightings.take() == {(1, "store-1", "till-1"): T0_MS}
    assert "not recorded" in caplog.text


async def test_calls_through_the_gateway_are_sighted(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection
) -> None:
    issued = await issue(1)
    await gateway.stub.Validate(pb.ValidateRequest(code=issued.codes[0], store_id="store-1", terminal_id="till-1"))
    await flush_once(gateway.gateway.sightings, gateway.gateway.pool)
    assert await _seen(db, gateway.tenants.terminal.id) == (_at(T0_MS), _at(T0_MS))
