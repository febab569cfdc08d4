"""Inventory part of `rgw rebuild-redis`: each SKU's Redis state from Postgres (invariant 8). The secrets are
loaded by gateway/inventory/loader.py with the uses the ledger says are taken - every `dispenses` row, and the
secret uses of holds still open (an order whose last event is a hold) - so a secret dispensed before the loss is
never dispensed again; each loaded secret's next use number follows the highest use taken. A secret the restored
orders took every use of keeps its record (dispenses left 0, in no index), as the script leaves it: the orders'
later calls (an expiry giving a held secret back, a confirm's answer) read it.

Every order of the ledger is restored with them, from its last event (each event carries the order's own fields:
request fingerprint, hold expiry, strategy, supplier) and its `dispenses` rows: its hash as the script left it and
its place in the brand's order registry ("<sku>.<shard>|<fingerprint>", as the gateway registers it), so
- a dispensed order (dispense, or confirm of a hold; late when its hold had expired first) answers a retry of the
  same request with its secrets, replayed, and refuses another request under its id (ORDER_ID_REUSED);
- an open hold keeps its expiry: held until then (Confirm dispenses its secrets), expired by the script after
  (its stock returns, a confirm is late);
- a released order answers Confirm NOT_HELD and Release RELEASED (replayed); an expired one keeps its secret uses
  as the script does (a late confirm takes as many of the stock there is now, by the order's strategy and
  supplier, or answers HOLD_EXPIRED); neither holds stock. Both still refuse another request under their id.
Events written by gateways older than these fields (and recorded before migration 0009) carry none of them: such
an order is restored with fingerprint "" (a retry under its id is refused as a different request rather than
answered: fail closed), an open hold as expiring at the rebuild (the script's own expiry then returns its stock
and records the expire event, and a later confirm is late), an expired order's late confirm by earliest expiry.
Safe to run again: loading skips secrets already in Redis, an order already in Redis is left as it is.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass

import asyncpg

from gateway.inventory import layout
from gateway.inventory.loader import expiry_ms, load_sku, secret_record
from gateway.inventory.model import Sku, from_row
from gateway.ledger.inventory_events import parse_secrets
from gateway.redis_client import RedisClient

log = logging.getLogger("rgw.rebuild")

_SKUS = "SELECT id, brand_id, code, name, reuse, shards, max_per_order, low_stock, created_at FROM skus ORDER BY id"
_DISPENSED = """SELECT order_id, secret_id, use_number, extract(epoch FROM max(dispensed_at) OVER w) * 1000 AS at_ms
                FROM dispenses WHERE sku_id = $1 WINDOW w AS (PARTITION BY order_id) ORDER BY order_id, secret_id"""
# The last event of each order of the SKU (in the shard's order: `at`, then the outbox stream id), with the order's
# fields it carries; expired_once: the order's hold expired at some point (a confirm after it was a late one).
_LAST_EVENTS = r"""
SELECT order_id, shard, kind, secrets, fingerprint, strategy, supplier, expired_once,
       round(extract(epoch FROM at) * 1000)::bigint AS at_ms,
       coalesce(round(extract(epoch FROM hold_expires_at) * 1000)::bigint, 0) AS exp_ms
FROM (SELECT DISTINCT ON (order_id) e.*, bool_or(kind = 'expire') OVER (PARTITION BY order_id) AS expired_once
      FROM inventory_events e WHERE sku_id = $1
      ORDER BY order_id, at DESC,
               CASE WHEN outbox_id ~ '^\d+-\d+$' THEN split_part(outbox_id, '-', 1)::numeric END DESC NULLS LAST,
               CASE WHEN outbox_id ~ '^\d+-\d+$' THEN split_part(outbox_id, '-', 2)::numeric END DESC NULLS LAST,
               outbox_id DESC) last"""
_SECRETS = """SELECT id, shard, supplier, cost, currency, expires_at, key_id, nonce, ciphertext FROM secrets
              WHERE sku_id = $1 AND id = ANY($2::bigint[])"""


@dataclass(frozen=True, slots=True)
class InventoryRebuild:
    """What was restored (orders: dispensed ones; holds: open ones; ended: released or expired ones)."""

    skus: int = 0
    secrets_loaded: int = 0
    orders_restored: int = 0
    holds_restored: int = 0
    ended_restored: int = 0


@dataclass(frozen=True, slots=True)
class _Last:
    """An order's last event and the order's fields it carries ("" and 0 when written before they were)."""

    kind: str
    shard: int
    uses: list[tuple[int, int]]
    fingerprint: str
    exp_ms: int
    strategy: str
    supplier: str
    at_ms: int
    late: bool  # a confirm after the order's hold expired


@dataclass
class _Orders:
    dispensed: dict[str, list[tuple[int, int]]]
    at_ms: dict[str, int]
    last: dict[str, _Last]

    @property
    def holds(self) -> dict[str, _Last]:
        """The open holds: orders whose last event is a hold (and that the ledger shows dispensed nothing)."""
        return {o: last for o, last in self.last.items() if last.kind == "hold" and o not in self.dispensed}

    def taken(self) -> Counter[int]:
        taken: Counter[int] = Counter()
        for uses in self.dispensed.values():
            taken.update(secret_id for secret_id, _ in uses)
        for last in self.holds.values():
            taken.update(secret_id for secret_id, _ in last.uses)
        return taken

    def last_use(self) -> dict[int, int]:
        last: dict[int, int] = {}
        for uses in [*self.dispensed.values(), *(hold.uses for hold in self.holds.values())]:
            for secret_id, use in uses:
                last[secret_id] = max(use, last.get(secret_id, 0))
        return last


async def _ledger_orders(conn: asyncpg.Connection, sku: Sku) -> _Orders:
    dispensed: defaultdict[str, list[tuple[int, int]]] = defaultdict(list)
    at_ms: dict[str, int] = {}
    for row in await conn.fetch(_DISPENSED, sku.id):
        dispensed[row["order_id"]].append((row["secret_id"], row["use_number"]))
        at_ms[row["order_id"]] = int(row["at_ms"])
    last = {}
    for row in await conn.fetch(_LAST_EVENTS, sku.id):
        last[row["order_id"]] = _Last(
            row["kind"], row["shard"], [(u.secret_id, u.use_number) for u in parse_secrets(row["secrets"])],
            row["fingerprint"], int(row["exp_ms"]), row["strategy"], row["supplier"], int(row["at_ms"]),
            row["kind"] == "confirm" and row["expired_once"],
        )  # fmt: skip
    return _Orders(dict(dispensed), at_ms, last)


async def _keep_used_up(conn: asyncpg.Connection, redis: RedisClient, sku: Sku, orders: _Orders) -> None:
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


async def _restore_order(redis: RedisClient, sku: Sku, order: str, shard: int, fp: str, fields: dict[str, str]) -> bool:
    """The order's hash and registry entry (with its request fingerprint), unless Redis has the order already."""
    key = layout.order_key(sku.id, shard, order)
    if await redis.exists(key):
        return False
    record = {"fp": fp, **fields}
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hset(key, mapping=record)  # type: ignore[arg-type]
        pipe.hsetnx(layout.orders_key(sku.brand_id), order, f"{sku.id}.{shard}|{fp}")
        if fields["st"] == "held":
            pipe.zadd(layout.holds_key(sku.id, shard), {order: int(fields["exp"])})
        await pipe.execute()
    return True


