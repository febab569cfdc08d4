"""Inventory part of `rgw rebuild-redis`: each SKU's Redis state from Postgres (invariant 8). The secrets are
loaded by gateway/inventory/loader.py with the uses the ledger says are taken - every `dispenses` row, and the
secret uses of holds still open (a hold event with no later confirm, release or expire for its order) - so a
secret dispensed before the loss is never dispensed again; each loaded secret's next use number follows the highest
use taken. A secret the restored orders took every use of keeps its record (dispenses left 0, in no index), as the
script leaves it: the orders' later calls (an expiry giving a held secret back, a confirm's answer) read it. The
orders are restored with them: a dispensed order's hash (state, its secret uses) and its place in the brand's order
registry, so a retried payment notice finds it.

What the ledger does not hold: an order's request fingerprint (restored as "", so a retry under that order id is
refused as a different request rather than answered: fail closed) and a hold's expiry (an open hold is restored
as expiring at the rebuild: the script's own expiry then returns its stock and records the expire event, and a
later confirm is a late confirm). Safe to run again: loading skips secrets already in Redis, an order already in
Redis is left as it is.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from gateway.inventory import layout
from gateway.inventory.loader import expiry_ms, load_sku, secret_record
from gateway.inventory.model import Sku, from_row
from gateway.ledger.inventory_events import parse_secrets

log = logging.getLogger("rgw.rebuild")

_SKUS = "SELECT id, brand_id, code, name, reuse, shards, max_per_order, low_stock, created_at FROM skus ORDER BY id"
_DISPENSED = """SELECT order_id, secret_id, use_number, extract(epoch FROM max(dispensed_at) OVER w) * 1000 AS at_ms
                FROM dispenses WHERE sku_id = $1 WINDOW w AS (PARTITION BY order_id) ORDER BY order_id, secret_id"""
# The last event of each order of the SKU; an order whose last event is a hold holds its secrets still.
_OPEN_HOLDS = """SELECT order_id, shard, secrets FROM (
                     SELECT DISTINCT ON (order_id) order_id, shard, kind, secrets FROM inventory_events
                     WHERE sku_id = $1 ORDER BY order_id, at DESC, outbox_id DESC) last
                 WHERE kind = 'hold'"""
_SECRETS = """SELECT id, shard, supplier, cost, currency, expires_at, key_id, nonce, ciphertext FROM secrets
              WHERE sku_id = $1 AND id = ANY($2::bigint[])"""


@dataclass(frozen=True, slots=True)
class InventoryRebuild:
    """What was restored."""

    skus: int = 0
    secrets_loaded: int = 0
    orders_restored: int = 0
    holds_restored: int = 0


@dataclass
class _Orders:
    dispensed: dict[str, list[tuple[int, int]]]
    at_ms: dict[str, int]
    holds: dict[str, tuple[int, list[tuple[int, int]]]]

    def taken(self) -> Counter[int]:
        taken: Counter[int] = Counter()
        for uses in self.dispensed.values():
            taken.update(secret_id for secret_id, _ in uses)
        for _, uses in self.holds.values():
            taken.update(secret_id for secret_id, _ in uses)
        return taken

    def last_use(self) -> dict[int, int]:
        last: dict[int, int] = {}
        for uses in [*self.dispensed.values(), *(uses for _, uses in self.holds.values())]:
            for secret_id, use in uses:
                last[secret_id] = max(use, last.get(secret_id, 0))
        return last


async def _ledger_orders(conn: asyncpg.Connection, sku: Sku) -> _Orders:
    dispensed: defaultdict[str, list[tuple[int, int]]] = defaultdict(list)
    at_ms: dict[str, int] = {}
    for row in await conn.fetch(_DISPENSED, sku.id):
        dispensed[row["order_id"]].append((row["secret_id"], row["use_number"]))
        at_ms[row["order_id"]] = int(row["at_ms"])
    holds = {}
    for row in await conn.fetch(_OPEN_HOLDS, sku.id):
        uses = [(u.secret_id, u.use_number) for u in parse_secrets(row["secrets"])]
        holds[row["order_id"]] = (row["shard"], uses)
    return _Orders(dict(dispensed), at_ms, holds)


async def _keep_used_up(conn: asyncpg.Connection, redis: Redis, sku: Sku, orders: _Orders) -> None:
    """The records (left 0, in no index) of the secrets whose every use the restored orders took."""
    taken, last = orders.taken(), orders.last_use()
    used_up = [secret_id for secret_id, n in taken.items() if n >= sku.reuse]
    if not used_up:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for row in await conn.fetch(_SECRETS, sku.id, used_up):
            record = secret_record(
                supplier=row["supplier"], cost=row["cost"], currency=row["currency"],
                expiry=expiry_ms(row["expires_at"]), left=max(0, sku.reuse - taken[row["id"]]), used=last[row["id"]],
                key_id=row["key_id"], nonce=row["nonce"], ciphertext=row["ciphertext"],
            )  # fmt: skip
            pipe.hsetnx(layout.secrets_key(sku.id, row["shard"]), str(row["id"]), record)
        await pipe.execute()


async def _restore_order(redis: Redis, sku: Sku, order: str, shard: int, fields: dict[str, str]) -> bool:
    """The order's hash and registry entry, unless Redis has the order already."""
    key = layout.order_key(sku.id, shard, order)
    if await redis.exists(key):
        return False
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
        pipe.hsetnx(layout.orders_key(sku.brand_id), order, f"{sku.id}.{shard}|")
        if fields["st"] == "held":
            pipe.zadd(layout.holds_key(sku.id, shard), {order: int(fields["exp"])})
        await pipe.execute()
    return True


