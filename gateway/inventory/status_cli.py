"""`rgw inventory status [--brand B] [--sku C] [--within 7d] [--json]`: stock by SKU and supplier (the figures are
defined in gateway/inventory/status.py); a low SKU is flagged LOW (in --json: "low": true)."""

from __future__ import annotations

import argparse
import json
import re

import asyncpg

from gateway.clock import SystemClock
from gateway.inventory import status
from gateway.redis_client import connect
from gateway.settings import Settings

_DURATION = re.compile(r"(\d+)([dhms]?)")
_UNIT_MS = {"d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1000, "": 86_400_000}
_COLUMNS = ("available", "held", "dispensed", "expired", "expiring")


def duration_ms(text: str) -> int:
    """A duration such as "7d", "12h", "30m", "90s" (a bare number: days), as milliseconds (more than 0)."""
    found = _DURATION.fullmatch(text.strip())
    if found is None or int(found[1]) == 0:
        raise argparse.ArgumentTypeError("must be a positive duration such as 7d, 12h, 30m or 90s")
    return int(found[1]) * _UNIT_MS[found[2]]


def add_status_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `status` to the subcommands of `rgw inventory`."""
    cmd = sub.add_parser("status", help="stock by SKU and supplier")
    cmd.add_argument("--brand", type=int, help="one brand's SKUs (default: every brand's)")
    cmd.add_argument("--sku", help="one SKU's code")
    cmd.add_argument("--within", type=duration_ms, default=status.DEFAULT_WITHIN_MS,
                     help="'expiring' means within this (default 7d)")  # fmt: skip
    cmd.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    cmd.set_defaults(run=run_status)


async def run_status(args: argparse.Namespace, settings: Settings) -> int:
    """The command's body."""
    conn = await asyncpg.connect(settings.database_url)
    redis = connect(*settings.redis_target, pool_size=2, timeout_s=max(settings.redis_timeout_seconds, 10))
    try:
        skus = await status.find_skus(conn, args.brand, args.sku)
        stocks = await status.inventory_status(conn, redis, skus, now_ms=SystemClock().now_ms(), within_ms=args.within)
    finally:
        await redis.aclose()
        await conn.close()
    print(json.dumps([s.as_dict() for s in stocks], indent=2) if args.json else "\n".join(table(stocks)))
    return 0


def table(stocks: list[status.SkuStock]) -> list[str]:
    """The figures as aligned text lines: one per supplier and one total per SKU."""
    lines = [f"{'brand':>6} {'sku':<24} {'supplier':<20} " + " ".join(f"{c:>10}" for c in _COLUMNS) + "  low"]
    for stock in stocks:
        for row in [*stock.suppliers, status.SupplierStock("(total)").plus(stock.total)]:
            figures = " ".join(f"{getattr(row, c):>10}" for c in _COLUMNS)
            flag = ("LOW" if stock.low else "") if row.supplier == "(total)" else ""
            lines.append(f"{stock.sku.brand_id:>6} {stock.sku.code:<24} {row.supplier:<20} {figures}  {flag}")
    return lines
