"""InventoryService: dispense, hold, confirm and release card secrets for a brand's orders.

A request is checked, its SKU resolved for the caller's brand (Postgres, cached for a few seconds), its order id
claimed in the brand's order registry (one Redis call: the same order id with another request is refused, and
Confirm / Release find the order's SKU shard there), and then decided by one atomic script call on the SKU shard
(store.py, lua/inventory.lua). The secrets an order took are decrypted for its answer only - never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple, Protocol

import asyncpg

from gateway.clock import Clock
from gateway.domain import Caller, ItemFailure, LedgerUnavailable, StoreUnavailable
from gateway.ids import uuid7
from gateway.inventory import layout
from gateway.inventory.crypto import SecretKeyError, associated_data
from gateway.inventory.store import BatchOrder, InventoryStore, ShardAnswer, ShardCall
from gateway.validation import FieldViolation, InvalidRequest, check_id

log = logging.getLogger("rgw.inventory")
DEFAULT_TTL_MS = 15 * 60 * 1000
MIN_TTL_MS = 1000
MAX_TTL_MS = 24 * 3600 * 1000
SKU_CACHE_SECONDS = 5.0
SWEEP_SECONDS = 2.0
_SKU_CODE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SKU_LOOKUP = "SELECT id, shards FROM skus WHERE brand_id = $1 AND code = $2"


class OrderIdReused(Exception):
    """The order id was used before (in this brand) with a different request; nothing was changed."""


class SecretKeyRing(Protocol):
    """Decrypts a secret's ciphertext (gateway/inventory/crypto.py): aad binds it to its brand, SKU and id."""

    def decrypt(self, key_id: str, nonce: bytes, ciphertext: bytes, aad: bytes) -> str: ...


def secret_aad(brand_id: int, sku_id: int, secret_id: int) -> bytes:
    """The associated data a secret's ciphertext was sealed with (gateway/inventory/crypto.py: brand and SKU)."""
    return associated_data(brand_id, sku_id)


class Strategy(StrEnum):
    """Which available secrets an order takes (the script's names)."""

    EARLIEST_EXPIRY = "expiry"
    CHEAPEST = "cost"
    SUPPLIER = "supplier"


class InventoryOutcome(StrEnum):
    """The decision on an order (mirrors redemption.v1.InventoryOutcome)."""

    DISPENSED = "DISPENSED"
    HELD = "HELD"
    OUT_OF_STOCK = "OUT_OF_STOCK"
    UNKNOWN_SKU = "UNKNOWN_SKU"
    QUANTITY_ABOVE_LIMIT = "QUANTITY_ABOVE_LIMIT"
    HOLD_EXPIRED = "HOLD_EXPIRED"
    ORDER_NOT_FOUND = "ORDER_NOT_FOUND"
    RELEASED = "RELEASED"


@dataclass(frozen=True, slots=True)
class OrderInput:
    """A Dispense or Hold as the caller sent it, not yet checked. strategy None: a value this gateway does not
    know; ttl_ms None: unset (Hold: the default)."""

    order_id: str
    sku: str
    quantity: int
    strategy: Strategy | None = Strategy.EARLIEST_EXPIRY
    supplier: str = ""
    ttl_ms: int | None = None


class DispensedSecret(NamedTuple):
    """One secret given to the order, in plaintext: for the order's answer only (kept out of repr). A NamedTuple:
    an answer makes one per secret."""

    secret_id: int
    secret: str
    supplier: str
    expires_at_ms: int
    use_number: int

    def __repr__(self) -> str:
        return (f"DispensedSecret(secret_id={self.secret_id}, supplier={self.supplier!r}, "
                f"expires_at_ms={self.expires_at_ms}, use_number={self.use_number})")  # fmt: skip


@dataclass(frozen=True, slots=True)
class OrderResult:
    """The answer to Dispense, Hold, Confirm or Release."""

    outcome: InventoryOutcome
    reason: str
    secrets: tuple[DispensedSecret, ...] = ()
    replayed: bool = False
    late: bool = False
    hold_expires_ms: int = 0
    released: int = 0


