"""The Redis side of the inventory: the brand's order registry and the SKU shard script (lua/inventory.lua), its
argument layout defined once, its replies as plain results, and Redis' failures as StoreUnavailable."""

from __future__ import annotations

import asyncio
import functools
import time
from binascii import a2b_base64
from dataclasses import dataclass
from typing import Any, NamedTuple

from gateway.gateway_metrics import script_observer
from gateway.inventory import layout
from gateway.pipelined_redis import Script
from gateway.redis_client import HotClient, RedisClient
from gateway.script_calls import load_lua, wrap_errors

# lua/inventory.lua's KEYS and ARGV, in order (a test holds them against the script's header).
SCRIPT_KEYS = ("meta", "exp", "cost", "sec", "holds", "outbox", "order")
SCRIPT_ARGS = ("op", "now_ms", "brand", "order", "fp", "quantity", "strategy", "supplier", "ttl_ms", "event_id",
               "client", "expire_bound", "sku", "shard")  # fmt: skip
# op dispense_many: after SCRIPT_ARGS, these per order (and the order's key after the six shard keys).
ORDER_ARGS = ("order", "fp", "quantity", "strategy", "supplier", "event_id")
# Due holds a call expires before its own op: enough to keep up with abandoned orders, few enough to bound a call.
EXPIRE_BOUND = 32
_HEAD = 6  # reply values before the secrets
_PER_SECRET = 5  # id, use, supplier, expiry ms, sealed (key_id|nonce_b64|ct_b64)
_SECONDS = script_observer("inventory")


@dataclass(frozen=True, slots=True)
class ShardCall:
    """One call of the SKU shard script."""

    op: str
    now_ms: int
    brand_id: int
    sku_id: int
    shard: int
    order_id: str = ""
    fingerprint: str = ""
    quantity: int = 0
    strategy: str = "expiry"
    supplier: str = ""
    ttl_ms: int = 0
    event_id: str = ""
    client_id: str = ""


class TakenSecret(NamedTuple):
    """A secret (use) an order took, as Redis holds it: ciphertext only. (A NamedTuple: an order's answer makes
    one per secret, and a tuple is built several times faster than a frozen dataclass.)"""

    secret_id: int
    use_number: int
    supplier: str
    expires_at_ms: int
    key_id: str
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class ShardAnswer:
    """The script's decision (status: see lua/inventory.lua's header)."""

    status: str
    replayed: bool = False
    late: bool = False
    hold_expires_ms: int = 0
    released: int = 0
    holds_left: int = 0
    secrets: tuple[TakenSecret, ...] = ()


def shard_keys(sku_id: int, shard: int, order_id: str) -> list[str]:
    """SCRIPT_KEYS of one order on one SKU shard (any order id names a key of the tag for a sweep)."""
    return [
        layout.meta_key(sku_id, shard),
        layout.by_expiry_key(sku_id, shard),
        layout.by_cost_key(sku_id, shard),
        layout.secrets_key(sku_id, shard),
        layout.holds_key(sku_id, shard),
        layout.outbox_key(sku_id, shard),
        layout.order_key(sku_id, shard, order_id),
    ]


class BatchOrder(NamedTuple):
    """One order of a dispense_many call (DispenseStream)."""

    order_id: str
    fingerprint: str
    quantity: int
    strategy: str
    supplier: str
    event_id: str


@functools.cache
def _shard_keys(sku_id: int, shard: int) -> tuple[str, ...]:
    return tuple(shard_keys(sku_id, shard, "")[:-1])


