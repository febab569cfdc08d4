"""`rgw rebuild-redis`: restore Redis from Postgres (invariant 8) - campaigns with their rules and budget shares,
issued codes, every use the ledger records (so a code used before the loss stays used, and its use counts against
the budget) and every reversal (its use and budget given back) - then set the "initialised" marker that lets the
gateway redeem again. Safe on a Redis that still holds data and safe to run again after an interrupted run:
nothing is reset, shares are set only where a shard has none, and a use or reversal is recorded (and counted in
the budget) only where it is absent.

Budget shares: each shard gets what it granted (the ledger's redemptions minus reversals, on that shard) plus an
even split of what the campaign has left, so the shares add up to the budget and what is left to grant is exactly
what the ledger says. They are set before the campaign is published, whose initial even split (HSETNX) then finds
them in place.

What it cannot restore: redemptions acknowledged but still in the lost outbox (not yet in the ledger). With
`appendfsync always` that needs the Redis disk itself to be lost; see the durability table in the README.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

from gateway import issuance, keys
from gateway.campaigns.model import Campaign, get_campaign, split
from gateway.campaigns.publish import publish_from_postgres
from gateway.durability import mark_initialised
from gateway.inventory.rebuild import rebuild_inventory
from gateway.redis_client import RedisClient
from gateway.uses import History, Reversal, Use, UseRepairs, ledger_reversals, ledger_uses

log = logging.getLogger("rgw.rebuild")


@dataclass(frozen=True, slots=True)
class RebuildReport:
    """What was restored."""

    campaigns: int
    codes: int
    uses_restored: int
    reversals_restored: int = 0


@dataclass(frozen=True, slots=True)
class Shares:
    """Each shard's share of a campaign's count and value budgets (None: no such budget)."""

    count: list[int] | None
    value: list[int] | None


def budget_shares(campaign: Campaign, uses: Iterable[Use], reversals: Iterable[Reversal]) -> Shares:
    """Granted per shard (uses minus reversals, count and face value) plus an even split of the rest."""
    count, value = [0] * campaign.shards, [0] * campaign.shards
    for use in uses:
        count[use.shard] += 1
        value[use.shard] += use.face_value
    for reversal in reversals:
        count[reversal.shard] -= 1
        value[reversal.shard] -= reversal.face_value
    return Shares(_shares(campaign.budget_count, count), _shares(campaign.budget_value, value))


def _shares(budget: int | None, granted: list[int]) -> list[int] | None:
    if budget is None:
        return None
    # A ledger that granted more than the budget (it cannot, short of a double spend) leaves nothing to split.
    rest = split(max(budget - sum(granted), 0), len(granted))
    return [mine + more for mine, more in zip(granted, rest, strict=True)]


async def _set_shares(redis: RedisClient, campaign: Campaign, shares: Shares) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for shard in range(campaign.shards):
            budget = keys.budget_key(campaign.id, shard)
            if shares.count is not None:
                pipe.hsetnx(budget, "n", shares.count[shard])
            if shares.value is not None:
                pipe.hsetnx(budget, "v", shares.value[shard])
        await pipe.execute()


def _applicable(uses: dict[tuple[str, int], Use], reversals: Iterable[Reversal]) -> list[Reversal]:
    """The reversals of uses the ledger holds (a reversal of a redemption it lacks gives nothing back)."""
    found = []
    for reversal in reversals:
        use = uses.get(reversal.key)
        if use is None or use.redemption_id != reversal.redemption_id:
            log.error("reversal %s of code_ref %s use %d reverses no redemption in the ledger; not restored",
                      reversal.reversal_id, reversal.code_ref[:12], reversal.use_number)  # fmt: skip
            continue
        found.append(reversal)
    return found


async def rebuild_campaign(conn: asyncpg.Connection, redis: RedisClient, campaign: Campaign) -> tuple[int, int, int]:
    """Restore one campaign: budget shares, rules, codes, uses, reversals; returns (codes, uses, reversals)."""
    uses = await ledger_uses(conn, campaign.id)
    reversals = _applicable(uses, (await ledger_reversals(conn, campaign.id)).values())
    await _set_shares(redis, campaign, budget_shares(campaign, uses.values(), reversals))
    await publish_from_postgres(conn, redis, campaign)
    codes = await issuance.load_codes(conn, redis, campaign_id=campaign.id)
    repairs, history = UseRepairs(redis), History.replay(uses.values(), reversals)
    restored = await repairs.mark_used(uses.values(), history)
    applied = await repairs.mark_reversed(reversals, history)
    for reversal, why in applied.skipped:
        log.error("reversal %s of code_ref %s use %d not restored: %s",
                  reversal.reversal_id, reversal.code_ref[:12], reversal.use_number, why)  # fmt: skip
    return codes, restored, applied.applied


async def rebuild_redis(conn: asyncpg.Connection, redis: RedisClient) -> RebuildReport:
    """Restore everything Redis needs from Postgres and mark it initialised."""
    rows = await conn.fetch("SELECT id FROM campaigns ORDER BY id")
    codes = uses = reversals = 0
    for row in rows:
        restored = await rebuild_campaign(conn, redis, await get_campaign(conn, row["id"]))
        codes, uses, reversals = codes + restored[0], uses + restored[1], reversals + restored[2]
    await rebuild_inventory(conn, redis, now_ms=int(time.time() * 1000))
    await mark_initialised(redis, "rgw rebuild-redis")
    log.info("rebuilt redis: %d campaigns, %d codes, %d uses and %d reversals restored",
             len(rows), codes, uses, reversals)  # fmt: skip
    return RebuildReport(len(rows), codes, uses, reversals)