@dataclass(frozen=True, slots=True)
class Sku:
    """What the request path needs of a SKU."""

    id: int
    shards: int


def _result(outcome: InventoryOutcome, reason: str = "") -> OrderResult:
    return OrderResult(outcome, reason or outcome.value)


UNKNOWN_SKU = _result(InventoryOutcome.UNKNOWN_SKU)
ORDER_NOT_FOUND = _result(InventoryOutcome.ORDER_NOT_FOUND)
# the script's statuses that are plain outcomes
_PLAIN = {
    "OUT_OF_STOCK": _result(InventoryOutcome.OUT_OF_STOCK),
    "UNKNOWN_SKU": UNKNOWN_SKU,
    "QUANTITY_ABOVE_LIMIT": _result(InventoryOutcome.QUANTITY_ABOVE_LIMIT),
    "HOLD_EXPIRED": _result(InventoryOutcome.HOLD_EXPIRED),
    "ORDER_NOT_FOUND": ORDER_NOT_FOUND,
    "NOT_HELD": _result(InventoryOutcome.ORDER_NOT_FOUND, "NOT_HELD"),
}


def _decided(results: list[OrderResult | ItemFailure | None]) -> list[OrderResult | ItemFailure]:
    """A batch's results once every order has one."""
    done = [r for r in results if r is not None]
    if len(done) != len(results):
        raise RuntimeError("an order of the batch was left undecided")
    return done


def check_order(request: OrderInput, *, hold: bool) -> int:
    """The hold's ttl ms (0 for a dispense) of a well-formed request; InvalidRequest naming every bad field."""
    violations = check_id(request.order_id, "order_id", 128, required=True)
    if not _SKU_CODE.fullmatch(request.sku):
        violations.append(FieldViolation("sku", "must be a SKU code: 1 to 64 of a-z, 0-9 and . _ - (first a-z, 0-9)"))
    if request.quantity < 1:
        violations.append(FieldViolation("quantity", "must be at least 1"))
    if request.strategy is None:
        violations.append(FieldViolation("strategy", "is not a known strategy"))
    elif request.strategy is Strategy.SUPPLIER:
        violations += check_id(request.supplier, "supplier", 64, required=True)
    elif request.supplier:
        violations.append(FieldViolation("supplier", "is only for STRATEGY_SUPPLIER"))
    ttl = DEFAULT_TTL_MS if request.ttl_ms is None else request.ttl_ms
    if hold and not MIN_TTL_MS <= ttl <= MAX_TTL_MS:
        violations.append(FieldViolation("ttl", "must be from 1 second to 24 hours"))
    if violations:
        raise InvalidRequest(violations)
    return ttl if hold else 0


def order_fingerprint(kind: str, request: OrderInput) -> str:
    """What a retry must repeat to get the first answer: Dispense and Hold are different requests."""
    strategy = request.strategy.value if request.strategy is not None else ""
    text = "\x1f".join((kind, request.sku, str(request.quantity), strategy, request.supplier))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class SkuDirectory:
    """A brand's SKUs by code, from Postgres, each kept in memory for a few seconds (unknown ones too)."""

    def __init__(self, pool: asyncpg.Pool, ttl_s: float = SKU_CACHE_SECONDS) -> None:
        self._pool = pool
        self._ttl_s = ttl_s
        self._known: dict[tuple[int, str], tuple[float, Sku | None]] = {}

    async def get(self, brand_id: int, code: str) -> Sku | None:
        now = time.monotonic()
        hit = self._known.get((brand_id, code))
        if hit is not None and now < hit[0]:
            return hit[1]
        sku = await self._load(brand_id, code)
        if len(self._known) >= 10_000:
            self._known.clear()
        self._known[(brand_id, code)] = (now + self._ttl_s, sku)
        return sku

    async def _load(self, brand_id: int, code: str) -> Sku | None:
        try:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(_SKU_LOOKUP, brand_id, code)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise LedgerUnavailable(type(exc).__name__) from exc
        return None if row is None else Sku(int(row["id"]), int(row["shards"]))


