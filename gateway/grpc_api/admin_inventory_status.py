"""AdminService.GetInventoryStatus: protobuf -> gateway/inventory/status.py -> protobuf. The servicer decides for
which brand the caller acts (None: a platform caller, every brand) and delegates here. An unknown SKU code is
NOT_FOUND, exactly like another brand's; Redis down is UNAVAILABLE."""

from __future__ import annotations

from functools import partial

import asyncpg
from redis import exceptions as redis_errors

from gateway.clock import Clock
from gateway.domain import StoreUnavailable
from gateway.grpc_api.admin_access import RegistryAccess
from gateway.inventory import status
from gateway.inventory.model import CODE_RULE, is_code
from gateway.pb.redemption.v1 import admin_pb2 as pb
from gateway.redis_client import RedisClient
from gateway.validation import FieldViolation, InvalidRequest

MAX_WITHIN_S = 366 * 86_400
_REDIS_DOWN = (redis_errors.RedisError, OSError, TimeoutError)


async def get_inventory_status(
    request: pb.GetInventoryStatusRequest, *, registry: RegistryAccess, redis: RedisClient, clock: Clock,
    brand_id: int | None,
) -> pb.GetInventoryStatusResponse:  # fmt: skip
    """The stock of the brand's SKUs (or of the one named), by supplier."""
    within_ms = _within_ms(request)
    if request.sku and not is_code(request.sku):
        raise InvalidRequest([FieldViolation("sku", CODE_RULE)])
    query = partial(_status, redis=redis, brand_id=brand_id, code=request.sku or None, now_ms=clock.now_ms(),
                    within_ms=within_ms)  # fmt: skip
    return pb.GetInventoryStatusResponse(skus=[_sku_stock(stock) for stock in await registry.read(query)])


async def _status(
    conn: asyncpg.Connection, *, redis: RedisClient, brand_id: int | None, code: str | None, now_ms: int, within_ms: int
) -> list[status.SkuStock]:
    skus = await status.find_skus(conn, brand_id, code)
    try:
        return await status.inventory_status(conn, redis, skus, now_ms=now_ms, within_ms=within_ms)
    except _REDIS_DOWN as exc:
        raise StoreUnavailable(f"Redis is unavailable ({type(exc).__name__})") from None


def _within_ms(request: pb.GetInventoryStatusRequest) -> int:
    if not request.HasField("expiring_within"):
        return status.DEFAULT_WITHIN_MS
    within = request.expiring_within
    seconds = within.seconds + within.nanos / 1e9
    if not 0 < seconds <= MAX_WITHIN_S or within.nanos < 0:
        raise InvalidRequest([FieldViolation("expiring_within", "must be more than 0 and at most 366 days")])
    return int(seconds * 1000)


def _supplier(stock: status.SupplierStock) -> pb.SupplierStock:
    return pb.SupplierStock(supplier=stock.supplier, available=stock.available, held=stock.held,
                            dispensed=stock.dispensed, expired=stock.expired, expiring=stock.expiring)  # fmt: skip


def _sku_stock(stock: status.SkuStock) -> pb.SkuStock:
    return pb.SkuStock(sku=stock.sku.code, suppliers=[_supplier(s) for s in stock.suppliers],
                       total=_supplier(stock.total), low=stock.low)  # fmt: skip
