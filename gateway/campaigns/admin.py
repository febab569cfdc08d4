"""Campaign administration, for one brand at a time: create, update, pause and resume, list, rebalance, and the
brand's store groups. AdminService (gateway/grpc_api/admin_campaigns.py) and `rgw campaign` call these.

Every change is checked whole first (gateway/campaigns/rules.py: InvalidRequest with every bad field; nothing
changes), made in ONE Postgres transaction that bumps `registry_version` and appends an `audit_log` row
(gateway/tenancy/admin_tx.py: entity "campaign" or "store_group"), and then published to every shard in Redis
(gateway/campaigns/publish.py), where the redeem script reads it with the next redemption, on every gateway.
Postgres is the system of record: a new campaign is published inside its transaction (a failed publish leaves no
campaign), a change after its commit (a failed publish is repeated by repeating the change; every change is
idempotent). Budgets move as gateway/campaigns/budget.py says, so the shards never hold more than the budget.

A campaign of another brand than `brand_id` is NotFoundError, exactly like a missing one (`brand_id=None`: the
platform, every brand). The changes of one campaign are serialised by `campaign_lock`: a change, a republish and
a rebalance each read the campaign under it, so none publishes rules older than the last committed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime

import asyncpg
from redis import exceptions as redis_errors

from gateway import codes
from gateway.campaigns import budget, rules
from gateway.campaigns.model import ACTIVE, PAUSED, Campaign, from_row, hours_json, spread_evenly
from gateway.campaigns.publish import publish_from_postgres
from gateway.campaigns.schedule import hours_to_json
from gateway.domain import StoreUnavailable
from gateway.redis_client import RedisClient
from gateway.tenancy.admin_rules import check, raise_if
from gateway.tenancy.admin_tx import Committed, audit_row, change, json_default
from gateway.tenancy.model import NotFoundError
from gateway.validation import FieldViolation, InvalidRequest

log = logging.getLogger("rgw.campaigns")

STATUSES = (ACTIVE, PAUSED)
MAX_GROUP_STORES = 10_000
_LOCK_CLASS = 0x72677763  # "rgwc": the advisory locks of campaign changes
_NO_CAMPAIGN = "no such campaign"
_REDIS_DOWN = (redis_errors.RedisError, OSError, TimeoutError)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_COLUMNS = (
    "name", "valid_from", "valid_until", "uses_per_code", "valid_days", "budget_count", "budget_value", "face_value",
    "currency", "time_zone", "redemption_hours", "allowed_stores", "allowed_store_groups", "reversal_window_seconds",
)  # fmt: skip
_INSERT = f"""
INSERT INTO campaigns ({", ".join(_COLUMNS)}, shards, key_id, brand_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, $13, $14, $15, $16, $17) RETURNING *"""  # noqa: S608
_UPDATE = f"""
UPDATE campaigns SET ({", ".join(_COLUMNS)}, updated_at) =
    ($2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb, $13, $14, $15, now())
WHERE id = $1 RETURNING *"""  # noqa: S608 - constants only


def _values(c: Campaign) -> tuple[object, ...]:
    """The rule columns of `c`, in _COLUMNS order."""
    return (
        c.name, c.valid_from, c.valid_until, c.uses_per_code, c.valid_days, c.budget_count, c.budget_value,
        c.face_value, c.currency, c.time_zone, hours_json(c), list(c.allowed_stores), list(c.allowed_store_groups),
        c.reversal_window_s,
    )  # fmt: skip


def state(c: Campaign) -> str:
    """A campaign as audit JSON."""
    data = asdict(c)
    data["redemption_hours"] = hours_to_json(c.redemption_hours)
    return json.dumps(data, default=json_default)


@contextmanager
def _redis_faults() -> Iterator[None]:
    """Redis' failures as the domain's StoreUnavailable (UNAVAILABLE: repeat the call)."""
    try:
        yield
    except _REDIS_DOWN as exc:
        log.warning("campaign change: RedisClient failed (%s)", type(exc).__name__)
        raise StoreUnavailable(f"Redis is unavailable ({type(exc).__name__}); repeat the change") from None


@asynccontextmanager
async def campaign_lock(conn: asyncpg.Connection, campaign_id: int) -> AsyncIterator[None]:
    """Hold the campaign's change lock (a Postgres session advisory lock: released if the process dies)."""
    key = campaign_id & 0x7FFFFFFF
    await conn.execute("SELECT pg_advisory_lock($1::int, $2::int)", _LOCK_CLASS, key)
    try:
        yield
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1::int, $2::int)", _LOCK_CLASS, key)


