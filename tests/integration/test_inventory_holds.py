"""Holds through the real gateway on a real redis-server: a hold takes stock, Release and the TTL give it back (on
the shard's next call and by the sweeper), Confirm in time dispenses the held secrets, a late Confirm dispenses
from the stock there is then or answers HOLD_EXPIRED."""

from __future__ import annotations

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from gateway.clock import ManualClock
from gateway.inventory import layout
from gateway.pb.redemption.v1 import inventory_pb2 as pb
from tests.conftest import T0_MS
from tests.integration.grpc_helpers import field_violations
from tests.integration.inventory_order_helpers import (
    InventoryGateway,
    available,
    create_sku,
    dispense,
    event_secrets,
    hold,
    outbox_events,
    taken,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def held_ids(redis: Redis, sku_id: int, order: str) -> list[int]:
    ids = await redis.hget(layout.order_key(sku_id, 0, order), "ids")
    return [int(item.split(";")[0]) for item in str(ids).split(",")]


async def test_hold_takes_stock_and_release_returns_it(inv: InventoryGateway, db: asyncpg.Connection,
                                                       redis: Redis) -> None:  # fmt: skip
    stock = await create_sku(db, redis, inv.ring, "mgtv-month")
    await stock.add(redis, 3)
    held = await inv.stub.Hold(hold("h-1", "mgtv-month", 2, ttl_s=60))
    assert (held.outcome, held.reason, held.replayed) == (pb.INVENTORY_OUTCOME_HELD, "HELD", False)
    assert held.expires_at.ToMilliseconds() == T0_MS + 60_000
    again = await inv.stub.Hold(hold("h-1", "mgtv-month", 2, ttl_s=60))
    assert again.replayed and again.expires_at == held.expires_at
    assert len(await available(redis, stock)) == 1
    # two holds never take the same secret
    assert (await inv.stub.Hold(hold("h-2", "mgtv-month", 2))).outcome == pb.INVENTORY_OUTCOME_OUT_OF_STOCK
    released = await inv.stub.Release(pb.ReleaseRequest(order_id="h-1"))
    assert (released.outcome, released.reason, released.released, released.replayed) == (
        pb.INVENTORY_OUTCOME_RELEASED, "RELEASED", 2, False)  # fmt: skip
    assert await available(redis, stock) == set(stock.plain)
    twice = await inv.stub.Release(pb.ReleaseRequest(order_id="h-1"))
    assert (twice.outcome, twice.released, twice.replayed) == (pb.INVENTORY_OUTCOME_RELEASED, 0, True)
    late = await inv.stub.Confirm(pb.ConfirmRequest(order_id="h-1"))
    assert (late.outcome, late.reason) == (pb.INVENTORY_OUTCOME_ORDER_NOT_FOUND, "NOT_HELD")
    # a single-use secret held and released is use 1 of its next order
    whole = await inv.stub.Dispense(dispense("d-1", "mgtv-month", 3))
    assert sorted(taken(whole)) == [(sid, 1) for sid in sorted(stock.plain)]
    kinds = [e["kind"] for e in await outbox_events(redis, stock)]
    assert kinds == ["hold", "release", "dispense"]


async def test_confirm_in_time_dispenses_the_held_secrets(inv: InventoryGateway, db: asyncpg.Connection,
                                                          redis: Redis, clock: ManualClock) -> None:  # fmt: skip
    stock = await create_sku(db, redis, inv.ring, "iqiyi-year")
    await stock.add(redis, 4)
    await inv.stub.Hold(hold("h-1", "iqiyi-year", 2, ttl_s=60))
    reserved = await held_ids(redis, stock.sku_id, "h-1")
    clock.advance(59_999)
    confirmed = await inv.stub.Confirm(pb.ConfirmRequest(order_id="h-1"))
    assert (confirmed.outcome, confirmed.reason, confirmed.late) == (pb.INVENTORY_OUTCOME_DISPENSED, "DISPENSED", False)
    assert [sid for sid, _ in taken(confirmed)] == reserved
    assert all(s.secret == stock.plain[s.secret_id] for s in confirmed.secrets)
    replay = await inv.stub.Confirm(pb.ConfirmRequest(order_id="h-1"))
    assert replay.replayed and taken(replay) == taken(confirmed)
    clock.advance(10_000)  # past the old hold's expiry: a confirmed order is not expired
    assert (await inv.stub.Confirm(pb.ConfirmRequest(order_id="h-1"))).replayed
    not_held = await inv.stub.Release(pb.ReleaseRequest(order_id="h-1"))
    assert (not_held.outcome, not_held.reason) == (pb.INVENTORY_OUTCOME_ORDER_NOT_FOUND, "NOT_HELD")
    assert len(await available(redis, stock)) == 2
    events = await outbox_events(redis, stock)
    assert [e["kind"] for e in events] == ["hold", "confirm"]
    assert [sid for sid, _ in event_secrets(events[1])] == reserved


async def test_ttl_expiry_returns_stock_on_the_next_call(inv: InventoryGateway, db: asyncpg.Connection,
                                                         redis: Redis, clock: ManualClock) -> None:  # fmt: skip
    stock = await create_sku(db, redis, inv.ring, "mgtv-month")
    await stock.add(redis, 2)
    await inv.stub.Hold(hold("abandoned", "mgtv-month", 2, ttl_s=30))
    assert (await inv.stub.Dispense(dispense("d-1", "mgtv-month"))).outcome == pb.INVENTORY_OUTCOME_OUT_OF_STOCK
    clock.advance(30_000)
    reply = await inv.stub.Dispense(dispense("d-2", "mgtv-month", 2))
    assert reply.outcome == pb.INVENTORY_OUTCOME_DISPENSED
    order = await redis.hgetall(layout.order_key(stock.sku_id, 0, "abandoned"))
    assert order["st"] == "expired"
    assert await redis.zcard(layout.holds_key(stock.sku_id, 0)) == 0
    kinds = [e["kind"] for e in await outbox_events(redis, stock)]
    assert kinds == ["hold", "expire", "dispense"]
    gone = await inv.stub.Release(pb.ReleaseRequest(order_id="abandoned"))
    assert (gone.outcome, gone.replayed, gone.released) == (pb.INVENTORY_OUTCOME_RELEASED, True, 0)


async def test_the_sweeper_returns_stock_without_a_call(inv: InventoryGateway, db: asyncpg.Connection,
                                                        redis: Redis, clock: ManualClock) -> None:  # fmt: skip
    stock = await create_sku(db, redis, inv.ring, "mgtv-month")
    await stock.add(redis, 3)
    await inv.stub.Hold(hold("h-1", "mgtv-month", 3, ttl_s=5))
    assert inv.gateway.inventory is not None
    assert await inv.gateway.inventory.sweep() == 1  # not due yet
    clock.advance(5_000)
    assert await inv.gateway.inventory.sweep() == 0
    assert await available(redis, stock) == set(stock.plain)
    assert [e["kind"] for e in await outbox_events(redis, stock)] == ["hold", "expire"]


async def test_late_confirm_dispenses_if_stock_allows(inv: InventoryGateway, db: asyncpg.Connection,
                                                      redis: Redis, clock: ManualClock) -> None:  # fmt: skip
    stock = await create_sku(db, redis, inv.ring, "mgtv-month")
    await stock.add(redis, 3)
    await inv.stub.Hold(hold("slow", "mgtv-month", 2, ttl_s=10, strategy=pb.STRATEGY_SUPPLIER, supplier="sup-a"))
    clock.advance(10_000)
    late = await inv.stub.Confirm(pb.ConfirmRequest(order_id="slow"))
    assert (late.outcome, late.late, late.replayed) == (pb.INVENTORY_OUTCOME_DISPENSED, True, False)
    assert len(late.secrets) == 2 and all(s.supplier == "sup-a" for s in late.secrets)
    replay = await inv.stub.Confirm(pb.ConfirmRequest(order_id="slow"))
    assert replay.replayed and replay.late and taken(replay) == taken(late)
    assert len(await available(redis, stock)) == 1
    assert [e["kind"] for e in await outbox_events(redis, stock)] == ["hold", "expire", "confirm"]


async def test_late_confirm_without_stock_is_hold_expired(inv: InventoryGateway, db: asyncpg.Connection,
                                                          redis: Redis, clock: ManualClock) -> None:  # fmt: skip
    stock = await create_sku(db, redis, inv.ring, "mgtv-month")
    await stock.add(redis, 2)
    await inv.stub.Hold(hold("slow", "mgtv-month", 2, ttl_s=10))
    clock.advance(10_000)
    # the returned stock went to another order before the payment arrived
    assert (await inv.stub.Dispense(dispense("fast", "mgtv-month", 2))).outcome == pb.INVENTORY_OUTCOME_DISPENSED
    late = await inv.stub.Confirm(pb.ConfirmRequest(order_id="slow"))
    assert (late.outcome, late.reason, len(late.secrets)) == (pb.INVENTORY_OUTCOME_HOLD_EXPIRED, "HOLD_EXPIRED", 0)
    assert (await redis.hgetall(layout.order_key(stock.sku_id, 0, "slow")))["st"] == "expired"


async def test_unknown_and_other_brands_orders(inv: InventoryGateway, db: asyncpg.Connection,
                                               redis: Redis) -> None:  # fmt: skip
    stock = await create_sku(db, redis, inv.ring, "mgtv-month")
    await stock.add(redis, 2)
    await inv.stub.Hold(hold("mine", "mgtv-month", 1))
    for call in (inv.stub.Confirm(pb.ConfirmRequest(order_id="nope")),
                 inv.stub.Release(pb.ReleaseRequest(order_id="nope"))):  # fmt: skip
        reply = await call
        assert (reply.outcome, reply.reason) == (pb.INVENTORY_OUTCOME_ORDER_NOT_FOUND, "ORDER_NOT_FOUND")
    channel, theirs = inv.stub_as("other_internal")
    try:
        assert (await theirs.Release(pb.ReleaseRequest(order_id="mine"))).outcome == (
            pb.INVENTORY_OUTCOME_ORDER_NOT_FOUND)  # fmt: skip
        assert (await theirs.Confirm(pb.ConfirmRequest(order_id="mine"))).outcome == (
            pb.INVENTORY_OUTCOME_ORDER_NOT_FOUND)  # fmt: skip
    finally:
        await channel.close()
    assert len(await available(redis, stock)) == 1


async def test_bad_ttl_is_invalid(inv: InventoryGateway, db: asyncpg.Connection, redis: Redis) -> None:
    await create_sku(db, redis, inv.ring, "mgtv-month")
    for seconds in (0.5, 24 * 3600 + 1):
        request = pb.HoldRequest(order_id="t", sku="mgtv-month", quantity=1)
        request.ttl.FromMilliseconds(int(seconds * 1000))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await inv.stub.Hold(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(field_violations(caught.value)) == {"ttl"}
    unset = await inv.stub.Hold(pb.HoldRequest(order_id="t", sku="mgtv-month", quantity=1))
    assert unset.outcome == pb.INVENTORY_OUTCOME_OUT_OF_STOCK


async def test_a_held_secret_that_expired_is_not_dispensed_by_confirm(
    inv: InventoryGateway, db: asyncpg.Connection, redis: Redis, clock: ManualClock
) -> None:
    stock = await create_sku(db, redis, inv.ring, "mgtv-month")
    (short,) = await stock.add(redis, 1, expires_ms=T0_MS + 5_000)
    await inv.stub.Hold(hold("h-1", "mgtv-month", 1, ttl_s=60))
    (fresh,) = await stock.add(redis, 1)
    clock.advance(5_000)  # the hold is still on, its secret is not
    confirmed = await inv.stub.Confirm(pb.ConfirmRequest(order_id="h-1"))
    assert (confirmed.outcome, confirmed.late) == (pb.INVENTORY_OUTCOME_DISPENSED, True)
    assert taken(confirmed) == [(fresh, 1)]
    assert await available(redis, stock) == {short}
