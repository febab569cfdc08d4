"""Postgres -> Redis for the inventory (gateway/inventory/layout.py): a SKU's meta and outboxes (`publish_sku`), and
its secrets (`load_secrets`, `load_sku`, `load_batch`) - used by imports after their commit, `rgw inventory
resume` and the rebuild of Redis, so importing and restoring cannot drift apart.

A secret is loaded as its record in the shard's secrets hash (SECRET_RECORD joined by '|': supplier, cost,
currency, expiry ms, dispenses left, uses so far, key id, nonce and ciphertext in base64 - never plaintext) and
its id in the by-expiry, by-cost and by-supplier zsets, through lua/inventory_load.lua: ~1,000 secrets a call,
ROUND_CALLS calls a round trip. A call adds a secret only when the secrets hash has no record of it, and then
indexes it in the same atomic step, so loading is idempotent (a rerun, a resume of a batch partly loaded) and
never undoes a dispense: the inventory script keeps a used-up secret's record (left = 0), so a reload leaves it.

A rebuild (Redis lost) passes `exclude`: the uses already taken per secret id (dispensed, or held for an order,
from the ledger), and `last_use`: the highest use number taken per secret id (a hold released or expired may
have given back a use below a dispensed one, so the count taken is not the next use number). A secret then starts
with left = reuse - taken and used = its last use taken (the count without `last_use`), and one with nothing left
is not loaded at all.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from redis import exceptions as redis_errors

from gateway import keys
from gateway.inventory import layout
from gateway.inventory.model import Sku, from_row
from gateway.ledger.outbox import ensure_group
from gateway.redis_client import RedisClient, evalsha_many
from gateway.script_calls import load_lua

CALL_SECRETS = 1_000  # secrets per script call (~1 ms of Redis time: dispenses wait little)
ROUND_CALLS = 8  # script calls per round trip
FETCH = 20_000  # rows a Postgres cursor fetch
_ARGS = 5  # script arguments per secret

Progress = Callable[[int], None]
# Uses already taken per secret id (dispensed or held), for a rebuild: a mapping, or a function of the id.
Taken = Mapping[int, int] | Callable[[int], int]

_SECRETS = """
SELECT s.id, s.sku_id, s.shard, s.supplier, s.cost, s.currency, s.expires_at, s.key_id, s.nonce, s.ciphertext,
       k.reuse
FROM secrets s JOIN skus k ON k.id = s.sku_id
WHERE ($1::bigint IS NULL OR s.sku_id = $1) AND ($2::uuid IS NULL OR s.batch_id = $2)"""
_BATCH_SKUS = """SELECT id, brand_id, code, name, reuse, shards, max_per_order, low_stock, created_at FROM skus
                  WHERE id IN (SELECT DISTINCT sku_id FROM secrets WHERE batch_id = $1)"""


def expiry_ms(moment: datetime) -> int:
    """A secret's expiry as the zsets score it and its record carries: Unix ms."""
    return int(moment.timestamp() * 1000)


def secret_record(
    *, supplier: str, cost: int, currency: str, expiry: int, left: int, used: int, key_id: str, nonce: bytes,
    ciphertext: bytes,
) -> str:  # fmt: skip
    """A secret's record in the secrets hash (layout.SECRET_RECORD joined by '|')."""
    b64 = base64.b64encode
    return (f"{supplier}|{cost}|{currency}|{expiry}|{left}|{used}|{key_id}|{b64(nonce).decode()}|"
            f"{b64(ciphertext).decode()}")  # fmt: skip


def parse_secret_record(text: str) -> dict[str, str]:
    """A secrets-hash record by layout.SECRET_RECORD name (all strings, as stored)."""
    fields = text.split("|")
    if len(fields) != len(layout.SECRET_RECORD):
        raise ValueError(f"a secret record has {len(layout.SECRET_RECORD)} fields, this one {len(fields)}")
    return dict(zip(layout.SECRET_RECORD, fields, strict=True))


async def publish_sku(redis: RedisClient, sku: Sku) -> None:
    """The SKU's rules in every shard's meta hash (brand, reuse, max), and every shard's outbox stream listed in
    the writer's directory (keys.OUTBOXES) with its consumer group. Idempotent."""
    async with redis.pipeline(transaction=False) as pipe:
        for shard in range(sku.shards):
            pipe.hset(layout.meta_key(sku.id, shard),
                      mapping={"brand": sku.brand_id, "reuse": sku.reuse, "max": sku.max_per_order})  # fmt: skip
        await pipe.execute()
    outboxes = [layout.outbox_key(sku.id, shard) for shard in range(sku.shards)]
    for stream in outboxes:
        await ensure_group(redis, stream)
    await redis.sadd(keys.OUTBOXES, *outboxes)


@dataclass(frozen=True, slots=True)
class Loaded:
    """What a load did: secrets sent, new to Redis among them, and skipped (nothing left to dispense)."""

    secrets: int
    added: int
    skipped: int = 0


Call = tuple[list[str], list[str]]