def _ids(uses: list[tuple[int, int]]) -> str:
    return ",".join(f"{secret_id};{use}" for secret_id, use in uses)


def _order_fields(last: _Last | None) -> dict[str, str]:
    """The fields of an order's hash its last event gives, whatever its state: strategy and supplier (a late
    confirm takes stock by them; absent when the event did not carry them, as for the script's older orders)."""
    if last is None or not last.strategy:
        return {}
    return {"strat": last.strategy, "sup": last.supplier}


_ENDED = {"release": "released", "expire": "expired"}


async def rebuild_sku(conn: asyncpg.Connection, redis: RedisClient, sku: Sku, *, now_ms: int) -> InventoryRebuild:
    """Restore one SKU: its secrets minus the uses taken, and every order of the ledger (module docstring)."""
    orders = await _ledger_orders(conn, sku)
    loaded = await load_sku(conn, redis, sku, exclude=orders.taken(), last_use=orders.last_use())
    await _keep_used_up(conn, redis, sku, orders)
    restored = held = ended = 0
    for order, uses in orders.dispensed.items():
        last = orders.last.get(order)
        fields = {"st": "dispensed", "ids": _ids(uses), "exp": str(last.exp_ms if last else 0),
                  "at": str(orders.at_ms[order]), **_order_fields(last)}  # fmt: skip
        if last is not None and last.late:
            fields["late"] = "1"
        shard = layout.order_shard(order, sku.shards)
        restored += await _restore_order(redis, sku, order, shard, last.fingerprint if last else "", fields)
    for order, last in orders.last.items():
        if order in orders.dispensed:
            continue  # restored above
        if last.kind == "hold":
            # an event without the hold's expiry (an older gateway's): expiring at the rebuild, failing closed
            exp = last.exp_ms or now_ms
            fields = {"st": "held", "ids": _ids(last.uses), "exp": str(exp), "at": str(last.at_ms)}
            held += await _restore_order(redis, sku, order, last.shard, last.fingerprint,
                                         fields | _order_fields(last))  # fmt: skip
        elif last.kind in _ENDED:
            # the script keeps an ended hold's secret uses (a late confirm takes as many); they hold no stock
            fields = {"st": _ENDED[last.kind], "ids": _ids(last.uses), "exp": str(last.exp_ms), "at": str(last.at_ms)}
            ended += await _restore_order(redis, sku, order, last.shard, last.fingerprint,
                                          fields | _order_fields(last))  # fmt: skip
        else:
            log.error("order %s of sku %d: last event %s, but no dispenses row is the order's; not restored",
                      order[:64], sku.id, last.kind)  # fmt: skip
    return InventoryRebuild(1, loaded.added, restored, held, ended)


async def rebuild_inventory(conn: asyncpg.Connection, redis: RedisClient, *, now_ms: int) -> InventoryRebuild:
    """Restore every SKU (called by gateway/rebuild.py rebuild_redis before it marks Redis initialised)."""
    total = InventoryRebuild()
    for row in await conn.fetch(_SKUS):
        one = await rebuild_sku(conn, redis, from_row(row), now_ms=now_ms)
        total = InventoryRebuild(
            total.skus + 1, total.secrets_loaded + one.secrets_loaded, total.orders_restored + one.orders_restored,
            total.holds_restored + one.holds_restored, total.ended_restored + one.ended_restored,
        )  # fmt: skip
    log.info("rebuilt inventory: %d SKUs, %d secrets loaded, %d dispensed orders, %d open holds and %d released or"
             " expired orders restored", total.skus, total.secrets_loaded, total.orders_restored,
             total.holds_restored, total.ended_restored)  # fmt: skip
    return total
