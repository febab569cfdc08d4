"""`rgw sku create|list`, `rgw inventory import|resume`, `rgw keys rotate`: the card-secret inventory's stock
(gateway/inventory/), straight against Postgres (RGW_DATABASE_URL) and Redis (RGW_REDIS_URL).

`rgw inventory import --file F.csv` reads a CSV with the header `sku,supplier,secret,cost,currency,expires_at`
(expires_at ISO 8601; without an offset: UTC) and prints each refused row as `line N: REASON` (MALFORMED(field),
DUPLICATE, UNKNOWN_SKU, EXPIRED - never the secret), then what was imported. Exit codes: 0 done; 1 failed (or
imported but not loaded into Redis: run `rgw inventory resume`); 2 rows refused (with --all-or-nothing: nothing
was imported) or a file that cannot be read.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg

from gateway.durability import is_initialised
from gateway.inventory import importing, model, rotation
from gateway.redis_client import RedisClient, connect
from gateway.settings import Settings
from gateway.tenancy import admin_store
from gateway.tenancy.model import AlreadyExists
from gateway.validation import InvalidRequest

Body = Callable[[asyncpg.Connection, RedisClient], Awaitable[int]]


class _Failed(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return "cli:unknown"


@asynccontextmanager
async def _stores(
    settings: Settings, *, redis_initialised: bool
) -> AsyncIterator[tuple[asyncpg.Connection, RedisClient]]:
    conn = await asyncpg.connect(settings.database_url)
    redis = connect(*settings.redis_target, pool_size=4, timeout_s=max(settings.redis_timeout_seconds, 10))
    try:
        if redis_initialised and not await is_initialised(redis):
            raise _Failed("Redis is not initialised from Postgres; run `rgw rebuild-redis` first")
        yield conn, redis
    finally:
        await redis.aclose()
        await conn.close()


async def _brand(conn: asyncpg.Connection, named: str | None) -> int | None:
    """The brand `--brand` names, by id or slug (None: not given)."""
    if named is None:
        return None
    for brand in await admin_store.list_brands(conn):
        if str(brand.id) == named or brand.slug == named:
            return brand.id
    raise _Failed(f"--brand names no brand: {named[:64]!r}")


async def _run(settings: Settings, body: Body, *, redis_initialised: bool = True) -> int:
    try:
        async with _stores(settings, redis_initialised=redis_initialised) as (conn, redis):
            return await body(conn, redis)
    except _Failed as exc:
        print(f"rgw: {exc}", file=sys.stderr)
        return exc.code
    except InvalidRequest as exc:
        for v in exc.violations:
            print(f"rgw: --{v.field.replace('_', '-')}: {v.description}", file=sys.stderr)
        return 2
    except importing.BadFile as exc:
        print(f"rgw: import refused - {exc}", file=sys.stderr)
        return 2
    except (LookupError, AlreadyExists, ValueError, importing.SecretImportError) as exc:
        print(f"rgw: {exc}", file=sys.stderr)
        return 1


def _print_sku(sku: model.Sku) -> None:
    print(f"{sku.id}\t{sku.code}\tbrand={sku.brand_id}\treuse={sku.reuse}\tshards={sku.shards}\t"
          f"max_per_order={sku.max_per_order}\tlow_stock={sku.low_stock}\t{sku.name}")  # fmt: skip


async def _sku_create(args: argparse.Namespace, settings: Settings) -> int:
    async def body(conn: asyncpg.Connection, redis: RedisClient) -> int:
        brand_id = await _brand(conn, args.brand)
        assert brand_id is not None
        sku = await model.create_sku(conn, redis, brand_id=brand_id, code=args.code, name=args.name, reuse=args.reuse,
                                     shards=args.shards, max_per_order=args.max_per_order,
                                     low_stock=args.low_stock)  # fmt: skip
        _print_sku(sku)
        return 0

    return await _run(settings, body)


async def _sku_list(args: argparse.Namespace, settings: Settings) -> int:
    async def body(conn: asyncpg.Connection, redis: RedisClient) -> int:
        brand_id = await _brand(conn, args.brand)
        after = 0
        while page := await model.list_skus(conn, brand_id, after, model.MAX_LIST):
            for sku in page:
                _print_sku(sku)
            after = page[-1].id
        return 0

    return await _run(settings, body, redis_initialised=False)


async def _import(args: argparse.Namespace, settings: Settings) -> int:
    ring = settings.secret_ring()

    async def body(conn: asyncpg.Connection, redis: RedisClient) -> int:
        brand_id = await _brand(conn, args.brand)
        assert brand_id is not None
        try:
            with args.file.open(newline="", encoding="utf-8-sig") as handle:
                lines = handle.readlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise _Failed(f"cannot read {args.file}: {type(exc).__name__}", 2) from None
        result = await importing.import_csv(conn, redis, ring, brand_id, lines, all_or_nothing=args.all_or_nothing,
                                            actor=_actor())  # fmt: skip
        for refused in result.refused:
            print(refused.describe())
        if result.refused and args.all_or_nothing:
            print(f"refused {len(result.refused)} row(s); nothing was imported (--all-or-nothing)")
        else:
            batch = f" (batch {result.batch_id})" if result.batch_id else ""
            print(f"imported {result.imported} secret(s){batch}; refused {len(result.refused)} row(s)")
        return 2 if result.refused else 0

    return await _run(settings, body)


async def _resume(args: argparse.Namespace, settings: Settings) -> int:
    async def body(conn: asyncpg.Connection, redis: RedisClient) -> int:
        done = await importing.resume(conn, redis, brand_id=await _brand(conn, args.brand))
        for batch in done:
            print(f"secret batch {batch.batch_id} of brand {batch.brand_id}: {batch.secrets} secrets loaded "
                  f"({batch.added} were missing from Redis); active")  # fmt: skip
        if not done:
            print("no secret batch was waiting to be loaded")
        return 0

    return await _run(settings, body)


async def _rotate(args: argparse.Namespace, settings: Settings) -> int:
    ring = settings.secret_ring()

    async def body(conn: asyncpg.Connection, redis: RedisClient) -> int:
        done = await rotation.rotate(conn, redis, ring, brand_id=await _brand(conn, args.brand))
        print(f"re-encrypted {done.reencrypted} secret(s) under key {ring.active_id!r}; {done.redis_records} Redis "
              f"record(s) updated; {done.left} secret(s) still under another key")  # fmt: skip
        return 0 if done.left == 0 else 1

    return await _run(settings, body, redis_initialised=False)


def _whole(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"a whole number from {low} to {high}")
        return int(text)

    return parse


def add_inventory_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """`rgw sku ...`, `rgw inventory ...`, `rgw keys ...`; returns the `inventory` subcommands (for more)."""
    skus = sub.add_parser("sku", help="card-secret SKUs").add_subparsers(dest="action", required=True)
    create = skus.add_parser("create", help="create a SKU of a brand; prints it")
    create.add_argument("--brand", required=True, help="the brand, by id or slug")
    create.add_argument("--code", required=True, help="a-z, 0-9, . _ -, e.g. mgtv-month")
    create.add_argument("--name", required=True)
    create.add_argument("--reuse", type=_whole(1, model.MAX_REUSE), default=1, help="dispenses per secret (1)")
    create.add_argument("--shards", type=_whole(1, model.MAX_SHARDS), default=1, help="Redis shards (1)")
    create.add_argument("--max-per-order", type=_whole(1, model.MAX_PER_ORDER), default=100)
    create.add_argument("--low-stock", type=_whole(0, model.MAX_LOW_STOCK), default=0)
    create.set_defaults(run=_sku_create)
    listing = skus.add_parser("list", help="a brand's SKUs (or every brand's)")
    listing.add_argument("--brand", help="the brand, by id or slug")
    listing.set_defaults(run=_sku_list)

    inventory = sub.add_parser("inventory", help="card-secret stock").add_subparsers(dest="action", required=True)
    imp = inventory.add_parser("import", help="import secrets from a CSV file (exit 2 when rows are refused)")
    imp.add_argument("--brand", required=True, help="the brand, by id or slug")
    imp.add_argument("--file", type=Path, required=True, help="CSV: " + ",".join(importing.COLUMNS))
    imp.add_argument("--all-or-nothing", action="store_true", help="any refused row refuses the whole file")
    imp.set_defaults(run=_import)
    res = inventory.add_parser("resume", help="finish loading secret batches an interrupted import left 'loading'")
    res.add_argument("--brand", help="only this brand's (default: every brand's)")
    res.set_defaults(run=_resume)

    key_cmds = sub.add_parser("keys", help="card-secret encryption keys").add_subparsers(dest="action", required=True)
    rot = key_cmds.add_parser("rotate", help="re-encrypt secrets under RGW_SECRET_KEY_ID (online, rerunnable)")
    rot.add_argument("--brand", help="only this brand's secrets (default: every brand's)")
    rot.set_defaults(run=_rotate)
    return inventory