class InventoryService:
    """The rules of InventoryService, with the store, the SKU directory, the key ring and the clock injected."""

    def __init__(
        self, *, store: InventoryStore, skus: SkuDirectory, secret_keys: SecretKeyRing, clock: Clock,
        sweep_seconds: float = SWEEP_SECONDS,
    ) -> None:  # fmt: skip
        self._store = store
        self._skus = skus
        self._keys = secret_keys
        self._clock = clock
        self._sweep_seconds = sweep_seconds
        # SKU shards this gateway held stock on: swept periodically (others' holds expire on the shard's next call)
        self._held: set[tuple[int, int, int]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def dispense(self, request: OrderInput, caller: Caller) -> OrderResult:
        return await self._new_order("dispense", request, caller)

    async def dispense_many(self, requests: Sequence[OrderInput], caller: Caller) -> list[OrderResult | ItemFailure]:
        """DispenseStream's batch: every order decided exactly as Dispense decides it - checked, claimed in the
        registry (all of the message's orders in one round trip), then the orders of each SKU shard in ONE script
        call (each as its own dispense, in message order; the shards concurrently). An order that fails
        (malformed, its id reused, Redis unavailable for its shard) fails alone, as what Dispense would raise."""
        results: list[OrderResult | ItemFailure | None] = [None] * len(requests)
        now = self._clock.now_ms()
        claims: list[tuple[int, str, str, Sku, BatchOrder]] = []  # index, order id, route, sku, order
        for index, request in enumerate(requests):
            try:
                check_order(request, hold=False)
                sku = await self._skus.get(caller.brand_id, request.sku)
            except (InvalidRequest, LedgerUnavailable) as exc:
                results[index] = ItemFailure(exc)
                continue
            if sku is None:
                results[index] = UNKNOWN_SKU
                continue
            assert request.strategy is not None
            fingerprint = order_fingerprint("dispense", request)
            route = f"{sku.id}.{layout.order_shard(request.order_id, sku.shards)}|{fingerprint}"
            order = BatchOrder(request.order_id, fingerprint, request.quantity, request.strategy.value,
                               request.supplier, uuid7(now))  # fmt: skip
            claims.append((index, request.order_id, route, sku, order))
        if not claims:
            return _decided(results)
        try:
            held = await self._store.register_orders(caller.brand_id, [(c[1], c[2]) for c in claims])
        except StoreUnavailable as exc:
            return [r if r is not None else ItemFailure(exc) for r in results]
        shards: dict[tuple[int, int], list[tuple[int, BatchOrder]]] = {}
        for (index, order_id, route, sku, order), found in zip(claims, held, strict=True):
            if found != route:
                results[index] = ItemFailure(OrderIdReused(order_id))
                continue
            shard = int(route.partition("|")[0].partition(".")[2])
            shards.setdefault((sku.id, shard), []).append((index, order))
        groups = list(shards.items())
        decided = await asyncio.gather(
            *(self._store.dispense_many(now, caller.brand_id, sku_id, shard, caller.client_id, [o for _, o in group])
              for (sku_id, shard), group in groups),
            return_exceptions=True,
        )  # fmt: skip
        for ((sku_id, _), group), answers in zip(groups, decided, strict=True):
            for position, (index, _) in enumerate(group):
                results[index] = self._batch_result(answers, position, caller.brand_id, sku_id)
        return _decided(results)

    def _batch_result(
        self, answers: list[ShardAnswer] | BaseException, position: int, brand_id: int, sku_id: int
    ) -> OrderResult | ItemFailure:
        if isinstance(answers, Exception):
            return ItemFailure(answers)
        if isinstance(answers, BaseException):  # CancelledError and the like end the stream
            raise answers
        try:
            return self._answer(answers[position], brand_id, sku_id)
        except (OrderIdReused, SecretKeyError) as exc:
            return ItemFailure(exc)

    async def hold(self, request: OrderInput, caller: Caller) -> OrderResult:
        return await self._new_order("hold", request, caller)

    async def confirm(self, order_id: str, caller: Caller) -> OrderResult:
        return await self._existing_order("confirm", order_id, caller)

    async def release(self, order_id: str, caller: Caller) -> OrderResult:
        return await self._existing_order("release", order_id, caller)

    async def _new_order(self, op: str, request: OrderInput, caller: Caller) -> OrderResult:
        ttl_ms = check_order(request, hold=op == "hold")
        assert request.strategy is not None
        sku = await self._skus.get(caller.brand_id, request.sku)
        if sku is None:
            return UNKNOWN_SKU
        shard = layout.order_shard(request.order_id, sku.shards)
        route = f"{sku.id}.{shard}|{order_fingerprint(op, request)}"
        if await self._store.register_order(caller.brand_id, request.order_id, route) != route:
            raise OrderIdReused(request.order_id)
        if op == "hold":
            self._held.add((caller.brand_id, sku.id, shard))
        now = self._clock.now_ms()
        call = ShardCall(
            op, now, caller.brand_id, sku.id, shard, order_id=request.order_id, fingerprint=route.split("|")[1],
            quantity=request.quantity, strategy=request.strategy.value, supplier=request.supplier, ttl_ms=ttl_ms,
            event_id=uuid7(now), client_id=caller.client_id,
        )  # fmt: skip
        return self._answer(await self._store.call(call), caller.brand_id, sku.id)

    async def _existing_order(self, op: str, order_id: str, caller: Caller) -> OrderResult:
        violations = check_id(order_id, "order_id", 128, required=True)
        if violations:
            raise InvalidRequest(violations)
        found = await self._store.find_order(caller.brand_id, order_id)
        if found is None:
            return ORDER_NOT_FOUND
        sku_text, _, shard_text = found.partition("|")[0].partition(".")
        sku_id, shard = int(sku_text), int(shard_text)
        now = self._clock.now_ms()
        call = ShardCall(op, now, caller.brand_id, sku_id, shard, order_id=order_id, event_id=uuid7(now),
                         client_id=caller.client_id)  # fmt: skip
        return self._answer(await self._store.call(call), caller.brand_id, sku_id)

    def _answer(self, answer: ShardAnswer, brand_id: int, sku_id: int) -> OrderResult:
        if answer.status == "ORDER_ID_REUSED":
            raise OrderIdReused("")
        if answer.status in _PLAIN:
            return _PLAIN[answer.status]
        if answer.status == "HELD":
            return OrderResult(InventoryOutcome.HELD, "HELD", replayed=answer.replayed,
                               hold_expires_ms=answer.hold_expires_ms)  # fmt: skip
        if answer.status == "RELEASED":
            return OrderResult(InventoryOutcome.RELEASED, "RELEASED", replayed=answer.replayed,
                               released=answer.released)  # fmt: skip
        if answer.status != "DISPENSED":
            raise RuntimeError(f"unexpected inventory script status {answer.status!r}")
        aad = associated_data(brand_id, sku_id)  # the same for every secret of the SKU
        decrypt = self._keys.decrypt
        secrets = tuple(
            DispensedSecret(t.secret_id, decrypt(t.key_id, t.nonce, t.ciphertext, aad), t.supplier, t.expires_at_ms,
                            t.use_number)
            for t in answer.secrets
        )  # fmt: skip
        return OrderResult(InventoryOutcome.DISPENSED, "DISPENSED", secrets, answer.replayed, answer.late)

    # The sweeper ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start expiring due holds of the shards this gateway held on, every sweep_seconds."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def sweep(self) -> int:
        """Expire the due holds of every shard this gateway held on; returns the holds still open."""
        open_holds = 0
        for brand_id, sku_id, shard in sorted(self._held):
            now = self._clock.now_ms()
            answer = await self._store.call(ShardCall("sweep", now, brand_id, sku_id, shard, event_id=uuid7(now)))
            open_holds += answer.holds_left
        return open_holds

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_seconds)
            try:
                await self.sweep()
            except StoreUnavailable as exc:
                log.warning("inventory sweep: redis unavailable (%s)", exc)
