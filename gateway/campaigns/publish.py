"""Publishing a campaign's rules to Redis: every shard's meta hash (META in layout.py), its store list, and -
once, at creation - its share of the budget. Every gateway reads the meta inside the redeem script, so a change
published here (a pause, new hours, a later end) applies to the very next redemption, on every gateway."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

import asyncpg
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.typing import EncodableT, FieldT

from gateway import keys
from gateway.campaigns.model import Campaign, split
from gateway.campaigns.schedule import encode_hours, offset_table
from gateway.ledger.outbox import ensure_group
from gateway.redis_client import RedisClient


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def meta_fields(campaign: Campaign) -> dict[FieldT, EncodableT]:
    """The meta hash of each shard of `campaign` (every field of layout.META and META_PYTHON_ONLY)."""
    vf, vu = _ms(campaign.valid_from), _ms(campaign.valid_until)
    return {
        "vf": vf,
        "vu": vu,
        "brand": campaign.brand_id,
        "uses": campaign.uses_per_code,
        "vd": (campaign.valid_days or 0) * 86_400_000,
        "p": 1 if campaign.paused else 0,
        "fv": campaign.face_value,
        "st": 1 if campaign.restricts_stores else 0,
        "tz": offset_table(campaign.time_zone, vf, vu) if campaign.redemption_hours else "",
        "win": encode_hours(campaign.redemption_hours),
        "rw": campaign.reversal_window_s * 1000,
        "shards": campaign.shards,
        "cur": campaign.currency or "",
    }


async def publish(redis: RedisClient, campaign: Campaign, stores: Collection[str] = ()) -> None:
    """Write the campaign's rules to every shard (and `stores`, the flattened store list, when it restricts
    stores), register its outboxes with the writer, and give each shard its share of the budget if it has
    none yet (a republish never resets what a shard granted or received)."""
    for shard in range(campaign.shards):
        await ensure_group(redis, keys.outbox_key(campaign.id, shard))
    meta = meta_fields(campaign)
    counts = split(campaign.budget_count, campaign.shards) if campaign.budget_count else None
    values = split(campaign.budget_value, campaign.shards) if campaign.budget_value else None
    async with redis.pipeline(transaction=False) as pipe:
        pipe.sadd(keys.OUTBOXES, *(keys.outbox_key(campaign.id, shard) for shard in range(campaign.shards)))
        for shard in range(campaign.shards):
            budget = keys.budget_key(campaign.id, shard)
            if counts is not None:
                pipe.hsetnx(budget, "n", counts[shard])
            if values is not None:
                pipe.hsetnx(budget, "v", values[shard])
            queue_stores(pipe, campaign, shard, stores)
            pipe.hset(keys.meta_key(campaign.id, shard), mapping=meta)
        await pipe.execute()


def queue_stores(pipe: Pipeline | ClusterPipeline, campaign: Campaign, shard: int, stores: Collection[str]) -> None:
    """Queue the replacement of the shard's store list: built aside and renamed over it (one slot), so a
    redemption sees the old list or the new, never half of one."""
    target = keys.stores_key(campaign.id, shard)
    if not campaign.restricts_stores:
        pipe.delete(target)
        return
    staging = target + ":new"
    pipe.delete(staging)
    # An allowed list that names no existing store still restricts: "" (never a store id) keeps the set from
    # being empty, which Redis would delete.
    pipe.sadd(staging, "", *sorted(stores))
    pipe.rename(staging, target)


async def allowed_stores(conn: asyncpg.Connection, campaign: Campaign) -> list[str]:
    """The campaign's store list flattened: its own stores and the stores of its groups (of its brand)."""
    if not campaign.allowed_store_groups:
        return sorted(set(campaign.allowed_stores))
    rows = await conn.fetch(
        "SELECT stores FROM store_groups WHERE brand_id = $1 AND name = ANY($2::text[])",
        campaign.brand_id,
        list(campaign.allowed_store_groups),
    )
    return sorted({*campaign.allowed_stores, *(store for row in rows for store in row["stores"])})


async def publish_from_postgres(conn: asyncpg.Connection, redis: RedisClient, campaign: Campaign) -> None:
    """Publish `campaign` with its store groups resolved from Postgres."""
    await publish(redis, campaign, await allowed_stores(conn, campaign))
