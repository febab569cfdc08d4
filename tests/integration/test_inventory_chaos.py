"""Chaos test of the card-secret inventory (issue 12): kill -9 of the gateway and of Redis (AOF appendfsync always)
during dispensing loses no acknowledged dispense and duplicates none.

Real processes: `rgw serve` and `rgw writer` subprocesses, a redis-server of the test's own (AOF always) and the
test Postgres. The stock comes in through the real path (`rgw sku create`, `rgw inventory import` of a CSV). A load
client dispenses to fresh order ids (1 to 3 secrets each, both strategies, some order ids sent twice at once, some
repeated after their answer, as a repeated payment notice would; a third of the orders by DispenseStream, the
rest by Dispense, a retry on the path its order started on) while the gateway is SIGKILLed and restarted, then
redis-server is SIGKILLed and restarted on its data directory, then the gateway again. The contract: a call that
failed in transit (UNAVAILABLE, DEADLINE_EXCEEDED, a reset stream) is retried with the same order id and request
until it is answered (on the stream: also an item answered UNAVAILABLE). Afterwards:
- every order was answered DISPENSED (the stock is ample), with the same secrets (ids, use numbers, plaintexts) on
  every answer it got, the plaintexts being the imported ones;
- no secret use is in two orders: in the answers, in Redis's order records, in the ledger (`dispenses`, no
  `dispense_alarms` row);
- every acknowledged dispense is in Redis after the restarts (its order record, its secrets out of the stock) and
  in the ledger once the writer drained the outboxes (one dispense event per order, its uses in `dispenses`).
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from gateway.dev.servers import RedisServer
from gateway.durability import mark_initialised
from gateway.inventory import layout
from gateway.inventory.crypto import associated_data
from gateway.ledger.outbox import deadletter_key_for
from gateway.pb.redemption.v1 import inventory_pb2 as pb
from gateway.pb.redemption.v1 import inventory_pb2_grpc as pb_grpc
from gateway.redis_client import connect_server as connect
from gateway.settings import Settings
from gateway.tenancy.model import DEFAULT_BRAND_ID
from tests.integration.chaos_helpers import (
    LEDGER_DEADLINE_S,
    TRANSPORT_FAILURES,
    Rig,
    pending_of,
    report,
    rig,
    sigkill,
)

SHARDS = 2
STOCK = 3000  # more than the load can take (12 workers, one order per 0.1 s at most, 3 secrets at most, 8 s)
SECRET = tuple[int, int, str]  # (secret id, use number, plaintext)
STRATEGIES = (pb.STRATEGY_EARLIEST_EXPIRY, pb.STRATEGY_CHEAPEST)
# Redis kills make the gateway's calls fail fast (1 s timeouts), its health follows quickly.
KNOBS = {"RGW_REDIS_DURABILITY": "always", "RGW_REDIS_TIMEOUT_SECONDS": "1", "RGW_HEALTH_INTERVAL_SECONDS": "0.2"}


# --- the load client -------------------------------------------------------------------------------------------


class _ItemUnavailable(Exception):
    """A DispenseStream item answered UNAVAILABLE: retried with the same order id, as a failure in transit."""


class _ItemFailed(Exception):
    """A DispenseStream item answered with any other error: a bug here."""


@dataclass
class Answer:
    outcome: int
    reason: str
    secrets: tuple[SECRET, ...]
    replayed: bool


@dataclass
class Order:
    """One order id, its request, and every answer and failure it got."""

    request: pb.DispenseRequest
    via_stream: bool = False  # sent as a one-order DispenseStream message, not by Dispense
    answers: list[Answer] = field(default_factory=list)
    in_transit: int = 0  # calls that failed in transit (retried with the same request)
    other_failures: list[str] = field(default_factory=list)  # anything else: a bug

    @property
    def order_id(self) -> str:
        return str(self.request.order_id)


@dataclass
class DispenseLoad:
    stub: pb_grpc.InventoryServiceStub
    sku: str
    workers: int = 12
    timeout: float = 2.0
    orders: dict[str, Order] = field(default_factory=dict)
    rng: random.Random = field(default_factory=lambda: random.Random(12))
    calls: int = 0
    transit_starts: list[float] = field(default_factory=list)

    async def _call(self, order: Order) -> pb.DispenseResponse:
        if not order.via_stream:
            reply: pb.DispenseResponse = await self.stub.Dispense(order.request, timeout=self.timeout)
            return reply
        message = pb.DispenseStreamRequest(batch_id=order.order_id[-16:], items=[order.request])
        replies = [r async for r in self.stub.DispenseStream(iter([message]), timeout=self.timeout)]
        [result] = replies[0].results
        if result.WhichOneof("result") == "error":
            if result.error.code == grpc.StatusCode.UNAVAILABLE.value[0]:
                raise _ItemUnavailable
            raise _ItemFailed(f"item error {result.error.code}: {result.error.reason}")
        response: pb.DispenseResponse = result.response
        return response

    async def send(self, order: Order) -> Answer:
        """Send the order's request until it is answered: a failure in transit is retried with the same order id
        and request (the contract); any other failure is recorded and ends the order."""
        while True:
            self.calls += 1
            try:
                reply = await self._call(order)
            except (grpc.aio.AioRpcError, _ItemUnavailable) as exc:
                if isinstance(exc, _ItemUnavailable) or (
                    exc.code() in TRANSPORT_FAILURES and not str(exc.details()).startswith("internal error")
                ):
                    order.in_transit += 1
                    self.transit_starts.append(time.monotonic())
                    await asyncio.sleep(0.1)
                    continue
                order.other_failures.append(f"{exc.code()}: {str(exc.details())[:120]}")
                return Answer(-1, "", (), False)
            except _ItemFailed as exc:
                order.other_failures.append(str(exc))
                return Answer(-1, "", (), False)
            answer = Answer(
                int(reply.outcome),
                reply.reason,
                tuple((s.secret_id, s.use_number, s.secret) for s in reply.secrets),
                reply.replayed,
            )
            order.answers.append(answer)
            return answer

    async def run(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(self._worker(n, until) for n in range(self.workers)))

    async def _worker(self, n: int, until: float) -> None:
        while time.monotonic() < until:
            request = pb.DispenseRequest(
                order_id=f"chaos-{n}-{uuid.uuid4().hex[:16]}",
                sku=self.sku,
                quantity=self.rng.randint(1, 3),
                strategy=self.rng.choice(STRATEGIES),
            )
            order = self.orders[request.order_id] = Order(request, via_stream=self.rng.random() < 0.34)
            roll = self.rng.random()
            if roll < 0.15:  # the same payment notice twice at once
                await asyncio.gather(self.send(order), self.send(order))
            else:
                await self.send(order)
            if roll > 0.8:  # and again after the answer
                await self.send(order)
            await asyncio.sleep(0.1)  # bounded: every order must find stock


# --- stock through the real path -------------------------------------------------------------------------------


def rgw(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], env={**os.environ, **env}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"rgw {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done.stdout


def import_stock(env: dict[str, str], tmp_path: Path, code: str) -> tuple[int, set[str]]:
    """`rgw sku create` and `rgw inventory import` of STOCK fresh secrets (mixed costs, expiries, suppliers);
    the SKU's id and the plaintexts."""
    created = rgw(env, "sku", "create", "--brand", str(DEFAULT_BRAND_ID), "--code", code, "--name", "chaos",
                  "--shards", str(SHARDS), "--max-per-order", "5")  # fmt: skip
    sku_id = int(created.split("\t")[0])
    now = datetime.now(UTC).replace(microsecond=0)
    plain = {f"CHAOS-{uuid.uuid4().hex}" for _ in range(STOCK)}
    rows = [
        f"{code},sup-{i % 3},{secret},{100 + (i * 37) % 500},CNY,{(now + timedelta(days=30 + i % 60)).isoformat()}"
        for i, secret in enumerate(sorted(plain))
    ]
    path = tmp_path / "stock.csv"
    path.write_text("sku,supplier,secret,cost,currency,expires_at\n" + "\n".join(rows) + "\n")
    out = rgw(env, "inventory", "import", "--brand", str(DEFAULT_BRAND_ID), "--file", str(path), "--all-or-nothing")
    assert f"imported {STOCK} secret(s)" in out, out
    return sku_id, plain