async def get_campaign(conn: asyncpg.Connection, campaign_id: int, brand_id: int | None) -> Campaign:
    """The campaign, if it is `brand_id`'s (None: any brand's); NotFoundError otherwise."""
    row = await conn.fetchrow(
        "SELECT * FROM campaigns WHERE id = $1 AND ($2::bigint IS NULL OR brand_id = $2)", campaign_id, brand_id
    )
    if row is None:
        raise NotFoundError(_NO_CAMPAIGN)
    return from_row(row)


async def _missing_groups(conn: asyncpg.Connection, c: Campaign) -> list[FieldViolation]:
    if not c.allowed_store_groups:
        return []
    rows = await conn.fetch(
        "SELECT name FROM store_groups WHERE brand_id = $1 AND name = ANY($2::text[])",
        c.brand_id, list(c.allowed_store_groups),
    )  # fmt: skip
    found = {row["name"] for row in rows}
    return [
        FieldViolation(f"allowed_store_groups[{i}]", f"names no store group of the brand: {name!r}")
        for i, name in enumerate(c.allowed_store_groups) if name not in found
    ]  # fmt: skip


async def _checked(
    conn: asyncpg.Connection, base: Campaign, changes: Mapping[str, object], *, creating: bool
) -> Campaign:
    candidate, problems = rules.apply(base, changes, creating=creating)
    if not any(v.field.startswith("allowed_store_groups") for v in problems):
        problems += await _missing_groups(conn, candidate)
    raise_if(problems)
    return candidate


# -- Create, update, pause ------------------------------------------------------------------------------------


async def create_campaign(
    conn: asyncpg.Connection,
    redis: RedisClient,
    *,
    actor: str,
    brand_id: int,
    key_id: str,
    fields: Mapping[str, object],
) -> Committed[Campaign]:
    """A new, active campaign of the brand with the rules in `fields` (API names; name, valid_from and
    valid_until required), its codes' refs keyed by `key_id`; published to Redis before it is committed."""
    if await conn.fetchval("SELECT 1 FROM brands WHERE id = $1", brand_id) is None:
        raise NotFoundError("no such brand")
    blank = Campaign(0, "", _EPOCH, _EPOCH, 1, 1, key_id, brand_id)
    draft = await _checked(conn, blank, fields, creating=True)
    async with change(conn) as version:
        row = await conn.fetchrow(_INSERT, *_values(draft), draft.shards, key_id, brand_id)
        made = from_row(row)
        if made.id > codes.MAX_CAMPAIGN_ID:
            raise RuntimeError("campaign ids are exhausted for this code layout")
        with _redis_faults():
            made = await spread_evenly(conn, redis, made)
        await audit_row(conn, version, actor=actor, brand_id=brand_id, action="campaign.create",
                        entity_id=str(made.id), before=None, after=state(made))  # fmt: skip
        with _redis_faults():
            await publish_from_postgres(conn, redis, made)
    return Committed(made, version)


async def _write(conn: asyncpg.Connection, actor: str, before: Campaign, after: Campaign) -> Committed[Campaign]:
    async with change(conn) as version:
        changed = from_row(await conn.fetchrow(_UPDATE, before.id, *_values(after)))
        await audit_row(conn, version, actor=actor, brand_id=before.brand_id, action="campaign.update",
                        entity_id=str(before.id), before=state(before), after=state(changed))  # fmt: skip
    return Committed(changed, version)


async def update_campaign(
    conn: asyncpg.Connection,
    redis: RedisClient,
    *,
    actor: str,
    brand_id: int | None,
    campaign_id: int,
    changes: Mapping[str, object],
) -> Committed[Campaign]:
    """Change the rules named in `changes` (API names; rules.CHANGEABLE, and a currency not yet set) of a live
    campaign. Its shards and a currency once set are fixed; a budget below what was granted is refused."""
    if not changes:
        raise InvalidRequest([FieldViolation("update_mask", "names no field to change")])
    async with campaign_lock(conn, campaign_id):
        before = await get_campaign(conn, campaign_id, brand_id)
        after = await _checked(conn, before, changes, creating=False)

        async def commit() -> Committed[Campaign]:
            return await _write(conn, actor, before, after)

        with _redis_faults():
            committed = await budget.change_budgets(redis, before, after, commit)
            await publish_from_postgres(conn, redis, committed.value)
    return committed


