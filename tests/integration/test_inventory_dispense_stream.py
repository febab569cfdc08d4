"""DispenseStream through the real gateway on a real redis-server: every order of a message decided exactly as
Dispense decides it (never oversold, never one secret to two orders, idempotent per order id across both paths),
one result per order in order, a bad order failing alone, a bad message ending the stream with nothing decided."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from gateway.grpc_api.client_auth import authenticated_channel
from gateway.grpc_api.stream_replies import DISPENSE_STREAM_MAX_SECRETS
from gateway.ids import uuid7
from gateway.inventory import layout
from gateway.inventory.store import BatchOrder, InventoryStore
from gateway.pb.redemption.v1 import inventory_pb2 as pb
from gateway.pb.redemption.v1 import inventory_pb2_grpc as pb_grpc
from tests.conftest import T0_MS
from tests.integration.grpc_helpers import field_violations
from tests.integration.inventory_order_helpers import (
    InventoryGateway,
    available,
    create_sku,
    dispense,
    outbox_events,
    taken,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


def message(batch_id: str, orders: Sequence[pb.DispenseRequest]) -> pb.DispenseStreamRequest:
    return pb.DispenseStreamRequest(batch_id=batch_id, items=list(orders))


async def exchange(
    stub: pb_grpc.InventoryServiceStub, messages: Sequence[pb.DispenseStreamRequest]
) -> list[pb.DispenseStreamResponse]:
    """Send the messages on one stream, one at a time (each answered before the next), and collect the replies."""
    call = stub.DispenseStream()
    replies = []
    for m in messages:
        await call.write(m)
        replies.append(await call.read())
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    return replies


async def test_a_message_answers_each_order_in_order_as_dispense_would(
    inv: InventoryGateway, db: asyncpg.Connection, redis: Redis
) -> None:
    stock = await create_sku(db, redis, inv.ring, "mgtv-month")
    await stock.add(redis, 10)
    orders = [dispense("o-1", "mgtv-month", 2), dispense("o-2", "no-such-sku"), dispense("o-3", "mgtv-month", 3),
              dispense("o-4", "mgtv-month", 11), dispense("o-5", "mgtv-month", 1)]  # fmt: skip
    # a message's orders are decided concurrently (as Dispense calls sent at once): o-4 asks more than the stock
    [reply] = await exchange(inv.stub, [message("b-1", orders)])
    assert reply.batch_id == "b-1"
    outcomes = [r.response.outcome for r in reply.results]
    assert outcomes == [pb.INVENTORY_OUTCOME_DISPENSED, pb.INVENTORY_OUTCOME_UNKNOWN_SKU,
                        pb.INVENTORY_OUTCOME_DISPENSED, pb.INVENTORY_OUTCOME_OUT_OF_STOCK,
                        pb.INVENTORY_OUTCOME_DISPENSED]  # fmt: skip
    counts = [len(r.response.secrets) for r in reply.results]
    assert counts == [2, 0, 3, 0, 1]
    given = [s for r in reply.results for s in taken(r.response)]
    assert len(set(given)) == 6
    for r in reply.results:
        for secret in r.response.secrets:
            assert secret.secret == stock.plain[secret.secret_id]
    assert len(await available(redis, stock)) == 4
    assert sorted(e["order"] for e in await outbox_events(redis, stock)) == ["o-1", "o-3", "o-5"]


async def test_a_bad_order_fails_alone_and_the_rest_are_decided(
    inv: InventoryGateway, db: asyncpg.Connection, redis: Redis
) -> None:
    stock = await create_sku(db, redis, inv.ring, "iqiyi-year")
    await stock.add(redis, 5)
    first = await inv.stub.Dispense(dispense("paid-7", "iqiyi-year", 1))
    orders = [dispense("", "iqiyi-year"), dispense("paid-7", "iqiyi-year", 2), dispense("paid-8", "iqiyi-year", 1),
              dispense("paid-9", "BAD SKU", 0)]  # fmt: skip
    [reply] = await exchange(inv.stub, [message("", orders)])
    empty_id, reused, good, bad = reply.results
    assert empty_id.WhichOneof("result") == "error" and empty_id.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [v.field for v in empty_id.error.field_violations] == ["order_id"]
    assert reused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert reused.error.reason == "ORDER_ID_REUSED"
    assert {v.field for v in bad.error.field_violations} == {"sku", "quantity"}
    assert good.response.outcome == pb.INVENTORY_OUTCOME_DISPENSED and len(good.response.secrets) == 1
    # the reused order id kept its first answer; only paid-8 took stock
    assert len(await available(redis, stock)) == 5 - 1 - 1
    again = await inv.stub.Dispense(dispense("paid-7", "iqiyi-year", 1))
    assert taken(again) == taken(first) and again.replayed


async def test_retries_on_either_path_return_the_same_secrets(
    inv: InventoryGateway, db: asyncpg.Connection, redis: Redis
) -> None:
    stock = await create_sku(db, redis, inv.ring, "tencent-month")
    await stock.add(redis, 20)
    orders = [dispense(f"pay-{n}", "tencent-month", 2) for n in range(4)]
    # the same order twice in one message, and the message sent again: one allocation per order id
    [first, second] = await exchange(inv.stub, [message("a", [*orders, orders[0]]), message("b", orders)])
    assert [r.response.replayed for r in first.results] in ([False] * 4 + [True], [True] + [False] * 3 + [False])
    for n in range(4):
        assert taken(second.results[n].response) == taken(first.results[n].response)
        assert second.results[n].response.replayed
    assert taken(first.results[4].response) == taken(first.results[0].response)
    unary = await inv.stub.Dispense(dispense("pay-2", "tencent-month", 2))
    assert taken(unary) == taken(first.results[2].response) and unary.replayed
    assert len(await available(redis, stock)) == 20 - 8
    assert len(await outbox_events(redis, stock)) == 4


async def test_race_stock_50_orders_200_over_20_streams(
    inv: InventoryGateway, db: asyncpg.Connection, redis: Redis
) -> None:
    stock = await create_sku(db, redis, inv.ring, "mgtv-year")
    await stock.add(redis, 50)
    channels = [authenticated_channel(inv.target, inv.tenants.keys["internal"]) for _ in range(20)]
    try:
        # 20 streams, each 2 messages of 5 orders: 200 orders for 50 secrets, all at once
        batches = await asyncio.gather(*(
            exchange(pb_grpc.InventoryServiceStub(channels[s]), [
                message(f"{s}-{m}", [dispense(f"race-{s}-{m}-{i}", "mgtv-year") for i in range(5)]) for m in range(2)
            ]) for s in range(20)
        ))  # fmt: skip
    finally:
        for channel in channels:
            await channel.close()
    results = [r for replies in batches for reply in replies for r in reply.results]
    assert len(results) == 200
    outcomes = [r.response.outcome for r in results]
    assert outcomes.count(pb.INVENTORY_OUTCOME_DISPENSED) == 50
    assert outcomes.count(pb.INVENTORY_OUTCOME_OUT_OF_STOCK) == 150
    given = [s for r in results for s in taken(r.response)]
    assert len(given) == len(set(given)) == 50
    assert {sid for sid, _ in given} == set(stock.plain)
    events = await outbox_events(redis, stock)
    assert sorted(s for e in events for s in _event_ids(e)) == sorted(sid for sid, _ in given)
    assert await available(redis, stock) == set()


def _event_ids(event: dict[str, str]) -> list[int]:
    return [int(item.split(";")[0]) for item in event["secrets"].split(",") if item]


@pytest.mark.parametrize(
    ("orders", "field"),
    [
        ([dispense(f"x-{n}", "mgtv-month") for n in range(65)], "items"),  # over RGW_STREAM_MAX_ITEMS (64)
        ([dispense(f"y-{n}", "mgtv-month", 100) for n in range(11)], "items"),  # 1,100 secrets asked in all
    ],
)
async def test_a_message_over_a_limit_ends_the_stream_and_decides_nothing(
    inv: InventoryGateway, db: asyncpg.Connection, redis: Redis, orders: list[pb.DispenseRequest], field: str
) -> None:
    assert sum(o.quantity for o in orders) > DISPENSE_STREAM_MAX_SECRETS or len(orders) > 64
    stock = await create_sku(db, redis, inv.ring, "mgtv-month")
    await stock.add(redis, 30)
    call = inv.stub.DispenseStream()
    await call.write(message("ok", [dispense("before", "mgtv-month")]))
    assert (await call.read()).results[0].response.outcome == pb.INVENTORY_OUTCOME_DISPENSED
    await call.write(message("too-big", orders))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    call.cancel()  # the client's side of the ended call
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(refused.value)) == [field]
    assert len(await available(redis, stock)) == 29
    assert [e["order"] for e in await outbox_events(redis, stock)] == ["before"]


async def test_a_bad_batch_id_ends_the_stream(inv: InventoryGateway, db: asyncpg.Connection, redis: Redis) -> None:
    stock = await create_sku(db, redis, inv.ring, "mgtv-month")
    await stock.add(redis, 3)
    call = inv.stub.DispenseStream()
    await call.write(message("bad batch id!", [dispense("z-1", "mgtv-month")]))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    call.cancel()  # the client's side of the ended call
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(refused.value)) == ["batch_id"]
    assert len(await available(redis, stock)) == 3


async def test_other_roles_may_not_open_the_stream(inv: InventoryGateway) -> None:
    async with authenticated_channel(inv.target, inv.tenants.keys["pos"]) as channel:
        call = pb_grpc.InventoryServiceStub(channel).DispenseStream()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.write(message("p", [dispense("pos-1", "mgtv-month")]))
            await call.read()
        call.cancel()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_orders_over_several_shards_of_a_sku_each_take_their_shards_stock(
    inv: InventoryGateway, db: asyncpg.Connection, redis: Redis
) -> None:
    stock = await create_sku(db, redis, inv.ring, "youku-month", shards=3)
    for shard in range(3):
        await stock.add(redis, 4, shard=shard)
    orders = [dispense(f"multi-{n}", "youku-month") for n in range(9)]
    [reply] = await exchange(inv.stub, [message("m", orders)])
    assert [r.response.outcome for r in reply.results] == [pb.INVENTORY_OUTCOME_DISPENSED] * 9
    for order, result in zip(orders, reply.results, strict=True):
        shard = layout.order_shard(order.order_id, 3)
        [(secret_id, _)] = taken(result.response)
        assert await redis.exists(layout.order_key(stock.sku_id, shard, order.order_id))
        assert result.response.secrets[0].secret == stock.plain[secret_id]
    given = [s for r in reply.results for s in taken(r.response)]
    assert len(set(given)) == 9


async def test_another_brands_shard_answers_unknown_sku_to_every_order_and_changes_nothing(
    inv: InventoryGateway, db: asyncpg.Connection, redis: Redis
) -> None:
    """The script's own tenant check (a request routed to another brand's SKU shard, as a stale directory could)."""
    stock = await create_sku(db, redis, inv.ring, "mgtv-month")
    await stock.add(redis, 5)
    store = InventoryStore(redis)
    orders = [BatchOrder(f"foreign-{n}", "f" * 32, 1, "expiry", "", uuid7(T0_MS)) for n in range(3)]
    answers = await store.dispense_many(T0_MS, 2, stock.sku_id, 0, "intruder", orders)
    assert [a.status for a in answers] == ["UNKNOWN_SKU"] * 3
    assert len(await available(redis, stock)) == 5
    assert await outbox_events(redis, stock) == []
    assert not await redis.exists(layout.order_key(stock.sku_id, 0, "foreign-0"))