async def plaintexts(db: asyncpg.Connection, env: dict[str, str], sku_id: int) -> dict[int, str]:
    """secret id -> plaintext, decrypted from Postgres with the gateway's own key ring."""
    ring = Settings.from_env(env).secret_ring()
    rows = await db.fetch("SELECT id, brand_id, key_id, nonce, ciphertext FROM secrets WHERE sku_id = $1", sku_id)
    return {
        r["id"]: ring.decrypt(r["key_id"], r["nonce"], r["ciphertext"], associated_data(r["brand_id"], sku_id))
        for r in rows
    }


# --- Redis and ledger state ------------------------------------------------------------------------------------


def parse_ids(ids: str) -> set[tuple[int, int]]:
    return {(int(p.split(";")[0]), int(p.split(";")[1])) for p in ids.split(",") if p}


async def redis_orders(redis: Redis, sku_id: int) -> dict[str, dict[str, str]]:
    """Every order record of the SKU in Redis: order id -> its hash."""
    found: dict[str, dict[str, str]] = {}
    for shard in range(SHARDS):
        prefix = layout.order_key(sku_id, shard, "")
        async for key in redis.scan_iter(match=prefix.replace("{", "\\{").replace("}", "\\}") + "*", count=1000):
            record: Any = await redis.hgetall(key)
            found[str(key).removeprefix(prefix)] = {str(k): str(v) for k, v in record.items()}
    return found