def _ids(uses: list[tuple[int, int]]) -> str:
    return ",".join(f"{secret_id};{use}" for secret_id, use in uses)


async def rebuild_sku(conn: asyncpg.Connection, redis: Redis, sku: Sku, *, now_ms: int) -> InventoryRebuild:
    """Restore one SKU: its secrets minus the uses taken, its dispensed orders and open holds."""
    orders = await _ledger_orders(conn, sku)
    loaded = await load_sku(conn, redis, sku, exclude=orders.taken(), last_use=orders.last_use())
    await _keep_used_up(conn, redis, sku, orders)
    restored = held = 0
    for order, uses in orders.dispensed.items():
        fields = {"fp": "", "st": "dispensed", "ids": _ids(uses), "exp": "0", "at": str(orders.at_ms[order])}
        restored += await _restore_order(redis, sku, order, layout.order_shard(order, sku.shards), fields)
    for order, (shard, uses) in orders.holds.items():
        fields = {"fp": "", "st": "held", "ids": _ids(uses), "exp": str(now_ms), "at": str(now_ms)}
        held += await _restore_order(redis, sku, order, shard, fields)
    return InventoryRebuild(1, loaded.added, restored, held)


async def rebuild_inventory(conn: asyncpg.Connection, redis: Redis, *, now_ms: int) -> InventoryRebuild:
    """Restore every SKU (called by gateway/rebuild.py rebuild_redis before it marks Redis initialised)."""
    total = InventoryRebuild()
    for row in await conn.fetch(_SKUS):
        one = await rebuild_sku(conn, redis, from_row(row), now_ms=now_ms)
        total = InventoryRebuild(
            total.skus + 1, total.secrets_loaded + one.secrets_loaded, total.orders_restored + one.orders_restored,
            total.holds_restored + one.holds_restored,
        )  # fmt: skip
    log.info("rebuilt inventory: %d SKUs, %d secrets loaded, %d orders and %d open holds restored",
             total.skus, total.secrets_loaded, total.orders_restored, total.holds_restored)  # fmt: skip
    return total
