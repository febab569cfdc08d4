"""`rgw rebuild-redis` restores the card-secret inventory after Redis lost everything (FLUSHALL): the same stock
(counts and ids), no secret use given out before given out again, and every order as
gateway/inventory/rebuild.py documents them - a retried request gets its first answer (another request under the
order id is refused), a hold keeps its expiry, a released or expired order answers as before the loss (a late
confirm by the order's own strategy and supplier); `rgw reconcile --inventory` finds a planted difference and
--repair fixes it.

Stock comes in through the real import path (importing.import_csv); orders go through the real gateway on a
manual clock an hour behind the wall clock (the rebuild's own time, the wall clock, is then far from every
expiry the orders have: a hold restored with the rebuild's time would show); the ledger writer drains the
outboxes before the loss."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from gateway import keys
from gateway.clock import ManualClock
from gateway.inventory import importing, layout
from gateway.inventory.model import Sku, create_sku
from gateway.inventory.status import SkuStock, inventory_status
from gateway.pb.redemption.v1 import inventory_pb2 as pb
from gateway.settings import Settings
from tests.conftest import gateway_environ
from tests.integration.inventory_order_helpers import (
    InventoryGateway,
    dispense,
    error_reason,
    hold,
    taken,
)
from tests.integration.ledger_state import drain

pytestmark = pytest.mark.asyncio(loop_scope="session")

HOUR_MS = 3_600_000
Use = tuple[int, int]  # (secret id, use number)


@pytest.fixture
def clock() -> ManualClock:
    """An hour behind the wall clock: a hold restored as expiring at the rebuild (wall clock) would show."""
    return ManualClock(int(time.time() * 1000) - HOUR_MS)


def rgw(redis_url: str, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **gateway_environ(redis_url, database_url)}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


async def import_stock(db: asyncpg.Connection, redis: Redis, migrated: str, rows: list[str]) -> None:
    """The CSV rows through the real import path (encrypted, in Postgres, loaded into Redis)."""
    ring = Settings.from_env(gateway_environ("redis://unused", migrated)).secret_ring()
    lines = ["sku,supplier,secret,cost,currency,expires_at\n", *(r + "\n" for r in rows)]
    result = await importing.import_csv(db, redis, ring, 1, lines, all_or_nothing=True, actor="tests")
    assert result.refused == [] and result.imported == len(rows)


def csv_row(sku: str, n: int, *, supplier: str, cost: int) -> str:
    expires = (datetime.now(UTC) + timedelta(days=30 + n)).replace(microsecond=0).replace(tzinfo=None)
    return f"{sku},{supplier},{sku.upper()}-{uuid.uuid4().hex},{cost},CNY,{expires.isoformat()}"


def order_on(shard: int, shards: int, name: str) -> str:
    """An order id (from `name`) whose stock is taken from `shard`."""
    for n in range(1000):
        order = f"{name}-{n}"
        if layout.order_shard(order, shards) == shard:
            return order
    raise AssertionError("no order id found")


async def available(redis: Redis, sku: Sku, suppliers: list[str]) -> dict[str, set[int]]:
    """Every availability index of every shard: key -> secret ids."""
    found: dict[str, set[int]] = {}
    for shard in range(sku.shards):
        names = [layout.by_expiry_key(sku.id, shard), layout.by_cost_key(sku.id, shard)]
        for key in [*names, *(layout.by_supplier_key(sku.id, shard, s) for s in suppliers)]:
            members: Any = await redis.zrange(key, 0, -1)
            found[key] = {int(m) for m in members}
    return found


async def counters(redis: Redis, sku: Sku, ids: set[int]) -> dict[int, tuple[str, str]]:
    """(left, used) of each secret's record."""
    out: dict[int, tuple[str, str]] = {}
    for shard in range(sku.shards):
        records: Any = await redis.hgetall(layout.secrets_key(sku.id, shard))
        for secret_id, record in records.items():
            if int(secret_id) in ids:
                fields = str(record).split("|")
                out[int(secret_id)] = (fields[4], fields[5])
    return out