class SecretLoader:
    """Secrets queued by SKU shard and sent in script calls on `flush` (due when `full`)."""

    def __init__(self, redis: RedisClient, *, progress: Progress | None = None) -> None:
        self._redis = redis
        self._progress = progress
        self._sha = ""
        self._queued: dict[tuple[int, int], list[tuple[str, ...]]] = {}
        self._pending = 0
        self.loaded = 0
        self.added = 0

    @property
    def full(self) -> bool:
        return self._pending >= CALL_SECRETS * ROUND_CALLS * 4

    def add(self, sku_id: int, shard: int, secret_id: int, record: str, expiry: int, cost: int, supplier: str) -> None:
        """Queue one secret (its record from `secret_record`)."""
        self._queued.setdefault((sku_id, shard), []).append((str(secret_id), record, str(expiry), str(cost),
                                                             supplier))  # fmt: skip
        self._pending += 1

    async def flush(self) -> None:
        queued, pending = self._queued, self._pending
        self._queued, self._pending = {}, 0
        calls = [call for (sku_id, shard), items in queued.items() for call in _calls(sku_id, shard, items)]
        for start in range(0, len(calls), ROUND_CALLS):
            self.added += await self._round(calls[start : start + ROUND_CALLS])
        self.loaded += pending
        if self._progress is not None and pending:
            self._progress(pending)

    async def _round(self, calls: list[Call]) -> int:
        if not self._sha:
            self._sha = await self._redis.script_load(load_lua("inventory_load.lua"))
        try:
            return await self._pipelined(calls)
        except redis_errors.NoScriptError:  # a restarted Redis: load the script again (calls are idempotent)
            self._sha = await self._redis.script_load(load_lua("inventory_load.lua"))
            return await self._pipelined(calls)

    async def _pipelined(self, calls: list[Call]) -> int:
        replies = await evalsha_many(self._redis, self._sha, calls)
        return sum(int(reply) for reply in replies)


def _calls(sku_id: int, shard: int, items: list[tuple[str, ...]]) -> list[Call]:
    base = [layout.secrets_key(sku_id, shard), layout.by_expiry_key(sku_id, shard), layout.by_cost_key(sku_id, shard)]
    calls: list[Call] = []
    for start in range(0, len(items), CALL_SECRETS):
        suppliers: dict[str, int] = {}
        args: list[str] = []
        for secret_id, record, expiry, cost, supplier in items[start : start + CALL_SECRETS]:
            index = suppliers.setdefault(supplier, len(suppliers) + 1)
            args += (secret_id, record, expiry, cost, str(index))
        supplier_keys = [layout.by_supplier_key(sku_id, shard, name) for name in suppliers]
        calls.append(([*base, *supplier_keys], args))
    return calls


def _taken_of(exclude: Taken | None) -> Callable[[int], int]:
    if exclude is None:
        return lambda _secret_id: 0
    if isinstance(exclude, Mapping):
        return lambda secret_id: int(exclude.get(secret_id, 0))
    return exclude


async def load_secrets(
    conn: asyncpg.Connection,
    redis: RedisClient,
    *,
    sku_id: int | None = None,
    batch_id: uuid.UUID | None = None,
    exclude: Taken | None = None,
    last_use: Mapping[int, int] | None = None,
    progress: Progress | None = None,
) -> Loaded:
    """Load the secrets of one SKU, one batch, or both filters, from Postgres into Redis. Idempotent; see the
    module's docstring for `exclude`. The SKUs' meta must be published (publish_sku) - load_sku and load_batch do."""
    taken = _taken_of(exclude)
    loader = SecretLoader(redis, progress=progress)
    skipped = 0
    async with conn.transaction():  # a cursor lives in a transaction
        cursor = await conn.cursor(_SECRETS, sku_id, batch_id)
        while rows := await cursor.fetch(FETCH):
            for row in rows:
                count = taken(row["id"])
                left = row["reuse"] - count
                used = max(count, (last_use or {}).get(row["id"], 0))
                if left <= 0:
                    skipped += 1
                    continue
                expiry = expiry_ms(row["expires_at"])
                record = secret_record(
                    supplier=row["supplier"], cost=row["cost"], currency=row["currency"], expiry=expiry, left=left,
                    used=used, key_id=row["key_id"], nonce=row["nonce"], ciphertext=row["ciphertext"],
                )  # fmt: skip
                loader.add(row["sku_id"], row["shard"], row["id"], record, expiry, row["cost"], row["supplier"])
            if loader.full:
                await loader.flush()
    await loader.flush()
    return Loaded(loader.loaded, loader.added, skipped)


async def load_sku(
    conn: asyncpg.Connection,
    redis: RedisClient,
    sku: Sku,
    *,
    exclude: Taken | None = None,
    last_use: Mapping[int, int] | None = None,
    progress: Progress | None = None,
) -> Loaded:
    """Publish the SKU and load every secret of it that has dispenses left (after `exclude`). Idempotent."""
    await publish_sku(redis, sku)
    return await load_secrets(conn, redis, sku_id=sku.id, exclude=exclude, last_use=last_use, progress=progress)


async def load_batch(
    conn: asyncpg.Connection, redis: RedisClient, batch_id: uuid.UUID, *, progress: Progress | None = None
) -> Loaded:
    """Publish the batch's SKUs and load every secret of the batch (an import's, after its commit). Idempotent."""
    for row in await conn.fetch(_BATCH_SKUS, batch_id):
        await publish_sku(redis, from_row(row))
    return await load_secrets(conn, redis, batch_id=batch_id, progress=progress)


def shard_tags(skus: Iterable[Sku]) -> list[tuple[int, int]]:
    """Every (sku id, shard) of `skus`."""
    return [(sku.id, shard) for sku in skus for shard in range(sku.shards)]