async def still_available(redis: Redis, sku_id: int) -> set[int]:
    ids: set[int] = set()
    for shard in range(SHARDS):
        for key in (layout.by_expiry_key(sku_id, shard), layout.by_cost_key(sku_id, shard)):
            members: Any = await redis.zrange(key, 0, -1)
            ids |= {int(m) for m in members}
    return ids


async def wait_for_inventory_ledger(redis: Redis, sku_id: int) -> float:
    """Seconds until every shard's outbox is empty with nothing pending (the ledger is then final)."""
    started = time.monotonic()
    streams = [layout.outbox_key(sku_id, shard) for shard in range(SHARDS)]
    while True:
        left = [(int(await redis.xlen(s)), await pending_of(redis, s)) for s in streams if await redis.exists(s)]
        if all(backlog == 0 and pending == 0 for backlog, pending in left):
            return time.monotonic() - started
        if time.monotonic() - started > LEDGER_DEADLINE_S:
            pytest.fail(f"inventory outboxes not drained in {LEDGER_DEADLINE_S:.0f}s: {left}")
        await asyncio.sleep(0.1)


# --- the test --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_gateway_and_redis_killed_while_dispensing_lose_and_duplicate_nothing(
    db: asyncpg.Connection, migrated: str, tmp_path: Path
) -> None:
    server = await asyncio.to_thread(RedisServer.start, data_dir=tmp_path / "redis", appendonly=True,
                                     appendfsync="always")  # fmt: skip
    client = connect(server.url, pool_size=8, timeout_s=5)
    try:
        await mark_initialised(client, "test")
        async with rig(tmp_path, server.url, migrated, **KNOBS) as r:
            await _dispense_through_kills(r, server, client, db)
    finally:
        await client.aclose()
        await asyncio.to_thread(server.stop)


