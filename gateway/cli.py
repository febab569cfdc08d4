"""`rgw`: the gateway's command line - serve, migrate, campaigns and codes, and a small client for operators."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import uvloop

from gateway import issuance, logs
from gateway.admin_cli import add_registry_commands
from gateway.campaign_cli import add_campaign_commands
from gateway.client_cli import add_client_commands
from gateway.cluster_cli import add_cluster_commands
from gateway.codes_cli import add_codes_commands
from gateway.db.migrate import MigrationError, migrate
from gateway.durability import DurabilityError, is_initialised
from gateway.inventory.reconcile import reconcile_inventory
from gateway.inventory.status_cli import add_status_command
from gateway.inventory_cli import add_inventory_commands
from gateway.rebuild import rebuild_redis
from gateway.reconcile import reconcile
from gateway.redis_client import RedisClient, connect
from gateway.settings import Settings, SettingsError

Command = Callable[[argparse.Namespace, Settings], Awaitable[int]]


def _when(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.grpc_api.server import serve  # grpc is only imported by the commands that need it

    await serve(settings)
    return 0


async def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return 0


async def _with_stores(
    settings: Settings, action: Callable[..., Awaitable[int]], *, needs_initialised: bool = True
) -> int:
    conn = await asyncpg.connect(settings.database_url)
    redis = connect(*settings.redis_target, pool_size=4, timeout_s=max(settings.redis_timeout_seconds, 10))
    try:
        if needs_initialised and not await is_initialised(redis):
            raise NotInitialised("Redis is not initialised from Postgres; run `rgw rebuild-redis` first")
        return await action(conn, redis)
    finally:
        await redis.aclose()
        await conn.close()


class NotInitialised(RuntimeError):
    """Redis must be rebuilt from Postgres before state is added to it."""


async def _writer(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.ledger.runner import run_writer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_writer(settings, stop)
    return 0


async def _rebuild(args: argparse.Namespace, settings: Settings) -> int:
    async def rebuild(conn: asyncpg.Connection, redis: RedisClient) -> int:
        report = await rebuild_redis(conn, redis)
        print(f"restored {report.campaigns} campaigns, {report.codes} codes, {report.uses_restored} uses, "
              f"{report.reversals_restored} reversals; Redis is initialised")  # fmt: skip
        return 0

    return await _with_stores(settings, rebuild, needs_initialised=False)


async def _reconcile(args: argparse.Namespace, settings: Settings) -> int:
    async def run(conn: asyncpg.Connection, redis: RedisClient) -> int:
        if args.inventory:
            stock = await reconcile_inventory(conn, redis, args.brand, repair=args.repair, sku=args.sku)
            print(stock.summary())
            for line in stock.details():
                print(line)
            return 1 if stock.discrepancies else 0
        report = await reconcile(conn, redis, args.campaign, repair=args.repair)
        print(report.summary())
        for line in report.details():
            print(line)
        return 1 if report.discrepancies else 0

    return await _with_stores(settings, run, needs_initialised=False)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive whole number")
    return value


def _add_admin_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub.add_parser("serve", help="serve the gRPC API").set_defaults(run=_serve)
    sub.add_parser("migrate", help="apply pending database migrations").set_defaults(run=_migrate)
    add_campaign_commands(sub)  # rgw campaign ..., rgw store-group ... (gateway/campaign_cli.py)
    add_codes_commands(sub)  # rgw codes generate|import|resume|load (gateway/codes_cli.py)
    add_cluster_commands(sub)  # rgw cluster spread (gateway/cluster_cli.py)
    # rgw sku, rgw inventory import|resume|status, rgw keys rotate (inventory_cli.py, inventory/status_cli.py)
    add_status_command(add_inventory_commands(sub))
    sub.add_parser("writer", help="move outbox events into the Postgres ledger").set_defaults(run=_writer)
    sub.add_parser("rebuild-redis", help="restore Redis from Postgres and mark it initialised").set_defaults(
        run=_rebuild
    )
    rec = sub.add_parser("reconcile", help="compare Redis, the outbox and the ledger; exit 1 on any difference")
    target = rec.add_mutually_exclusive_group(required=True)
    target.add_argument("--campaign", type=_positive)
    target.add_argument("--inventory", action="store_true", help="the card-secret inventory instead of a campaign")
    rec.add_argument("--brand", type=_positive, help="with --inventory: one brand's SKUs (default: every brand's)")
    rec.add_argument("--sku", help="with --inventory: one SKU's code")
    rec.add_argument("--repair", action="store_true", help="re-enqueue what the ledger misses; mark in Redis what it "
                     "misses (fail closed)")  # fmt: skip
    rec.set_defaults(run=_reconcile)


def parser() -> argparse.ArgumentParser:
    """The `rgw` argument parser."""
    top = argparse.ArgumentParser(prog="rgw", description="Redemption gateway")
    sub = top.add_subparsers(dest="command", required=True)
    _add_admin_commands(sub)
    add_client_commands(sub)
    add_registry_commands(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `rgw` console script."""
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"rgw: {exc}", file=sys.stderr)
        return 2
    stop_logging = logs.configure(settings.log_level, settings.log_format, access=settings.access_log)
    try:
        return _run(args, settings)
    finally:
        stop_logging()


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.run is _serve and settings.workers > 1:
        from gateway.supervisor import supervise

        return supervise(settings)
    try:
        code: int = uvloop.run(args.run(args, settings))
        return code
    except (SettingsError, LookupError, FileExistsError, issuance.IssuanceIncomplete, NotInitialised,
            DurabilityError, MigrationError) as exc:  # fmt: skip
        print(f"rgw: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
