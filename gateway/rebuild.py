"""`rgw rebuild-redis`: restore Redis from Postgres (invariant 8) - campaigns, issued codes, and every use the
ledger records (so a code used before the loss stays used) - then set the "initialised" marker that lets the
gateway redeem again. Safe to run on a Redis that still holds data: nothing is reset, uses are only added.

What it cannot restore: redemptions acknowledged but still in the lost outbox (not yet in the ledger). With
`appendfsync always` that needs the Redis disk itself to be lost; see the durability table in the README.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from gateway import issuance
from gateway.durability import mark_initialised
from gateway.uses import UseRepairs, ledger_uses

log = logging.getLogger("rgw.rebuild")


@dataclass(frozen=True, slots=True)
class RebuildReport:
    """What was restored."""

    campaigns: int
    codes: int
    uses_restored: int


async def rebuild_redis(conn: asyncpg.Connection, redis: Redis) -> RebuildReport:
    """Restore everything Redis needs from Postgres and mark it initialised."""
    repairs = UseRepairs(redis)
    rows = await conn.fetch("SELECT id FROM campaigns ORDER BY id")
    codes = uses = 0
    for row in rows:
        campaign = await issuance.get_campaign(conn, row["id"])
        await issuance.load_campaign(redis, campaign)
        codes += await issuance.load_codes(conn, redis, campaign_id=campaign.id)
        uses += await repairs.mark_used((await ledger_uses(conn, campaign.id)).values())
    await mark_initialised(redis, "rgw rebuild-redis")
    log.info("rebuilt redis: %d campaigns, %d codes, %d uses restored", len(rows), codes, uses)
    return RebuildReport(len(rows), codes, uses)