async def _dispense_through_kills(r: Rig, server: RedisServer, client: Redis, db: asyncpg.Connection) -> None:
    code = f"chaos-{uuid.uuid4().hex[:8]}"
    sku_id, imported = await asyncio.to_thread(import_stock, r.procs.env, r.procs.log_dir, code)
    writer = r.procs.start("writer", "writer", RGW_WRITER_CONSUMER="writer")
    gateway = await r.start_gateway("gateway-1")
    load = DispenseLoad(pb_grpc.InventoryServiceStub(r.channel), code)
    running = r.spawn(load.run(seconds=8))
    downs: dict[str, float] = {}

    await asyncio.sleep(1.5)
    killed_at = time.monotonic()
    sigkill(gateway)
    gateway = await r.start_gateway("gateway-2")  # same port
    downs["gateway-1"] = time.monotonic() - killed_at

    await asyncio.sleep(1.5)
    killed_at = time.monotonic()
    await asyncio.to_thread(server.kill)  # SIGKILL: the AOF (fsync always) holds every acknowledged write
    await asyncio.sleep(0.7)
    await asyncio.to_thread(server.restart)  # same data dir: replays the AOF
    await client.connection_pool.disconnect()  # this test's own connections died with the server
    downs["redis"] = time.monotonic() - killed_at

    await asyncio.sleep(1.5)
    killed_at = time.monotonic()
    sigkill(gateway)
    gateway = await r.start_gateway("gateway-3")
    downs["gateway-2"] = time.monotonic() - killed_at
    await running  # each worker finishes its order: retried until answered

    orders = load.orders
    failed = {o.order_id: o.other_failures for o in orders.values() if o.other_failures}
    assert not failed, f"{len(failed)} orders failed other than in transit: {list(failed.items())[:5]}"
    assert sum(o.in_transit for o in orders.values()) > 0, "no call was caught by the kills: the test proved nothing"
    assert sum(1 for o in orders.values() if o.via_stream and o.answers) > 50, "too few orders went by the stream"

    # The answers: all DISPENSED, the same secrets on every answer of an order, the imported plaintexts.
    by_id = await plaintexts(db, r.procs.env, sku_id)
    assert set(by_id.values()) == imported
    acked: dict[str, tuple[SECRET, ...]] = {}
    for order in orders.values():
        outcomes = {a.outcome for a in order.answers}
        assert outcomes == {pb.INVENTORY_OUTCOME_DISPENSED}, (order.order_id, order.answers)
        given = {a.secrets for a in order.answers}
        assert len(given) == 1, f"order {order.order_id} got different secrets: {given}"
        secrets = acked[order.order_id] = order.answers[0].secrets
        assert len(secrets) == order.request.quantity
        for secret_id, use, text in secrets:
            assert use == 1 and by_id[secret_id] == text, (order.order_id, secret_id)
        assert sum(not a.replayed for a in order.answers) <= 1, f"order {order.order_id} decided twice"
    uses = [(sid, use) for secrets in acked.values() for sid, use, _ in secrets]
    assert len(uses) == len(set(uses)), "a secret use was given to two orders"
    owner = {(sid, use): order_id for order_id, secrets in acked.items() for sid, use, _ in secrets}

    # Redis after the restarts: every acknowledged order recorded with its secrets, no other order, no use twice,
    # and no secret given out still in the stock.
    in_redis = await redis_orders(client, sku_id)
    assert set(in_redis) == set(acked), (
        f"Redis orders differ: {len(set(acked) - set(in_redis))} acknowledged missing, "
        f"{len(set(in_redis) - set(acked))} never acknowledged"
    )
    redis_uses: list[tuple[int, int]] = []
    for order_id, record in in_redis.items():
        assert record["st"] == "dispensed", (order_id, record)
        ids = parse_ids(record["ids"])
        assert ids == {(sid, use) for sid, use, _ in acked[order_id]}, (order_id, record["ids"])
        redis_uses += ids
    assert len(redis_uses) == len(set(redis_uses)), "a secret use is in two Redis orders"
    available = await still_available(client, sku_id)
    assert not available & {sid for sid, _ in owner}, "a dispensed secret is still in the stock"
    assert len(available) + len(owner) == STOCK, "stock lost or made up"
    assert writer.poll() is None and gateway.poll() is None, "a process died"

    # The ledger once the writer drained the outboxes: exactly the acknowledged dispenses, each once.
    drain = await wait_for_inventory_ledger(client, sku_id)
    rows = await db.fetch("SELECT secret_id, use_number, order_id FROM dispenses WHERE sku_id = $1", sku_id)
    in_ledger = {(r["secret_id"], r["use_number"]): r["order_id"] for r in rows}
    assert len(in_ledger) == len(rows)
    assert in_ledger == owner, (
        f"ledger differs: {len(owner.keys() - in_ledger.keys())} acknowledged uses missing, "
        f"{len(in_ledger.keys() - owner.keys())} extra, "
        f"{sum(1 for k in owner.keys() & in_ledger.keys() if owner[k] != in_ledger[k])} under another order"
    )
    events = await db.fetch(
        "SELECT order_id, count(*) AS n FROM inventory_events WHERE sku_id = $1 AND kind = 'dispense' GROUP BY 1",
        sku_id,
    )
    assert {e["order_id"]: e["n"] for e in events} == dict.fromkeys(acked, 1), "dispense events differ from orders"
    alarms = await db.fetchval("SELECT count(*) FROM dispense_alarms WHERE secret_id = ANY($1::bigint[])",
                               list(by_id))  # fmt: skip
    assert alarms == 0, "a secret use was recorded for two orders"
    for shard in range(SHARDS):
        stream = layout.outbox_key(sku_id, shard)
        assert await client.xlen(deadletter_key_for(stream)) == 0, "inventory events were dead-lettered"

    replayed = sum(a.replayed for o in orders.values() for a in o.answers)
    report("inventory-kill", orders=len(acked), secrets=len(owner), calls=load.calls,
           failed_in_transit=sum(o.in_transit for o in orders.values()),
           orders_caught_in_transit=sum(1 for o in orders.values() if o.in_transit),
           of_them_decided_before_the_failure=sum(1 for o in orders.values() if o.in_transit and o.answers[0].replayed),
           replayed_answers=replayed,
           down_s={k: round(v, 2) for k, v in downs.items()}, drain_s=drain)  # fmt: skip