def batch_keys_args(
    now_ms: int, brand_id: int, sku_id: int, shard: int, client_id: str, orders: list[BatchOrder]
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of one dispense_many call."""
    script_keys = [*_shard_keys(sku_id, shard), *(layout.order_key(sku_id, shard, o.order_id) for o in orders)]
    args: list[str | int] = ["dispense_many", now_ms, brand_id, "", "", 0, "", "", 0, "", client_id, EXPIRE_BOUND,
                             sku_id, shard]  # fmt: skip
    for order in orders:
        args += order
    return script_keys, args


def shard_args(call: ShardCall) -> list[str | int]:
    """SCRIPT_ARGS of a call."""
    return [call.op, call.now_ms, call.brand_id, call.order_id, call.fingerprint, call.quantity, call.strategy,
            call.supplier, call.ttl_ms, call.event_id, call.client_id, EXPIRE_BOUND, call.sku_id,
            call.shard]  # fmt: skip


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _taken(secret_id: int, use: int, supplier: str, expiry: int, sealed: list[str]) -> TakenSecret:
    key_id, nonce, ct = sealed
    return TakenSecret(secret_id, use, supplier, expiry, key_id, a2b_base64(nonce), a2b_base64(ct))


def to_answer(reply: list[Any]) -> ShardAnswer:
    """The one mapping from the script's reply to a result (str values from the pipelined client, bytes from
    redis-py)."""
    values = reply if not reply or isinstance(reply[0], str) else [_text(v) for v in reply]
    head = [_text(v) for v in values[:_HEAD]]  # Lua numbers arrive as ints
    each = iter(values[_HEAD:])
    secrets = tuple(
        _taken(int(secret_id), int(use), supplier, int(expiry), sealed.split("|"))
        for secret_id, use, supplier, expiry, sealed in zip(*[each] * _PER_SECRET, strict=True)
    )
    return ShardAnswer(head[0], head[1] == "1", head[2] == "1", int(head[3]), int(head[4]), int(head[5]), secrets)


class InventoryStore:
    """Calls on Redis for the inventory; every Redis failure leaves as StoreUnavailable. With a pipelined client
    (PipelinedRedis, or PipelinedCluster on a cluster) the hot calls (the registry and the
    script) run on it, as Redeem's do; otherwise on redis-py."""

    def __init__(self, redis: RedisClient, pipelined: HotClient | None = None) -> None:
        self._redis = redis
        self._pipelined = pipelined
        source = load_lua("inventory.lua")
        self._script: Any = Script(pipelined, source) if pipelined is not None else redis.register_script(source)

    async def _hsetnx(self, key: str, field: str, value: str) -> int:
        if self._pipelined is not None:
            return int(await self._pipelined.call("HSETNX", key, field, value))
        return int(await self._redis.hsetnx(key, field, value))

    async def _hget(self, key: str, field: str) -> Any:
        if self._pipelined is not None:
            return await self._pipelined.call("HGET", key, field)
        return await self._redis.hget(key, field)

    async def register_order(self, brand_id: int, order_id: str, route: str) -> str:
        """Record the order's route ("<sku>.<shard>|<fingerprint>") in the brand's registry unless it has one:
        returns the route it has now (the given one, or the first request's). A new order costs one round trip
        (HSETNX answers 1); only a repeated order id reads the route it has (set once, it never changes)."""
        key = layout.orders_key(brand_id)
        with wrap_errors():
            if await self._hsetnx(key, order_id, route) == 1:
                return route
            found = await self._hget(key, order_id)
        return _text(found)

    async def find_order(self, brand_id: int, order_id: str) -> str | None:
        """The order's route in the brand's registry, or None."""
        with wrap_errors():
            found = await self._hget(layout.orders_key(brand_id), order_id)
        return None if found is None else _text(found)

    async def dispense_many(
        self, now_ms: int, brand_id: int, sku_id: int, shard: int, client_id: str, orders: list[BatchOrder]
    ) -> list[ShardAnswer]:
        """Decide the orders of one SKU shard in one script call, each as its own dispense, in turn."""
        script_keys, args = batch_keys_args(now_ms, brand_id, sku_id, shard, client_id, orders)
        started = time.perf_counter()
        try:
            with wrap_errors():
                replies = await self._script(keys=script_keys, args=args)
        finally:
            _SECONDS(time.perf_counter() - started)
        return [to_answer(reply) for reply in replies]

    async def register_orders(self, brand_id: int, routes: list[tuple[str, str]]) -> list[str]:
        """register_order for many orders at once (pipelined: one round trip): the route each has now."""
        key = layout.orders_key(brand_id)
        with wrap_errors():
            if self._pipelined is not None:
                claimed = await asyncio.gather(*(self._pipelined.call("HSETNX", key, o, r) for o, r in routes))
            else:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for order_id, route in routes:
                        pipe.hsetnx(key, order_id, route)
                    claimed = await pipe.execute()
            taken = [order_id for (order_id, _), won in zip(routes, claimed, strict=True) if not int(won)]
            found = dict(zip(taken, await self._redis.hmget(key, taken), strict=True)) if taken else {}
        return [route if order_id not in found else _text(found[order_id]) for order_id, route in routes]

    async def call(self, call: ShardCall) -> ShardAnswer:
        """Run one op of the shard script."""
        started = time.perf_counter()
        try:
            with wrap_errors():
                reply = await self._script(keys=shard_keys(call.sku_id, call.shard, call.order_id),
                                           args=shard_args(call))  # fmt: skip
        finally:
            _SECONDS(time.perf_counter() - started)
        return to_answer(reply)
