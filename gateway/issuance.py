"""Campaigns and code issuance: Postgres first (the system of record), then Redis (live state).

The plaintext of a code exists only in the output file the operator asked for; Postgres and Redis hold its
code_ref. Codes are loaded into Redis in pipelined batches, from Postgres, by the same function that restores a
Redis that lost its data - so issuing and rebuilding cannot drift apart.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis

from gateway import codes, keys
from gateway.coderefs import KeyRing
from gateway.ledger.outbox import ensure_group
from gateway.tenancy.model import DEFAULT_BRAND_ID

COPY_BATCH = 10_000
REDIS_BATCH = 1_000


class IssuanceIncomplete(RuntimeError):
    """Codes were recorded in Postgres (and written out) but are not redeemable until loaded into Redis."""


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


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


async def create_campaign(
    conn: asyncpg.Connection,
    redis: Redis,
    keyring: KeyRing,
    *,
    name: str,
    valid_from: datetime,
    valid_until: datetime,
    uses_per_code: int = 1,
    shards: int = 1,
    brand_id: int = DEFAULT_BRAND_ID,
) -> Campaign:
    """Record a campaign of `brand_id` and publish its rules to every shard in Redis."""
    if shards > codes.MAX_SHARDS:
        raise ValueError(f"at most {codes.MAX_SHARDS} shards")
    row = await conn.fetchrow(
        """INSERT INTO campaigns (name, valid_from, valid_until, uses_per_code, shards, key_id, brand_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *""",
        name, valid_from, valid_until, uses_per_code, shards, keyring.active_id, brand_id,
    )  # fmt: skip
    campaign = _campaign(row)
    if campaign.id > codes.MAX_CAMPAIGN_ID:
        raise ValueError("campaign ids are exhausted for this code layout")
    await load_campaign(redis, campaign)
    return campaign


def _campaign(row: asyncpg.Record) -> Campaign:
    return Campaign(
        id=row["id"],
        name=row["name"],
        valid_from=row["valid_from"],
        valid_until=row["valid_until"],
        uses_per_code=row["uses_per_code"],
        shards=row["shards"],
        key_id=row["key_id"],
        brand_id=row["brand_id"],
    )


async def get_campaign(conn: asyncpg.Connection, campaign_id: int) -> Campaign:
    """A campaign by id; LookupError when there is none."""
    row = await conn.fetchrow("SELECT * FROM campaigns WHERE id = $1", campaign_id)
    if row is None:
        raise LookupError(f"no campaign {campaign_id}")
    return _campaign(row)


async def load_campaign(redis: Redis, campaign: Campaign) -> None:
    """Write the campaign's rules into each shard's meta hash and register its outboxes with the writer."""
    for shard in range(campaign.shards):
        await ensure_group(redis, keys.outbox_key(campaign.id, shard))
    async with redis.pipeline(transaction=False) as pipe:
        pipe.sadd(keys.OUTBOXES, *(keys.outbox_key(campaign.id, shard) for shard in range(campaign.shards)))
        for shard in range(campaign.shards):
            pipe.hset(
                keys.meta_key(campaign.id, shard),
                mapping={
                    "vf": _ms(campaign.valid_from),
                    "vu": _ms(campaign.valid_until),
                    "shards": campaign.shards,
                    "uses": campaign.uses_per_code,
                    # the script answers another brand's caller as if the campaign did not exist
                    "brand": campaign.brand_id,
                },
            )
        await pipe.execute()


def _batches(
    campaign: Campaign, keyring: KeyRing, count: int, batch_id: uuid.UUID, bound_device: str | None
) -> Iterator[tuple[list[str], list[tuple[Any, ...]]]]:
    """Codes in batches: their plaintext and their issued_codes rows (shards chosen at random)."""
    for start in range(0, count, COPY_BATCH):
        plain: list[str] = []
        rows: list[tuple[Any, ...]] = []
        for _ in range(min(COPY_BATCH, count - start)):
            shard = int.from_bytes(os.urandom(4), "big") % campaign.shards
            code = codes.generate(codes.Route(campaign.id, shard))
            ref = keyring.ref(campaign.key_id, campaign.id, code)
            plain.append(code)
            rows.append((
                bytes.fromhex(ref.ref), campaign.key_id, campaign.id, shard, campaign.uses_per_code,
                campaign.valid_from, campaign.valid_until, batch_id, bound_device,
            ))  # fmt: skip
        yield plain, rows


_CODE_COLUMNS = [
    "code_ref",
    "key_id",
    "campaign_id",
    "shard",
    "uses",
    "valid_from",
    "valid_until",
    "batch_id",
    "bound_device",
]


async def issue_codes(
    conn: asyncpg.Connection,
    redis: Redis,
    keyring: KeyRing,
    campaign: Campaign,
    *,
    count: int,
    out: Path,
    bound_device: str | None = None,
) -> int:
    """Issue `count` new codes: plaintext to `out` (one per line, mode 0600), code_refs to Postgres and Redis.
    With `bound_device`, each code is bound to that customer device (the device_binding rule enforces it)."""
    if os.path.lexists(out):  # noqa: ASYNC240 - a CLI command: nothing else runs on this loop
        raise FileExistsError(f"{out} exists; refusing to overwrite a file of codes")
    batch_id = uuid.uuid4()
    partial = out.with_name(out.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            async with conn.transaction():
                for plain, rows in _batches(campaign, keyring, count, batch_id, bound_device):
                    await conn.copy_records_to_table("issued_codes", records=rows, columns=_CODE_COLUMNS)
                    handle.write("\n".join(plain) + "\n")
        # Committed: the codes exist, so their plaintext must survive even if loading Redis fails below.
        partial.rename(out)
    finally:
        partial.unlink(missing_ok=True)
    try:
        await load_codes(conn, redis, campaign_id=campaign.id, batch_id=batch_id)
    except Exception as exc:
        raise IssuanceIncomplete(
            f"{count} codes were issued and written to {out}, but loading them into Redis failed ({exc}); "
            f"run `rgw codes load --campaign {campaign.id}` to finish"
        ) from exc
    return count


async def load_codes(
    conn: asyncpg.Connection, redis: Redis, *, campaign_id: int, batch_id: uuid.UUID | None = None
) -> int:
    """Load issued codes from Postgres into Redis in pipelined batches. Never resets a code's counters, so it
    is safe on a Redis that already holds some of them."""
    query = (
        "SELECT code_ref, key_id, shard, uses, valid_from, valid_until, bound_device, issued_at FROM issued_codes"
        " WHERE campaign_id = $1"
    )
    args: list[object] = [campaign_id]
    if batch_id is not None:
        query += " AND batch_id = $2"
        args.append(batch_id)
    loaded = 0
    async with conn.transaction():
        cursor = await conn.cursor(query, *args)
        while rows := await cursor.fetch(REDIS_BATCH):
            await _load_batch(redis, campaign_id, rows)
            loaded += len(rows)
    return loaded


async def _load_batch(redis: Redis, campaign_id: int, rows: list[asyncpg.Record]) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for row in rows:
            ref = row["code_ref"].hex()
            pipe.hsetnx(
                keys.bucket_key(campaign_id, row["shard"], ref),
                keys.bucket_field(ref),
                int(row["issued_at"].timestamp()),
            )
            key = keys.code_key(campaign_id, row["shard"], ref)
            overrides = {
                name: value
                for name, value in (
                    ("uses", row["uses"]),
                    ("vf", row["valid_from"] and _ms(row["valid_from"])),
                    ("vu", row["valid_until"] and _ms(row["valid_until"])),
                )
                if value is not None
            }
            if overrides:
                pipe.hset(key, mapping=overrides)
            if row["bound_device"] is not None:  # never replaces a binding the code already has
                pipe.hsetnx(key, "dev", row["bound_device"])
        await pipe.execute()
