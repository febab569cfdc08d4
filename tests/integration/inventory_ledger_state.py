"""Inventory state for the ledger, status, reconcile and rebuild tests, made without the dispense script: SKUs and
secrets in Postgres, secret records, indexes, orders and holds in Redis as gateway/inventory/layout.py has them, and
i1 events appended to the SKU shards' outboxes (listed in the writer's directory)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from redis.asyncio import Redis

from gateway import keys
from gateway.ids import uuid7
from gateway.inventory import layout
from gateway.inventory.model import Sku, from_row
from gateway.ledger.inventory_events import encode_inventory_event
from tests.conftest import T0_MS

DAY_MS = 86_400_000
_SKU = """INSERT INTO skus (brand_id, code, name, reuse, shards, low_stock) VALUES ($1, $2, $3, $4, $5, $6)
          RETURNING id, brand_id, code, name, reuse, shards, max_per_order, low_stock, created_at"""
_SECRET = """INSERT INTO secrets (brand_id, sku_id, shard, supplier, cost, currency, expires_at, batch_id, key_id,
                                  nonce, ciphertext, dedup_ref)
             VALUES ($1, $2, $3, $4, $5, 'CNY', $6, $7, 's1', $8, $9, $10) RETURNING id"""


@dataclass(frozen=True)
class Secret:
    """One secret as the tests made it."""

    id: int
    sku: Sku
    shard: int
    supplier: str
    cost: int
    expiry_ms: int


async def clean_inventory(db: asyncpg.Connection) -> None:
    """The ledger tables the shared TRUNCATE does not reach (they have no foreign key to brands)."""
    await db.execute("TRUNCATE inventory_events, dispenses, dispense_alarms")


async def make_sku(db: asyncpg.Connection, *, brand_id: int = 1, code: str | None = None, shards: int = 1,
                   reuse: int = 1, low_stock: int = 0) -> Sku:  # fmt: skip
    code = code or f"sku-{uuid.uuid4().hex[:8]}"
    return from_row(await db.fetchrow(_SKU, brand_id, code, f"SKU {code}", reuse, shards, low_stock))


async def add_secret(
    db: asyncpg.Connection, redis: Redis, sku: Sku, *, supplier: str = "sup-a", cost: int = 100,
    expiry_ms: int = T0_MS + 30 * DAY_MS, shard: int = 0, left: int | None = None, used: int = 0,
    indexed: bool = True,
) -> Secret:  # fmt: skip
    """A secret in Postgres and in its shard's secrets hash (and, when indexed and with dispenses left, in the
    expiry, cost and supplier indexes), as the importer and loader leave it."""
    batch = uuid.uuid4()
    await db.execute("INSERT INTO secret_batches (id, brand_id, secrets, state) VALUES ($1, $2, 1, 'active')",
                     batch, sku.brand_id)  # fmt: skip
    expires = datetime.fromtimestamp(expiry_ms / 1000, UTC)
    secret_id = await db.fetchval(_SECRET, sku.brand_id, sku.id, shard, supplier, cost, expires, batch,
                                  os.urandom(12), os.urandom(40), os.urandom(32))  # fmt: skip
    left = sku.reuse - used if left is None else left
    record = "|".join([supplier, str(cost), "CNY", str(expiry_ms), str(left), str(used), "s1", "bm9uY2U=", "Y3Q="])
    await redis.hset(layout.secrets_key(sku.id, shard), str(secret_id), record)
    if indexed and left > 0:
        await index(redis, sku, shard, secret_id, supplier=supplier, cost=cost, expiry_ms=expiry_ms)
    return Secret(secret_id, sku, shard, supplier, cost, expiry_ms)


async def index(redis: Redis, sku: Sku, shard: int, secret_id: int, *, supplier: str, cost: int,
                expiry_ms: int) -> None:  # fmt: skip
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zadd(layout.by_expiry_key(sku.id, shard), {str(secret_id): expiry_ms})
        pipe.zadd(layout.by_cost_key(sku.id, shard), {str(secret_id): cost})
        pipe.zadd(layout.by_supplier_key(sku.id, shard, supplier), {str(secret_id): expiry_ms})
        await pipe.execute()


async def take(redis: Redis, secret: Secret, *, left: int = 0, used: int = 1) -> None:
    """Record in Redis that uses of `secret` were taken (left, used), out of the indexes when none is left."""
    key = layout.secrets_key(secret.sku.id, secret.shard)
    fields = str(await redis.hget(key, str(secret.id))).split("|")
    fields[4], fields[5] = str(left), str(used)
    await redis.hset(key, str(secret.id), "|".join(fields))
    if left == 0:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.zrem(layout.by_expiry_key(secret.sku.id, secret.shard), str(secret.id))
            pipe.zrem(layout.by_cost_key(secret.sku.id, secret.shard), str(secret.id))
            pipe.zrem(layout.by_supplier_key(secret.sku.id, secret.shard, secret.supplier), str(secret.id))
            await pipe.execute()


async def put_order(redis: Redis, sku: Sku, order: str, uses: list[tuple[Secret, int]], *, state: str,
                    shard: int = 0, at_ms: int = T0_MS, hold_until_ms: int = 0) -> None:  # fmt: skip
    """An order's hash (and, while held, its place in the holds set), as the script records it."""
    ids = ",".join(f"{s.id};{use}" for s, use in uses)
    mapping = {"fp": "f" * 16, "st": state, "ids": ids, "exp": str(hold_until_ms), "at": str(at_ms)}
    await redis.hset(layout.order_key(sku.id, shard, order), mapping=mapping)  # type: ignore[arg-type]
    if state == "held":
        await redis.zadd(layout.holds_key(sku.id, shard), {order: hold_until_ms})


def event(kind: str, sku: Sku, order: str, uses: list[tuple[Secret, int]], *, at_ms: int = T0_MS,
          shard: int = 0, event_id: str | None = None, client: str = "cl_i") -> dict[str, str]:  # fmt: skip
    """An i1 outbox entry's fields."""
    secrets = ",".join(f"{s.id};{use};{s.supplier};{s.cost};CNY" for s, use in uses)
    return encode_inventory_event({
        "event_id": event_id or str(uuid7(at_ms)), "kind": kind, "brand": str(sku.brand_id), "sku": str(sku.id),
        "shard": str(shard), "order": order, "secrets": secrets, "at": str(at_ms), "client": client,
    })  # fmt: skip


async def append(redis: Redis, sku: Sku, fields: dict[str, str], *, shard: int = 0) -> str:
    """XADD an entry to the SKU shard's outbox (registered in the writer's directory); its id."""
    stream = layout.outbox_key(sku.id, shard)
    await redis.sadd(keys.OUTBOXES, stream)
    return str(await redis.xadd(stream, fields))  # type: ignore[arg-type]
