"""Dispense through the real gateway on a real redis-server: never oversold, never one secret (use) to two orders,
idempotent per (brand, order id), strategies in order, expired secrets never given, all or nothing, tenants
isolated."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from gateway.clock import ManualClock
from gateway.grpc_api.client_auth import authenticated_channel
from gateway.inventory import layout
from gateway.pb.redemption.v1 import inventory_pb2 as pb
from gateway.pb.redemption.v1 import inventory_pb2_grpc as pb_grpc
from tests.conftest import T0_MS
from tests.integration.grpc_helpers import field_violations
from tests.integration.inventory_order_helpers import (
    DAY_MS,
    InventoryGateway,
    available,
    create_sku,
    dispense,
    error_reason,
    event_secrets,
    outbox_events,
    taken,
)

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.single_and_cluster]


async def test_race_stock_50_orders_200_over_20_channels(inv: InventoryGateway, db: asyncpg.Connection,
                                                         redis: Redis) -> None:  # fmt: skip
    stock = await create_sku(db, redis, inv.ring, "mgtv-month")
    await stock.add(redis, 50)
    channels = [authenticated_channel(inv.target, inv.tenants.keys["internal"]) for _ in range(20)]
    stubs = [pb_grpc.InventoryServiceStub(c) for c in channels]
    try:
        replies = await asyncio.gather(
            *(stubs[i % 20].Dispense(dispense(f"order-{i}", "mgtv-month")) for i in range(200))
        )
    finally:
        for channel in channels:
            await channel.close()
    outcomes = [r.outcome for r in replies]
    assert outcomes.count(pb.INVENTORY_OUTCOME_DISPENSED) == 50
    assert outcomes.count(pb.INVENTORY_OUTCOME_OUT_OF_STOCK) == 150
    given = [s for r in replies for s in taken(r)]
    assert len(given) == 50 and len(set(given)) == 50
    assert {sid for sid, _ in given} == set(stock.plain)
    for reply in replies:
        for secret in reply.secrets:
            assert secret.secret == stock.plain[secret.secret_id]
            assert secret.use_number == 1 and secret.supplier == "sup-a"
    events = await outbox_events(redis, stock)
    assert [e["kind"] for e in events] == ["dispense"] * 50
    in_events = [s for e in events for s in event_secrets(e)]
    assert sorted(in_events) == sorted(given)
    assert len({e["order"] for e in events}) == 50
    assert await available(redis, stock) == set()


async def test_same_order_retried_concurrently_is_one_allocation(inv: InventoryGateway, db: asyncpg.Connection,
                                                                 redis: Redis) -> None:  # fmt: skip
    stock = await create_sku(db, redis, inv.ring, "iqiyi-year")
    await stock.add(redis, 10)
    replies = await asyncio.gather(*(inv.stub.Dispense(dispense("paid-1", "iqiyi-year", 3)) for _ in range(50)))
    assert {r.outcome for r in replies} == {pb.INVENTORY_OUTCOME_DISPENSED}
    answers = {tuple((s.secret_id, s.secret, s.use_number) for s in r.secrets) for r in replies}
    assert len(answers) == 1
    assert [r.replayed for r in replies].count(False) == 1
    assert len(await available(redis, stock)) == 7
    assert len(await outbox_events(redis, stock)) == 1


async def test_same_order_id_with_another_request_is_refused(inv: InventoryGateway, db: asyncpg.Connection,
                                                             redis: Redis) -> None:  # fmt: skip
    stock = await create_sku(db, redis, inv.ring, "mgtv-month")
    await stock.add(redis, 5)
    first = await inv.stub.Dispense(dispense("o-1", "mgtv-month", 1))
    assert first.outcome == pb.INVENTORY_OUTCOME_DISPENSED
    for other in (dispense("o-1", "mgtv-month", 2), dispense("o-1", "mgtv-month", 1, strategy=pb.STRATEGY_CHEAPEST)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await inv.stub.Dispense(other)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(caught.value) == "ORDER_ID_REUSED"
        assert "order_id" in field_violations(caught.value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await inv.stub.Hold(pb.HoldRequest(order_id="o-1", sku="mgtv-month", quantity=1))
    assert error_reason(caught.value) == "ORDER_ID_REUSED"
    again = await inv.stub.Dispense(dispense("o-1", "mgtv-month", 1))
    assert again.replayed and taken(again) == taken(first)
    assert len(await available(redis, stock)) == 4


async def test_strategies_on_mixed_expiries_and_costs(inv: InventoryGateway, db: asyncpg.Connection,
                                                      redis: Redis) -> None:  # fmt: skip
    stock = await create_sku(db, redis, inv.ring, "mix")
    late_cheap = await stock.add(redis, supplier="sup-a", cost=50, expires_ms=T0_MS + 30 * DAY_MS)
    soon_dear = await stock.add(redis, supplier="sup-b", cost=300, expires_ms=T0_MS + 2 * DAY_MS)
    mid_mid = await stock.add(redis, supplier="sup-b", cost=100, expires_ms=T0_MS + 10 * DAY_MS)
    expired_cheapest = await stock.add(redis, supplier="sup-a", cost=1, expires_ms=T0_MS - 1)
    soonest_a = await stock.add(redis, supplier="sup-a", cost=200, expires_ms=T0_MS + 5 * DAY_MS)

    first = await inv.stub.Dispense(dispense("e-1", "mix", 2, strategy=pb.STRATEGY_EARLIEST_EXPIRY))
    assert [sid for sid, _ in taken(first)] == soon_dear + soonest_a
    cheap = await inv.stub.Dispense(dispense("c-1", "mix", 1, strategy=pb.STRATEGY_CHEAPEST))
    assert [sid for sid, _ in taken(cheap)] == late_cheap
    by_sup = await inv.stub.Dispense(dispense("s-1", "mix", 1, strategy=pb.STRATEGY_SUPPLIER, supplier="sup-b"))
    assert [sid for sid, _ in taken(by_sup)] == mid_mid
    assert by_sup.secrets[0].supplier == "sup-b"
    assert by_sup.secrets[0].expires_at.ToMilliseconds() == T0_MS + 10 * DAY_MS
    # only the expired one is left: never dispensed, by any strategy
    for i, strategy in enumerate((pb.STRATEGY_EARLIEST_EXPIRY, pb.STRATEGY_CHEAPEST)):
        left = await inv.stub.Dispense(dispense(f"x-{i}", "mix", 1, strategy=strategy))
        assert left.outcome == pb.INVENTORY_OUTCOME_OUT_OF_STOCK and left.reason == "OUT_OF_STOCK"
    none_a = await inv.stub.Dispense(dispense("x-s", "mix", 1, strategy=pb.STRATEGY_SUPPLIER, supplier="sup-a"))
    assert none_a.outcome == pb.INVENTORY_OUTCOME_OUT_OF_STOCK
    assert await available(redis, stock) == set(expired_cheapest)


async def test_a_secret_expiring_is_never_dispensed_after(inv: InventoryGateway, db: asyncpg.Connection,
                                                          redis: Redis, clock: ManualClock) -> None:  # fmt: skip
    stock = await create_sku(db, redis, inv.ring, "short")
    await stock.add(redis, 1, expires_ms=T0_MS + 1000)
    clock.advance(1000)  # expiry is exclusive: at the expiry ms it is gone
    reply = await inv.stub.Dispense(dispense("late", "short"))
    assert reply.outcome == pb.INVENTORY_OUTCOME_OUT_OF_STOCK


async def test_all_or_nothing(inv: InventoryGateway, db: asyncpg.Connection, redis: Redis) -> None:
    stock = await create_sku(db, redis, inv.ring, "few")
    await stock.add(redis, 4)
    before = await redis.hgetall(layout.secrets_key(stock.sku_id, 0))
    reply = await inv.stub.Dispense(dispense("five", "few", 5))
    assert reply.outcome == pb.INVENTORY_OUTCOME_OUT_OF_STOCK and not reply.secrets
    assert await redis.hgetall(layout.secrets_key(stock.sku_id, 0)) == before
    assert len(await available(redis, stock)) == 4
    assert await outbox_events(redis, stock) == []
    # the same order retried once stock suffices: a decline recorded nothing
    await stock.add(redis, 1)
    again = await inv.stub.Dispense(dispense("five", "few", 5))
    assert again.outcome == pb.INVENTORY_OUTCOME_DISPENSED and len(again.secrets) == 5 and not again.replayed


async def test_limit_unknown_and_other_brands_sku_take_nothing(inv: InventoryGateway, db: asyncpg.Connection,
                                                               redis: Redis) -> None:  # fmt: skip
    stock = await create_sku(db, redis, inv.ring, "capped", max_per_order=2)
    await stock.add(redis, 5)
    theirs = await create_sku(db, redis, inv.ring, "theirs", brand_id=inv.tenants.other_brand)
    await theirs.add(redis, 5)
    above = await inv.stub.Dispense(dispense("q-3", "capped", 3))
    assert (above.outcome, above.reason) == (pb.INVENTORY_OUTCOME_QUANTITY_ABOVE_LIMIT, "QUANTITY_ABOVE_LIMIT")
    unknown = await inv.stub.Dispense(dispense("u-1", "no-such-sku"))
    assert (unknown.outcome, unknown.reason) == (pb.INVENTORY_OUTCOME_UNKNOWN_SKU, "UNKNOWN_SKU")
    other = await inv.stub.Dispense(dispense("t-1", "theirs"))
    assert other.outcome == pb.INVENTORY_OUTCOME_UNKNOWN_SKU
    assert len(await available(redis, stock)) == 5 and len(await available(redis, theirs)) == 5
    # the owner of it may; a platform client acts for the brand it names
    channel, stub = inv.stub_as("other_internal")
    platform, as_platform = inv.stub_as("platform", x_rgw_brand=str(inv.tenants.other_brand))
    try:
        assert (await stub.Dispense(dispense("t-1", "theirs"))).outcome == pb.INVENTORY_OUTCOME_DISPENSED
        assert (await as_platform.Dispense(dispense("t-2", "theirs"))).outcome == pb.INVENTORY_OUTCOME_DISPENSED
    finally:
        await channel.close()
        await platform.close()


async def test_reusable_secret_three_orders_never_twice_to_one(inv: InventoryGateway, db: asyncpg.Connection,
                                                               redis: Redis) -> None:  # fmt: skip
    stock = await create_sku(db, redis, inv.ring, "loop", reuse=3)
    (sid,) = await stock.add(redis, 1, reuse=3)
    two = await inv.stub.Dispense(dispense("r-0", "loop", 2))
    assert two.outcome == pb.INVENTORY_OUTCOME_OUT_OF_STOCK  # one secret: never twice to one order
    replies = [await inv.stub.Dispense(dispense(f"r-{i}", "loop")) for i in range(1, 5)]
    assert [taken(r) for r in replies[:3]] == [[(sid, 1)], [(sid, 2)], [(sid, 3)]]
    assert all(r.secrets[0].secret == stock.plain[sid] for r in replies[:3])
    assert replies[3].outcome == pb.INVENTORY_OUTCOME_OUT_OF_STOCK
    assert await available(redis, stock) == set()


async def test_roles_and_bad_requests(inv: InventoryGateway, db: asyncpg.Connection, redis: Redis) -> None:
    await create_sku(db, redis, inv.ring, "mgtv-month")
    channel, pos = inv.stub_as("pos")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await pos.Dispense(dispense("p-1", "mgtv-month"))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await channel.close()
    bad = pb.DispenseRequest(order_id="bad id!", sku="", quantity=0, strategy=pb.STRATEGY_SUPPLIER)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await inv.stub.Dispense(bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {"order_id", "sku", "quantity", "supplier"}
    stray = pb.DispenseRequest(order_id="s", sku="mgtv-month", quantity=1, supplier="sup-a")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await inv.stub.Dispense(stray)
    assert set(field_violations(caught.value)) == {"supplier"}