async def set_status(
    conn: asyncpg.Connection, redis: RedisClient, *, actor: str, brand_id: int | None, campaign_id: int, status: str
) -> Committed[Campaign]:
    """Pause or resume a campaign: every gateway answers the next redemption accordingly (the flag is in the
    shards' meta). Setting the status it has is allowed (it publishes again)."""
    raise_if(check(status in STATUSES, "status", "must be active or paused"))
    async with campaign_lock(conn, campaign_id):
        before = await get_campaign(conn, campaign_id, brand_id)
        async with change(conn) as version:
            row = await conn.fetchrow(
                "UPDATE campaigns SET status = $2, updated_at = now() WHERE id = $1 RETURNING *", campaign_id, status
            )
            after = from_row(row)
            action = "campaign.pause" if status == PAUSED else "campaign.resume"
            await audit_row(conn, version, actor=actor, brand_id=after.brand_id, action=action,
                            entity_id=str(after.id), before=state(before), after=state(after))  # fmt: skip
        with _redis_faults():
            await publish_from_postgres(conn, redis, after)
    return Committed(after, version)


async def list_campaigns(
    conn: asyncpg.Connection, *, brand_id: int | None, after_id: int = 0, limit: int = 1000
) -> list[Campaign]:
    """The brand's campaigns (None: every brand's) with ids above `after_id`, by id, at most `limit`."""
    rows = await conn.fetch(
        "SELECT * FROM campaigns WHERE ($1::bigint IS NULL OR brand_id = $1) AND id > $2 ORDER BY id LIMIT $3",
        brand_id, after_id, limit,
    )  # fmt: skip
    return [from_row(row) for row in rows]


async def rebalance(
    conn: asyncpg.Connection, redis: RedisClient, *, brand_id: int | None, campaign_id: int
) -> budget.RebalanceReport:
    """Even out the unused budget shares of the campaign's shards (budget.rebalance), under its change lock."""
    async with campaign_lock(conn, campaign_id):
        campaign = await get_campaign(conn, campaign_id, brand_id)
        with _redis_faults():
            return await budget.rebalance(redis, campaign)


async def republish(conn: asyncpg.Connection, redis: RedisClient, campaign_id: int) -> Campaign:
    """Publish the campaign's committed rules again (read under its change lock)."""
    async with campaign_lock(conn, campaign_id):
        campaign = await get_campaign(conn, campaign_id, None)
        with _redis_faults():
            await publish_from_postgres(conn, redis, campaign)
    return campaign


# -- Store groups ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreGroup:
    """A brand's named set of stores (external ids), and the campaigns allowing it."""

    brand_id: int
    name: str
    stores: tuple[str, ...]
    campaign_ids: tuple[int, ...] = ()


def _group_state(group: StoreGroup) -> str:
    return json.dumps({"brand_id": group.brand_id, "name": group.name, "stores": list(group.stores)})


def _group_violations(name: str, stores: Sequence[str]) -> list[FieldViolation]:
    return [
        *check(isinstance(name, str) and rules.is_id(name), "name", rules.ID_RULE),
        *rules.ids_violations(stores, "stores", MAX_GROUP_STORES),
    ]


async def set_store_group(
    conn: asyncpg.Connection, redis: RedisClient, *, actor: str, brand_id: int, name: str, stores: Sequence[str]
) -> Committed[StoreGroup]:
    """Create or replace the brand's store group `name`; every campaign allowing it is republished with it."""
    raise_if(_group_violations(name, stores))
    if await conn.fetchval("SELECT 1 FROM brands WHERE id = $1", brand_id) is None:
        raise NotFoundError("no such brand")
    wanted = tuple(sorted(set(stores)))
    async with change(conn) as version:
        row = await conn.fetchrow(
            "SELECT id, stores FROM store_groups WHERE brand_id = $1 AND name = $2 FOR UPDATE", brand_id, name
        )
        before = None if row is None else _group_state(StoreGroup(brand_id, name, tuple(row["stores"])))
        group_id = await conn.fetchval(
            """INSERT INTO store_groups (brand_id, name, stores) VALUES ($1, $2, $3)
               ON CONFLICT (brand_id, name) DO UPDATE SET stores = EXCLUDED.stores, updated_at = now()
               RETURNING id""",
            brand_id, name, list(wanted),
        )  # fmt: skip
        after = StoreGroup(brand_id, name, wanted)
        await audit_row(conn, version, actor=actor, brand_id=brand_id, action="store_group.set",
                        entity_id=str(group_id), before=before, after=_group_state(after))  # fmt: skip
    allowing = await conn.fetch(
        "SELECT id FROM campaigns WHERE brand_id = $1 AND $2 = ANY(allowed_store_groups) ORDER BY id", brand_id, name
    )
    ids = tuple(row["id"] for row in allowing)
    for campaign_id in ids:
        await republish(conn, redis, campaign_id)
    return Committed(replace(after, campaign_ids=ids), version)
