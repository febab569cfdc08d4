"""A campaign and its rules, as Postgres records them (the system of record the Redis meta is published from)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import asyncpg

from gateway import codes, keys
from gateway.campaigns.schedule import HoursWindow, hours_to_json, parse_hours
from gateway.redis_client import RedisClient
from gateway.shard_spread import shards_for

ACTIVE = "active"
PAUSED = "paused"
DEFAULT_REVERSAL_WINDOW_S = 7 * 86_400


@dataclass(frozen=True, slots=True)
class Campaign:
    """A campaign's rules as Postgres records them."""

    id: int
    name: str
    valid_from: datetime
    valid_until: datetime
    uses_per_code: int
    shards: int
    key_id: str
    brand_id: int
    status: str = ACTIVE
    valid_days: int | None = None
    budget_count: int | None = None
    budget_value: int | None = None
    face_value: int = 0
    currency: str | None = None
    time_zone: str = "UTC"
    redemption_hours: tuple[HoursWindow, ...] = ()
    allowed_stores: tuple[str, ...] = ()
    allowed_store_groups: tuple[str, ...] = ()
    reversal_window_s: int = DEFAULT_REVERSAL_WINDOW_S
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def paused(self) -> bool:
        return self.status == PAUSED

    @property
    def restricts_stores(self) -> bool:
        return bool(self.allowed_stores or self.allowed_store_groups)


def from_row(row: asyncpg.Record) -> Campaign:
    """A Campaign from a `campaigns` row."""
    hours: Any = row["redemption_hours"]
    if isinstance(hours, str):
        hours = json.loads(hours)
    return Campaign(
        id=row["id"],
        name=row["name"],
        valid_from=row["valid_from"],
        valid_until=row["valid_until"],
        uses_per_code=row["uses_per_code"],
        shards=row["shards"],
        key_id=row["key_id"],
        brand_id=row["brand_id"],
        status=row["status"],
        valid_days=row["valid_days"],
        budget_count=row["budget_count"],
        budget_value=row["budget_value"],
        face_value=row["face_value"],
        currency=row["currency"],
        time_zone=row["time_zone"],
        redemption_hours=parse_hours(hours),
        allowed_stores=tuple(row["allowed_stores"]),
        allowed_store_groups=tuple(row["allowed_store_groups"]),
        reversal_window_s=row["reversal_window_seconds"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def hours_json(campaign: Campaign) -> str:
    """The redemption hours as the `campaigns.redemption_hours` jsonb column holds them."""
    return json.dumps(hours_to_json(campaign.redemption_hours))


async def get_campaign(conn: asyncpg.Connection, campaign_id: int) -> Campaign:
    """A campaign by id; LookupError when there is none."""
    row = await conn.fetchrow("SELECT * FROM campaigns WHERE id = $1", campaign_id)
    if row is None:
        raise LookupError(f"no campaign {campaign_id}")
    return from_row(row)


def split(total: int, shards: int) -> list[int]:
    """`total` in `shards` shares that differ by at most one and add up to it exactly."""
    share, rest = divmod(total, shards)
    return [share + (1 if shard < rest else 0) for shard in range(shards)]


async def spread_evenly(conn: asyncpg.Connection, redis: RedisClient, campaign: Campaign) -> Campaign:
    """The campaign just inserted, with the shard count that spreads its shards evenly over a Redis Cluster's
    masters (gateway/shard_spread.py; unchanged on one Redis). Call it in the inserting transaction."""
    shards = await shards_for(redis, campaign.shards, partial(keys.meta_key, campaign.id), limit=codes.MAX_SHARDS)
    if shards == campaign.shards:
        return campaign
    return from_row(
        await conn.fetchrow("UPDATE campaigns SET shards = $2 WHERE id = $1 RETURNING *", campaign.id, shards)
    )