async def order(redis: Redis, sku: Sku, shard: int, order_id: str) -> dict[str, str]:
    found: Any = await redis.hgetall(layout.order_key(sku.id, shard, order_id))
    return {str(k): str(v) for k, v in found.items()}


def uses_of(record: dict[str, str]) -> list[Use]:
    """An order's secret uses, sorted (the rebuild lists them by secret id)."""
    return sorted((int(p.split(";")[0]), int(p.split(";")[1])) for p in record["ids"].split(",") if p)


async def status(db: asyncpg.Connection, redis: Redis, skus: list[Sku], now_ms: int) -> list[SkuStock]:
    return await inventory_status(db, redis, skus, now_ms=now_ms)


async def refused_as_reused(inv: InventoryGateway, request: pb.DispenseRequest | pb.HoldRequest) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if isinstance(request, pb.DispenseRequest):
            await inv.stub.Dispense(request)
        else:
            await inv.stub.Hold(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return error_reason(caught.value)


async def test_rebuild_after_flushall_restores_stock_orders_and_holds(
    inv: InventoryGateway, db: asyncpg.Connection, redis: Redis, redis_url: str, migrated: str, clock: ManualClock
) -> None:
    card = await create_sku(db, redis, brand_id=1, code="card", name="Card", shards=2, max_per_order=30)
    loop = await create_sku(db, redis, brand_id=1, code="loop", name="Loop", reuse=2, max_per_order=5)
    suppliers = ["sup-a", "sup-b"]
    await import_stock(db, redis, migrated, [
        *(csv_row("card", n, supplier=suppliers[n % 2], cost=100 + 50 * (n % 2)) for n in range(24)),
        *(csv_row("loop", n, supplier="sup-a", cost=300) for n in range(3)),
    ])  # fmt: skip
    loop_ids = sorted(int(r["id"]) for r in await db.fetch("SELECT id FROM secrets WHERE sku_id = $1", loop.id))
    assert len(loop_ids) == 3
    # The importer puts each secret on a random shard: the orders go where the stock is (the fuller shard has 12
    # at least, the most the orders below take from it at once; the supplier order's shard has 6 of sup-b).
    per_shard = await db.fetch("SELECT shard, supplier, count(*) AS n FROM secrets WHERE sku_id = $1"
                               " GROUP BY 1, 2", card.id)  # fmt: skip
    big = max((0, 1), key=lambda sh: sum(r["n"] for r in per_shard if r["shard"] == sh))
    most_b = max((0, 1), key=lambda sh: sum(r["n"] for r in per_shard if r["shard"] == sh and r["supplier"] == "sup-b"))

    # Before the loss: dispenses (several secrets some), holds open, released and expired by the clock.
    given: dict[str, list[Use]] = {}
    names = [order_on(big, 2, "d-one"), order_on(big, 2, "d-three"), order_on(big, 2, "d-cheap")]
    requests = {
        names[0]: dispense(names[0], "card"),
        names[1]: dispense(names[1], "card", 3),
        names[2]: dispense(names[2], "card", 2, strategy=pb.STRATEGY_CHEAPEST),
        "d-sup": dispense(order_on(most_b, 2, "d-sup"), "card", 2, strategy=pb.STRATEGY_SUPPLIER, supplier="sup-b"),
    }
    for request in requests.values():
        reply = await inv.stub.Dispense(request)
        assert reply.outcome == pb.INVENTORY_OUTCOME_DISPENSED and len(reply.secrets) == request.quantity
        given[request.order_id] = taken(reply)
    h_open, h_rel, h_exp = order_on(big, 2, "h-open"), order_on(big, 2, "h-rel"), order_on(big, 2, "h-exp")
    open_request = hold(h_open, "card", 2, ttl_s=900)
    held = await inv.stub.Hold(open_request)
    assert held.outcome == pb.INVENTORY_OUTCOME_HELD
    assert (await inv.stub.Hold(hold(h_rel, "card", 1))).outcome == pb.INVENTORY_OUTCOME_HELD
    assert (await inv.stub.Release(pb.ReleaseRequest(order_id=h_rel))).outcome == pb.INVENTORY_OUTCOME_RELEASED
    assert (await inv.stub.Hold(hold(h_exp, "card", 1, ttl_s=60))).outcome == pb.INVENTORY_OUTCOME_HELD
    # The reusable SKU: a hold takes use 1 of the earliest secret, a dispense use 2, the hold is released (use 1
    # back, use 2 still dispensed).
    assert (await inv.stub.Hold(hold("l-hold", "loop"))).outcome == pb.INVENTORY_OUTCOME_HELD
    loop_request = dispense("l-one", "loop")
    given["l-one"] = taken(await inv.stub.Dispense(loop_request))
    assert given["l-one"] == [(loop_ids[0], 2)]
    assert (await inv.stub.Release(pb.ReleaseRequest(order_id="l-hold"))).outcome == pb.INVENTORY_OUTCOME_RELEASED
    clock.advance(61_000)
    late = dispense(order_on(big, 2, "d-after"), "card")  # this call on h_exp's shard expires it
    given[late.order_id] = taken(await inv.stub.Dispense(late))
    held_uses = uses_of(await order(redis, card, big, h_open))
    assert (await order(redis, card, big, h_exp))["st"] == "expired"
    await drain(redis, migrated)
    assert await db.fetchval("SELECT count(*) FROM inventory_events WHERE kind = 'expire'") == 1

    # What matters, then the loss.
    skus = [card, loop]
    now = clock.now_ms()
    stock_before = await status(db, redis, skus, now)
    avail_before = {**await available(redis, card, suppliers), **await available(redis, loop, ["sup-a"])}
    ids_before = set().union(*avail_before.values())
    counters_before = {**await counters(redis, card, ids_before), **await counters(redis, loop, ids_before)}
    dispensed_before = {o: await order(redis, card if o != "l-one" else loop,
                                       layout.order_shard(o, 2 if o != "l-one" else 1), o) for o in given}  # fmt: skip
    open_before = await order(redis, card, big, h_open)
    assert [s.total.available for s in stock_before] == [24 - 9 - 2, 3]  # ids; the reusable one's X has 1 use left
    await redis.flushall()

    rebuilt = rgw(redis_url, migrated, "rebuild-redis")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert await redis.exists(keys.INITIALISED)

    # The same stock: counts per supplier, the ids in every index, each record's dispenses left and uses.
    assert await status(db, redis, skus, now) == stock_before
    avail_after = {**await available(redis, card, suppliers), **await available(redis, loop, ["sup-a"])}
    assert avail_after == avail_before
    assert {**await counters(redis, card, ids_before), **await counters(redis, loop, ids_before)} == counters_before
    # Fail closed: nothing given out or held is available again (a reusable secret's next use is a new one).
    given_uses = {use for uses in given.values() for use in uses}
    assert not {sid for sid, _ in given_uses if sid not in loop_ids} & ids_before
    assert not {sid for sid, _ in held_uses} & ids_before
    # The orders as the docstring has them: a dispensed order's state, secret uses and fingerprint.
    for order_id, before in dispensed_before.items():
        sku = loop if order_id == "l-one" else card
        after = await order(redis, sku, layout.order_shard(order_id, sku.shards), order_id)
        assert (after["st"], uses_of(after), after["fp"]) == ("dispensed", uses_of(before), before["fp"]), order_id
        assert after["fp"], order_id
    restored = await order(redis, card, big, h_open)
    assert (restored["st"], uses_of(restored)) == ("held", uses_of(open_before))
    assert int(restored["exp"]) == int(open_before["exp"]) == held.expires_at.ToMilliseconds()  # its own expiry
    assert await redis.zscore(layout.holds_key(card.id, big), h_open) == int(restored["exp"])
    assert (reconciled := rgw(redis_url, migrated, "reconcile", "--inventory")).returncode == 0, reconciled.stdout

    # Retries under restored order ids get their first answer; another request under one is refused.
    for request in (requests[names[1]], loop_request):
        again = await inv.stub.Dispense(request)
        assert again.replayed and taken(again) == given[request.order_id], request.order_id
    again_held = await inv.stub.Hold(open_request)
    assert again_held.replayed and again_held.expires_at == held.expires_at
    assert await refused_as_reused(inv, dispense(names[1], "card", 2)) == "ORDER_ID_REUSED"
    assert await refused_as_reused(inv, hold(h_open, "card", 1, ttl_s=900)) == "ORDER_ID_REUSED"

    # New orders take the stock left, never a use given out before; then the card is out of stock.
    fresh: list[Use] = []
    for shard in range(2):
        left = len(avail_after[layout.by_expiry_key(card.id, shard)])
        if not left:
            continue
        reply = await inv.stub.Dispense(dispense(order_on(shard, 2, "n-card"), "card", left))
        assert reply.outcome == pb.INVENTORY_OUTCOME_DISPENSED, shard
        fresh += taken(reply)
        empty = await inv.stub.Dispense(dispense(order_on(shard, 2, "n-empty"), "card"))
        assert empty.outcome == pb.INVENTORY_OUTCOME_OUT_OF_STOCK
    for quantity in (3, 2):
        reply = await inv.stub.Dispense(dispense(f"n-loop-{quantity}", "loop", quantity))
        assert reply.outcome == pb.INVENTORY_OUTCOME_DISPENSED
        fresh += taken(reply)
    assert (await inv.stub.Dispense(dispense("n-loop-empty", "loop"))).outcome == pb.INVENTORY_OUTCOME_OUT_OF_STOCK
    assert len(fresh) == len(set(fresh)) == len(ids_before - set(loop_ids)) + 5
    assert not set(fresh) & given_uses and not set(fresh) & set(held_uses)

    # The open hold expires at its own time: its stock returns, a confirm is late (no stock left: refund).
    clock.value = int(restored["exp"])
    back = await inv.stub.Dispense(dispense(order_on(big, 2, "n-back"), "card", 2))
    assert back.outcome == pb.INVENTORY_OUTCOME_DISPENSED and sorted(taken(back)) == sorted(held_uses)
    confirmed = await inv.stub.Confirm(pb.ConfirmRequest(order_id=h_open))
    assert confirmed.outcome == pb.INVENTORY_OUTCOME_HOLD_EXPIRED

    await drain(redis, migrated)
    assert await db.fetchval("SELECT count(*) FROM dispense_alarms") == 0
    assert (reconciled := rgw(redis_url, migrated, "reconcile", "--inventory")).returncode == 0, reconciled.stdout


async def test_reconcile_inventory_finds_a_planted_difference_and_repairs_it(
    inv: InventoryGateway, db: asyncpg.Connection, redis: Redis, redis_url: str, migrated: str
) -> None:
    card = await create_sku(db, redis, brand_id=1, code="card", name="Card")
    await import_stock(db, redis, migrated, [csv_row("card", n, supplier="sup-a", cost=100) for n in range(4)])
    reply = await inv.stub.Dispense(dispense("d-1", "card", 2))
    assert reply.outcome == pb.INVENTORY_OUTCOME_DISPENSED
    await drain(redis, migrated)
    clean = rgw(redis_url, migrated, "reconcile", "--inventory", "--brand", "1", "--sku", "card")
    assert clean.returncode == 0, clean.stdout
    left: Any = await redis.zrange(layout.by_expiry_key(card.id, 0), 0, -1, withscores=True)
    victim, score = int(left[0][0]), float(left[0][1])
    await redis.zrem(layout.by_cost_key(card.id, 0), str(victim))  # one index lost one secret

    found = rgw(redis_url, migrated, "reconcile", "--inventory", "--sku", "card")
    repaired = rgw(redis_url, migrated, "reconcile", "--inventory", "--sku", "card", "--repair")
    after = rgw(redis_url, migrated, "reconcile", "--inventory")

    assert found.returncode == 1 and f"secret {victim} has dispenses left but is not indexed" in found.stdout
    assert repaired.returncode == 1 and "repaired: 1" in repaired.stdout, repaired.stdout
    assert after.returncode == 0 and "repaired: 0" in after.stdout, after.stdout
    assert await redis.zscore(layout.by_cost_key(card.id, 0), str(victim)) == 100
    assert await redis.zscore(layout.by_expiry_key(card.id, 0), str(victim)) == score


# Every kind of order, lost and rebuilt ------------------------------------------------------------------------


@dataclass
class Lost:
    """One SKU (one shard: 5 secrets of sup-a, expiring first, then 3 of sup-b) and its orders, before the loss:
    d1 dispensed (2); h-exp (1 of sup-b) and h-exp2 (2 of sup-b) expired; h-rel released; h-in held (TTL 900 s),
    h-past held (TTL 60 s); then the ledger drained, FLUSHALL and `rgw rebuild-redis`."""

    sku: Sku
    requests: dict[str, pb.DispenseRequest | pb.HoldRequest]
    held: dict[str, pb.HoldResponse]
    given: dict[str, list[Use]]
    before: dict[str, dict[str, str]]  # order -> its hash
    routes: dict[str, str]  # order -> its registry entry
    sup_a: list[int]
    sup_b: list[int]


async def lose_and_rebuild(
    inv: InventoryGateway, db: asyncpg.Connection, redis: Redis, redis_url: str, migrated: str, clock: ManualClock
) -> Lost:
    card = await create_sku(db, redis, brand_id=1, code="card", name="Card", shards=1)
    await import_stock(db, redis, migrated, [
        *(csv_row("card", n, supplier="sup-a", cost=100) for n in range(5)),
        *(csv_row("card", 10 + n, supplier="sup-b", cost=200) for n in range(3)),
    ])  # fmt: skip
    ids = {s: [r["id"] for r in await db.fetch("SELECT id FROM secrets WHERE supplier = $1 ORDER BY id", s)]
           for s in ("sup-a", "sup-b")}  # fmt: skip
    requests: dict[str, pb.DispenseRequest | pb.HoldRequest] = {
        "d1": dispense("d1", "card", 2),
        "h-exp": hold("h-exp", "card", 1, ttl_s=60, strategy=pb.STRATEGY_SUPPLIER, supplier="sup-b"),
        "h-exp2": hold("h-exp2", "card", 2, ttl_s=60, strategy=pb.STRATEGY_SUPPLIER, supplier="sup-b"),
        "h-rel": hold("h-rel", "card", 1, ttl_s=900),
        "h-in": hold("h-in", "card", 1, ttl_s=900),
        "h-past": hold("h-past", "card", 1, ttl_s=60),
    }
    given = {"d1": taken(await inv.stub.Dispense(requests["d1"]))}
    held = {}
    for name in ("h-exp", "h-exp2"):
        held[name] = await inv.stub.Hold(requests[name])
    clock.advance(61_000)  # the next call on the shard expires h-exp and h-exp2 first
    for name in ("h-rel", "h-in", "h-past"):
        held[name] = await inv.stub.Hold(requests[name])
        if name == "h-rel":
            assert (await inv.stub.Release(pb.ReleaseRequest(order_id=name))).outcome == pb.INVENTORY_OUTCOME_RELEASED
    assert all(h.outcome == pb.INVENTORY_OUTCOME_HELD for h in held.values())
    before = {name: await order(redis, card, 0, name) for name in requests}
    assert {name: o["st"] for name, o in before.items()} == {
        "d1": "dispensed", "h-exp": "expired", "h-exp2": "expired", "h-rel": "released", "h-in": "held",
        "h-past": "held"}  # fmt: skip
    routes: Any = await redis.hgetall(layout.orders_key(1))
    await drain(redis, migrated)
    await redis.flushall()
    rebuilt = rgw(redis_url, migrated, "rebuild-redis")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    return Lost(card, requests, held, given, before, {str(k): str(v) for k, v in routes.items()}, ids["sup-a"],
                ids["sup-b"])  # fmt: skip


async def test_every_order_is_restored_as_it_was(
    inv: InventoryGateway, db: asyncpg.Connection, redis: Redis, redis_url: str, migrated: str, clock: ManualClock
) -> None:
    lost = await lose_and_rebuild(inv, db, redis, redis_url, migrated, clock)
    for name, before in lost.before.items():
        after = await order(redis, lost.sku, 0, name)
        assert {k: v for k, v in after.items() if k != "ids"} == {k: v for k, v in before.items() if k != "ids"}, name
        assert uses_of(after) == uses_of(before), name
    routes: Any = await redis.hgetall(layout.orders_key(1))
    assert {str(k): str(v) for k, v in routes.items()} == lost.routes
    assert all(route.split("|")[1] for route in lost.routes.values())  # each with its fingerprint
    held: Any = await redis.zrange(layout.holds_key(lost.sku.id, 0), 0, -1, withscores=True)
    assert {str(o): int(exp) for o, exp in held} == {o: int(lost.before[o]["exp"]) for o in ("h-in", "h-past")}
    assert (reconciled := rgw(redis_url, migrated, "reconcile", "--inventory")).returncode == 0, reconciled.stdout


async def test_a_dispensed_order_answers_its_retry_and_refuses_another_request(
    inv: InventoryGateway, db: asyncpg.Connection, redis: Redis, redis_url: str, migrated: str, clock: ManualClock
) -> None:
    lost = await lose_and_rebuild(inv, db, redis, redis_url, migrated, clock)
    again = await inv.stub.Dispense(lost.requests["d1"])
    assert again.outcome == pb.INVENTORY_OUTCOME_DISPENSED and again.replayed
    assert taken(again) == lost.given["d1"]
    assert await refused_as_reused(inv, dispense("d1", "card", 3)) == "ORDER_ID_REUSED"
    assert await refused_as_reused(inv, hold("d1", "card", 2)) == "ORDER_ID_REUSED"


async def test_a_hold_keeps_its_expiry(
    inv: InventoryGateway, db: asyncpg.Connection, redis: Redis, redis_url: str, migrated: str, clock: ManualClock
) -> None:
    lost = await lose_and_rebuild(inv, db, redis, redis_url, migrated, clock)
    held_in = uses_of(lost.before["h-in"])
    again = await inv.stub.Hold(lost.requests["h-in"])
    assert again.replayed and again.expires_at == lost.held["h-in"].expires_at
    # Within its TTL: Confirm dispenses the held secrets (not a late confirm).
    confirmed = await inv.stub.Confirm(pb.ConfirmRequest(order_id="h-in"))
    assert confirmed.outcome == pb.INVENTORY_OUTCOME_DISPENSED and not confirmed.late and not confirmed.replayed
    assert taken(confirmed) == held_in
    # Past its TTL: the next call on the shard expires it, its stock returns (the earliest to expire: taken next).
    clock.value = int(lost.before["h-past"]["exp"])
    back = await inv.stub.Dispense(dispense("n-back", "card"))
    assert back.outcome == pb.INVENTORY_OUTCOME_DISPENSED and taken(back) == uses_of(lost.before["h-past"])
    assert (await order(redis, lost.sku, 0, "h-past"))["st"] == "expired"
    late = await inv.stub.Confirm(pb.ConfirmRequest(order_id="h-past"))
    assert late.outcome == pb.INVENTORY_OUTCOME_DISPENSED and late.late
    await drain(redis, migrated)
    assert await db.fetchval("SELECT count(*) FROM dispense_alarms") == 0
    assert (reconciled := rgw(redis_url, migrated, "reconcile", "--inventory")).returncode == 0, reconciled.stdout


async def test_a_released_order_answers_as_released(
    inv: InventoryGateway, db: asyncpg.Connection, redis: Redis, redis_url: str, migrated: str, clock: ManualClock
) -> None:
    lost = await lose_and_rebuild(inv, db, redis, redis_url, migrated, clock)
    confirmed = await inv.stub.Confirm(pb.ConfirmRequest(order_id="h-rel"))
    assert (confirmed.outcome, confirmed.reason) == (pb.INVENTORY_OUTCOME_ORDER_NOT_FOUND, "NOT_HELD")
    released = await inv.stub.Release(pb.ReleaseRequest(order_id="h-rel"))
    assert released.outcome == pb.INVENTORY_OUTCOME_RELEASED and released.replayed and released.released == 0
    assert await refused_as_reused(inv, dispense("h-rel", "card", 1)) == "ORDER_ID_REUSED"
    assert await refused_as_reused(inv, hold("h-rel", "card", 2, ttl_s=900)) == "ORDER_ID_REUSED"
    again = await inv.stub.Hold(lost.requests["h-rel"])  # as before the loss: a Hold retried answers HELD
    assert again.replayed and again.expires_at == lost.held["h-rel"].expires_at


async def test_an_expired_order_is_confirmed_late_by_its_own_strategy(
    inv: InventoryGateway, db: asyncpg.Connection, redis: Redis, redis_url: str, migrated: str, clock: ManualClock
) -> None:
    lost = await lose_and_rebuild(inv, db, redis, redis_url, migrated, clock)
    # Available: sup-a's last secret (expiring first) and the 3 of sup-b; the order takes sup-b's, as it held.
    late = await inv.stub.Confirm(pb.ConfirmRequest(order_id="h-exp"))
    assert late.outcome == pb.INVENTORY_OUTCOME_DISPENSED and late.late and not late.replayed
    assert [s.supplier for s in late.secrets] == ["sup-b"] and taken(late) == [(lost.sup_b[0], 1)]
    assert (await inv.stub.Confirm(pb.ConfirmRequest(order_id="h-exp"))).replayed
    assert (await inv.stub.Dispense(dispense("n-b", "card", strategy=pb.STRATEGY_SUPPLIER, supplier="sup-b"))).secrets
    # One secret of sup-b is left (and one of sup-a): h-exp2's 2 of sup-b are not there.
    refund = await inv.stub.Confirm(pb.ConfirmRequest(order_id="h-exp2"))
    assert refund.outcome == pb.INVENTORY_OUTCOME_HOLD_EXPIRED
    assert await refused_as_reused(inv, dispense("h-exp2", "card", 2)) == "ORDER_ID_REUSED"
    await drain(redis, migrated)
    assert await db.fetchval("SELECT count(*) FROM dispense_alarms") == 0
    assert (reconciled := rgw(redis_url, migrated, "reconcile", "--inventory")).returncode == 0, reconciled.stdout


async def test_orders_of_events_without_the_order_fields_are_restored_failing_closed(
    inv: InventoryGateway, db: asyncpg.Connection, redis: Redis, redis_url: str, migrated: str, clock: ManualClock
) -> None:
    """Events of older gateways (recorded as migration 0009 left them: no fingerprint, expiry, strategy or
    supplier): a retry is refused as a different request, an open hold expires at the rebuild."""
    card = await create_sku(db, redis, brand_id=1, code="card", name="Card")
    await import_stock(db, redis, migrated, [csv_row("card", n, supplier="sup-a", cost=100) for n in range(3)])
    given = taken(await inv.stub.Dispense(dispense("d1", "card")))
    held = await inv.stub.Hold(hold("h1", "card", ttl_s=900))
    await drain(redis, migrated)
    await db.execute("UPDATE inventory_events SET fingerprint = '', hold_expires_at = NULL, strategy = '',"
                     " supplier = ''")  # fmt: skip
    await redis.flushall()
    started = int(time.time() * 1000)
    assert (rebuilt := rgw(redis_url, migrated, "rebuild-redis")).returncode == 0, rebuilt.stdout + rebuilt.stderr
    finished = int(time.time() * 1000)

    dispensed, open_hold = await order(redis, card, 0, "d1"), await order(redis, card, 0, "h1")
    assert (dispensed["st"], dispensed["fp"], uses_of(dispensed)) == ("dispensed", "", given)
    assert (open_hold["st"], open_hold["fp"]) == ("held", "")
    assert started <= int(open_hold["exp"]) <= finished  # not its own expiry, an hour earlier on the gateway's clock
    assert held.expires_at.ToMilliseconds() < started - HOUR_MS / 2
    assert await refused_as_reused(inv, dispense("d1", "card")) == "ORDER_ID_REUSED"
    assert await refused_as_reused(inv, hold("h1", "card", ttl_s=900)) == "ORDER_ID_REUSED"
    # The hold comes due at the rebuild's time (the wall clock, an hour ahead of the gateway's).
    clock.value = int(open_hold["exp"])
    late = await inv.stub.Confirm(pb.ConfirmRequest(order_id="h1"))
    assert late.outcome == pb.INVENTORY_OUTCOME_DISPENSED and late.late
