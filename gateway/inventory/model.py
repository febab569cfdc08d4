"""SKUs and secrets in Postgres (migration 0008): the Sku row, its rules, and creating and listing SKUs.

A new SKU is checked whole first (InvalidRequest with every bad field, named like the API's Sku message; nothing
is written), then inserted and published to Redis (gateway/inventory/loader.py publish_sku: every shard's meta
hash and outbox stream) inside the same transaction: a failed publish leaves no SKU. Publishing is idempotent, so
a SKU whose Redis state was lost is published again by the loader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from functools import partial

import asyncpg

from gateway.inventory import layout
from gateway.redis_client import RedisClient
from gateway.shard_spread import shards_for
from gateway.tenancy.admin_rules import check
from gateway.tenancy.model import AlreadyExists, NotFoundError
from gateway.validation import FieldViolation, InvalidRequest

CODE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
CODE_RULE = "must be 1 to 64 characters of a-z, 0-9, '.', '_' and '-', not starting with a symbol"
MAX_NAME = 200
MAX_REUSE = 1000
MAX_SHARDS = 64
MAX_PER_ORDER = 1000
MAX_LOW_STOCK = 2**31 - 1
MAX_LIST = 1000

_COLUMNS = "id, brand_id, code, name, reuse, shards, max_per_order, low_stock, created_at"
_SPREAD = f"UPDATE skus SET shards = $2 WHERE id = $1 RETURNING {_COLUMNS}"  # noqa: S608 - constant columns
_INSERT = f"""INSERT INTO skus (brand_id, code, name, reuse, shards, max_per_order, low_stock)
              VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {_COLUMNS}"""  # noqa: S608 - constants only
_BY_CODE = f"SELECT {_COLUMNS} FROM skus WHERE brand_id = $1 AND code = $2"  # noqa: S608
_BY_ID = f"SELECT {_COLUMNS} FROM skus WHERE id = $1"  # noqa: S608
_BY_CODES = f"SELECT {_COLUMNS} FROM skus WHERE brand_id = $1 AND code = ANY($2::text[])"  # noqa: S608
_LIST = f"""SELECT {_COLUMNS} FROM skus WHERE ($1::bigint IS NULL OR brand_id = $1) AND id > $2
            ORDER BY id LIMIT $3"""  # noqa: S608
_BRAND = "SELECT 1 FROM brands WHERE id = $1"


@dataclass(frozen=True, slots=True)
class Sku:
    """A kind of card secret a brand sells (a Mango TV month card): its rules for orders and its Redis shards."""

    id: int
    brand_id: int
    code: str
    name: str
    reuse: int = 1
    shards: int = 1
    max_per_order: int = 100
    low_stock: int = 0
    created_at: datetime | None = None


def from_row(row: asyncpg.Record) -> Sku:
    """A skus row as a Sku."""
    return Sku(**dict(row))


def _whole(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def is_code(value: object) -> bool:
    """A SKU code (what InventoryService requests and import records carry)."""
    return isinstance(value, str) and CODE_RE.fullmatch(value) is not None


def violations(sku: Sku) -> list[FieldViolation]:
    """Every rule `sku` breaks, by the API's field names."""
    name_ok = isinstance(sku.name, str) and 1 <= len(sku.name) <= MAX_NAME and sku.name.isprintable()
    return [
        *check(is_code(sku.code), "code", CODE_RULE),
        *check(name_ok, "name", f"must be 1 to {MAX_NAME} printable characters"),
        *check(_whole(sku.reuse, 1, MAX_REUSE), "reuse", f"must be from 1 to {MAX_REUSE}"),
        *check(_whole(sku.shards, 1, MAX_SHARDS), "shards", f"must be from 1 to {MAX_SHARDS}"),
        *check(_whole(sku.max_per_order, 1, MAX_PER_ORDER), "max_per_order", f"must be from 1 to {MAX_PER_ORDER}"),
        *check(_whole(sku.low_stock, 0, MAX_LOW_STOCK), "low_stock", f"must be from 0 to {MAX_LOW_STOCK}"),
    ]


async def create_sku(
    conn: asyncpg.Connection,
    redis: RedisClient,
    *,
    brand_id: int,
    code: str,
    name: str,
    reuse: int = 1,
    shards: int = 1,
    max_per_order: int = 100,
    low_stock: int = 0,
) -> Sku:
    """A new SKU of `brand_id`, published to every shard. InvalidRequest with every bad field; AlreadyExists when
    the brand has the code already; NotFoundError when there is no such brand."""
    from gateway.inventory.loader import publish_sku  # the loader builds on this module

    wanted = Sku(0, brand_id, code, name, reuse, shards, max_per_order, low_stock)
    problems = violations(wanted)
    if problems:
        raise InvalidRequest(problems)
    async with conn.transaction():
        if await conn.fetchval(_BRAND, brand_id) is None:
            raise NotFoundError("no such brand")
        try:
            async with conn.transaction():
                row = await conn.fetchrow(_INSERT, brand_id, code, name, reuse, shards, max_per_order, low_stock)
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"the brand has a SKU {code!r} already") from None
        sku = from_row(row)
        spread = await shards_for(redis, sku.shards, partial(layout.meta_key, sku.id), limit=MAX_SHARDS)
        if spread != sku.shards:  # a Redis Cluster: as many shards as spread evenly over its masters
            sku = from_row(await conn.fetchrow(_SPREAD, sku.id, spread))
        await publish_sku(redis, sku)
    return sku


async def get_sku_by_code(conn: asyncpg.Connection, brand_id: int, code: str) -> Sku:
    """The brand's SKU `code`; NotFoundError when it has none (another brand's looks the same)."""
    row = await conn.fetchrow(_BY_CODE, brand_id, code) if is_code(code) else None
    if row is None:
        raise NotFoundError("no such SKU")
    return from_row(row)


async def get_sku(conn: asyncpg.Connection, sku_id: int) -> Sku:
    """A SKU by id; NotFoundError when there is none."""
    row = await conn.fetchrow(_BY_ID, sku_id)
    if row is None:
        raise NotFoundError("no such SKU")
    return from_row(row)


async def skus_by_code(conn: asyncpg.Connection, brand_id: int, codes: list[str]) -> dict[str, Sku]:
    """The brand's SKUs among `codes`, by code (the others are missing)."""
    rows = await conn.fetch(_BY_CODES, brand_id, [c for c in set(codes) if is_code(c)])
    return {row["code"]: from_row(row) for row in rows}


async def list_skus(conn: asyncpg.Connection, brand_id: int | None, after_id: int = 0, limit: int = 100) -> list[Sku]:
    """The brand's SKUs (None: every brand's) with ids above `after_id`, by id, at most `limit` (1..MAX_LIST)."""
    if not 1 <= limit <= MAX_LIST:
        raise InvalidRequest([FieldViolation("limit", f"must be from 1 to {MAX_LIST}")])
    return [from_row(row) for row in await conn.fetch(_LIST, brand_id, after_id, limit)]
