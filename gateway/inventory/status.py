"""Stock by SKU and supplier (`rgw inventory status`, AdminService.GetInventoryStatus, the stock gauges).

Each figure counts secrets (a reusable secret once, however many dispenses it has left), except `dispensed`,
which counts secret uses given to orders:
- available: in the supplier's index with an expiry after now (dispensable now: not expired, dispenses left);
- expiring:  the available ones whose expiry is within the asked window;
- expired:   still in the supplier's index with an expiry at or before now - secrets whose expiry passed while
             they had dispenses left (the scripts skip them by score, never dispense them);
- held:      secret uses listed by the orders in the shard's holds set (an expired hold not yet swept counts until
             its stock is returned);
- dispensed: the ledger's `dispenses` rows (Postgres, the system of record; it trails Redis by the writer's lag,
             normally well under a second).
A SKU is low when low_stock > 0 and its available secrets are at or below it.

Redis: per SKU shard one pipelined round trip (three ZCOUNTs per supplier and the holds set), then one for the
held orders and one for their secrets' suppliers. Postgres: the SKUs, their suppliers and the dispensed counts.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis import exceptions as redis_errors

from gateway.clock import Clock
from gateway.inventory import layout
from gateway.inventory.model import Sku, from_row
from gateway.ledger import metrics
from gateway.redis_client import RedisClient
from gateway.tenancy.model import NotFoundError

log = logging.getLogger("rgw.inventory.status")
DAY_MS = 86_400_000
DEFAULT_WITHIN_MS = 7 * DAY_MS
UNKNOWN_SUPPLIER = "?"  # a held secret whose record is missing (reconcile reports it)
# The most (brand, SKU) series the gauges carry; further SKUs are summed per brand under sku="_other".
MAX_SKU_SERIES = 500
OTHER_SKUS = "_other"

_SKUS = """SELECT id, brand_id, code, name, reuse, shards, max_per_order, low_stock, created_at FROM skus
           WHERE ($1::bigint IS NULL OR brand_id = $1) AND ($2::text IS NULL OR code = $2)
           ORDER BY brand_id, code"""
_SUPPLIERS = "SELECT DISTINCT sku_id, supplier FROM secrets WHERE sku_id = ANY($1::bigint[])"
_DISPENSED = """SELECT sku_id, supplier, count(*) AS n FROM dispenses WHERE sku_id = ANY($1::bigint[])
                GROUP BY sku_id, supplier"""


@dataclass(frozen=True, slots=True)
class SupplierStock:
    """One SKU's stock of one supplier (or the SKU's totals)."""

    supplier: str
    available: int = 0
    held: int = 0
    dispensed: int = 0
    expired: int = 0
    expiring: int = 0

    def plus(self, other: SupplierStock) -> SupplierStock:
        """The sums of both (under this one's supplier)."""
        return SupplierStock(self.supplier, self.available + other.available, self.held + other.held,
                             self.dispensed + other.dispensed, self.expired + other.expired,
                             self.expiring + other.expiring)  # fmt: skip


@dataclass(frozen=True, slots=True)
class SkuStock:
    """One SKU's stock by supplier (ordered by supplier), its totals and whether it is low."""

    sku: Sku
    suppliers: list[SupplierStock] = field(default_factory=list)

    @property
    def total(self) -> SupplierStock:
        total = SupplierStock("")
        for stock in self.suppliers:
            total = total.plus(stock)
        return total

    @property
    def low(self) -> bool:
        return self.sku.low_stock > 0 and self.total.available <= self.sku.low_stock

    def as_dict(self) -> dict[str, Any]:
        """For --json."""
        figures = ("available", "held", "dispensed", "expired", "expiring")
        total = self.total
        return {"brand_id": self.sku.brand_id, "sku": self.sku.code, "low_stock": self.sku.low_stock, "low": self.low,
                "total": {name: getattr(total, name) for name in figures},
                "suppliers": [{"supplier": s.supplier, **{name: getattr(s, name) for name in figures}}
                              for s in self.suppliers]}  # fmt: skip


async def find_skus(conn: asyncpg.Connection, brand_id: int | None, code: str | None = None) -> list[Sku]:
    """The SKUs asked about: the brand's (None: every brand's), one code or all; NotFoundError for an unknown
    code (another brand's looks the same)."""
    skus = [from_row(row) for row in await conn.fetch(_SKUS, brand_id, code)]
    if code is not None and not skus:
        raise NotFoundError("no such SKU")
    return skus


async def inventory_status(
    conn: asyncpg.Connection,
    redis: RedisClient,
    skus: list[Sku],
    *,
    now_ms: int,
    within_ms: int = DEFAULT_WITHIN_MS,
    dispensed: bool = True,
) -> list[SkuStock]:
    """The stock of each SKU (dispensed=False leaves the ledger's dispensed counts out, at 0)."""
    ids = [sku.id for sku in skus]
    suppliers: dict[int, set[str]] = defaultdict(set)
    for row in await conn.fetch(_SUPPLIERS, ids):
        suppliers[row["sku_id"]].add(row["supplier"])
    given: dict[tuple[int, str], int] = {}
    if dispensed:
        given = {(r["sku_id"], r["supplier"]): r["n"] for r in await conn.fetch(_DISPENSED, ids)}
        for sku_id, supplier in given:
            suppliers[sku_id].add(supplier)
    stocks = []
    for sku in skus:
        counts = await _redis_counts(redis, sku, sorted(suppliers[sku.id]), now_ms, within_ms)
        for (sku_id, supplier), n in given.items():
            if sku_id == sku.id:
                counts[supplier]["dispensed"] += n
        stocks.append(SkuStock(sku, [_stock(name, figures) for name, figures in sorted(counts.items())]))
    return stocks


def _stock(supplier: str, figures: Counter[str]) -> SupplierStock:
    names = ("available", "held", "dispensed", "expired", "expiring")
    return SupplierStock(supplier, *(figures[name] for name in names))


async def _redis_counts(
    redis: RedisClient, sku: Sku, suppliers: list[str], now_ms: int, within_ms: int
) -> defaultdict[str, Counter[str]]:
    # every known supplier is listed, even with nothing left
    counts: defaultdict[str, Counter[str]] = defaultdict(Counter, {supplier: Counter() for supplier in suppliers})
    for shard in range(sku.shards):
        async with redis.pipeline(transaction=False) as pipe:
            for supplier in suppliers:
                key = layout.by_supplier_key(sku.id, shard, supplier)
                pipe.zcount(key, f"({now_ms}", "+inf")
                pipe.zcount(key, f"({now_ms}", now_ms + within_ms)
                pipe.zcount(key, "-inf", now_ms)
            pipe.zrange(layout.holds_key(sku.id, shard), 0, -1)
            *figures, holds = await pipe.execute()
        for i, supplier in enumerate(suppliers):
            counts[supplier].update(dict(zip(("available", "expiring", "expired"), figures[3 * i : 3 * i + 3],
                                             strict=True)))  # fmt: skip
        for supplier in await held_suppliers(redis, sku.id, shard, [str(o) for o in holds]):
            counts[supplier]["held"] += 1
    return counts


async def held_suppliers(redis: RedisClient, sku_id: int, shard: int, orders: list[str]) -> list[str]:
    """The supplier of each secret use the given orders list (UNKNOWN_SUPPLIER where the record is missing)."""
    if not orders:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for order in orders:
            pipe.hget(layout.order_key(sku_id, shard, order), "ids")
        lists: list[str | None] = await pipe.execute()
    secret_ids = [item.split(";", 1)[0] for ids in lists if ids for item in ids.split(",") if item]
    if not secret_ids:
        return []
    records: list[Any] = await redis.hmget(layout.secrets_key(sku_id, shard), secret_ids)
    return [record.split("|", 1)[0] if record else UNKNOWN_SUPPLIER for record in records]


# --- the stock gauges ------------------------------------------------------------------------------------------

_exported: set[tuple[str, str]] = set()


def export_stock_metrics(stocks: list[SkuStock]) -> None:
    """Set rgw_inventory_available / rgw_inventory_low per (brand, SKU) - at most MAX_SKU_SERIES series, the rest
    summed per brand under sku="_other" - and drop the series of SKUs no longer listed."""
    available: dict[tuple[str, str], int] = {}
    low: dict[tuple[str, str], int] = {}
    for n, stock in enumerate(stocks):
        labels = (str(stock.sku.brand_id), stock.sku.code if n < MAX_SKU_SERIES else OTHER_SKUS)
        available[labels] = available.get(labels, 0) + stock.total.available
        low[labels] = max(low.get(labels, 0), int(stock.low))
    for labels in _exported - available.keys():
        metrics.INVENTORY_AVAILABLE.remove(*labels)
        metrics.INVENTORY_LOW.remove(*labels)
    for labels, value in available.items():
        metrics.INVENTORY_AVAILABLE.labels(*labels).set(value)
        metrics.INVENTORY_LOW.labels(*labels).set(low[labels])
    _exported.clear()
    _exported.update(available)


async def refresh_stock_metrics(conn: asyncpg.Connection, redis: RedisClient, *, now_ms: int) -> int:
    """One refresh of the stock gauges over every SKU (no ledger query: the gauges need Redis only); returns the
    SKUs counted."""
    stocks = await inventory_status(conn, redis, await find_skus(conn, None), now_ms=now_ms, dispensed=False)
    export_stock_metrics(stocks)
    metrics.INVENTORY_STOCK_AGE.set(now_ms / 1000)
    return len(stocks)


_REFRESH_FAILED = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, redis_errors.RedisError)


async def run_stock_exporter(
    connect: Callable[[], Awaitable[asyncpg.Connection]],
    redis: RedisClient,
    stop: asyncio.Event,
    *,
    clock: Clock,
    interval_s: float = 30.0,
) -> None:
    """Refresh the stock gauges every `interval_s` until `stop` is set, on a connection of its own (a failure is
    logged and retried next round; the gauges' refreshed timestamp stops moving meanwhile)."""
    conn: asyncpg.Connection | None = None
    try:
        while not stop.is_set():
            try:
                conn = conn if conn is not None and not conn.is_closed() else await connect()
                await refresh_stock_metrics(conn, redis, now_ms=clock.now_ms())
            except _REFRESH_FAILED as exc:
                log.warning("inventory stock gauges not refreshed (%s)", type(exc).__name__)
                _closed(conn)
                conn = None
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
            except TimeoutError:
                pass
    finally:
        _closed(conn)


def _closed(conn: asyncpg.Connection | None) -> None:
    if conn is not None and not conn.is_closed():
        conn.terminate()
