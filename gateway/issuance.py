"""Campaigns and code issuance, as the rest of the tree calls them: Postgres first (the system of record), then
Redis (live state). The work is in gateway/campaigns/: codegen.py (codes in bulk), issuance.py (batches:
generation, resume), importing.py (brand-supplied codes), loader.py (the compact Redis layout) and directory.py
(imported codes' routes).

The plaintext of a code exists only in the output the operator asked for (a 0600 file here, or the RPC's
stream); Postgres and Redis hold its code_ref. Codes are loaded into Redis by the same loader that restores a
Redis that lost its data, so issuing and rebuilding cannot drift apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from gateway import codes
from gateway.campaigns import loader, model, publish
from gateway.campaigns.issuance import (
    BatchCommitted,
    BatchDone,
    BatchesLoading,
    IssuanceError,
    IssuanceIncomplete,
    generate_stream,
)
from gateway.campaigns.model import Campaign
from gateway.campaigns.schedule import hours_to_json
from gateway.coderefs import KeyRing
from gateway.redis_client import RedisClient
from gateway.tenancy.model import DEFAULT_BRAND_ID

__all__ = [
    "BatchesLoading",
    "Campaign",
    "IssuanceError",
    "IssuanceIncomplete",
    "create_campaign",
    "get_campaign",
    "issue_codes",
    "issue_to_file",
    "load_campaign",
    "load_codes",
]

# Campaign fields create_campaign takes as keyword arguments, by column (the rest are columns by the same name).
_RULE_COLUMNS = {"reversal_window_s": "reversal_window_seconds"}
_RULES = ("status", "valid_days", "budget_count", "budget_value", "face_value", "currency", "time_zone",
          "redemption_hours", "allowed_stores", "allowed_store_groups", "reversal_window_s")  # fmt: skip


def _rule_value(name: str, value: Any) -> object:
    if name == "redemption_hours":
        return json.dumps(hours_to_json(value))
    if name in ("allowed_stores", "allowed_store_groups"):
        return list(value)
    return value


async def create_campaign(
    conn: asyncpg.Connection,
    redis: RedisClient,
    keyring: KeyRing,
    *,
    name: str,
    valid_from: datetime,
    valid_until: datetime,
    uses_per_code: int = 1,
    shards: int = 1,
    brand_id: int = DEFAULT_BRAND_ID,
    **rules: object,
) -> Campaign:
    """Record a campaign of `brand_id` and publish its rules to every shard in Redis. `rules` are further Campaign
    fields (budget_count=..., face_value=..., currency=..., redemption_hours=(HoursWindow, ...), ...), unchecked:
    the administration API (gateway/campaigns/admin.py) is the checked way."""
    if shards > codes.MAX_SHARDS:
        raise ValueError(f"at most {codes.MAX_SHARDS} shards")
    unknown = sorted(set(rules) - set(_RULES))
    if unknown:
        raise TypeError(f"not campaign rules: {', '.join(unknown)}")
    columns = ["name", "valid_from", "valid_until", "uses_per_code", "shards", "key_id", "brand_id"]
    values: list[object] = [name, valid_from, valid_until, uses_per_code, shards, keyring.active_id, brand_id]
    for rule, value in rules.items():
        columns.append(_RULE_COLUMNS.get(rule, rule))
        values.append(_rule_value(rule, value))
    placeholders = ", ".join(f"${n}" for n in range(1, len(values) + 1))
    query = f"INSERT INTO campaigns ({', '.join(columns)}) VALUES ({placeholders}) RETURNING *"  # noqa: S608 - names are constants
    async with conn.transaction():
        campaign = model.from_row(await conn.fetchrow(query, *values))
        if campaign.id > codes.MAX_CAMPAIGN_ID:
            raise ValueError("campaign ids are exhausted for this code layout")
        campaign = await model.spread_evenly(conn, redis, campaign)
    await publish.publish_from_postgres(conn, redis, campaign)
    return campaign


async def get_campaign(conn: asyncpg.Connection, campaign_id: int) -> Campaign:
    """A campaign by id; LookupError when there is none."""
    return await model.get_campaign(conn, campaign_id)


async def load_campaign(redis: RedisClient, campaign: Campaign) -> None:
    """Publish the campaign's rules to every shard (gateway/campaigns/publish.py; a restricted store list needs
    publish_from_postgres)."""
    await publish.publish(redis, campaign)


async def load_codes(
    conn: asyncpg.Connection, redis: RedisClient, *, campaign_id: int, batch_id: uuid.UUID | None = None
) -> int:
    """Load the issued codes of a campaign (or one batch) from Postgres into Redis, with their overrides and the
    directory entries of imported ones; returns the codes loaded. Never resets a code's state, and counts each
    code once in `iss`, so it is safe on a Redis that holds some or all of them already."""
    loaded = await loader.load_from_postgres(conn, redis, campaign_id=campaign_id, batch_id=batch_id)
    return loaded.codes


def _open_exclusive(path: Path) -> int:
    """A new file of mode 0600 (never an existing one: a file of codes is never overwritten)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise FileExistsError(
            f"{path} exists; refusing to overwrite a file of codes (an interrupted run left it: its codes were issued "
            "only if that run's batch committed - see `rgw codes resume` - otherwise it can be deleted)"
        ) from None


async def issue_to_file(
    conn: asyncpg.Connection,
    redis: RedisClient,
    keyring: KeyRing,
    campaign: Campaign,
    *,
    count: int,
    out: Path,
    face_value: int | None = None,
    bound_device: str | None = None,
    actor: str = "",
    on_generated: Callable[[int], None] | None = None,
    on_loaded: Callable[[int], None] | None = None,
) -> BatchDone:
    """Issue a batch of `count` codes with their plaintext in `out` (one a line, mode 0600): written to
    `<out>.partial`, synced, and renamed to `out` right after the batch commits - so an interrupted run leaves
    either no codes at all (the partial file removed, when the process lives to do it) or committed codes in
    `out`. FileExistsError when `out` (or a partial file of an earlier run) exists."""
    if os.path.lexists(out):  # noqa: ASYNC240 - a CLI command: nothing else runs on this loop
        raise FileExistsError(f"{out} exists; refusing to overwrite a file of codes")
    partial = out.with_name(out.name + ".partial")
    handle = os.fdopen(_open_exclusive(partial), "wb")
    committed = False
    try:
        written = 0
        stream = generate_stream(conn, redis, keyring, campaign, count, face_value=face_value,
                                 bound_device=bound_device, actor=actor, progress=on_loaded)  # fmt: skip
        async with contextlib.aclosing(stream):
            async for item in stream:
                if isinstance(item, list):
                    handle.write(("\n".join(item) + "\n").encode("ascii"))
                    written += len(item)
                    if written == count:  # the last chunk: durable before the commit that follows
                        handle.flush()
                        os.fsync(handle.fileno())
                    if on_generated is not None:
                        on_generated(len(item))
                elif isinstance(item, BatchCommitted):
                    handle.close()
                    partial.rename(out)
                    committed = True
                else:
                    return item
        raise IssuanceError("the batch ended without being loaded")  # generate_stream always ends with BatchDone
    finally:
        handle.close()
        if not committed:
            partial.unlink(missing_ok=True)


async def issue_codes(
    conn: asyncpg.Connection,
    redis: RedisClient,
    keyring: KeyRing,
    campaign: Campaign,
    *,
    count: int,
    out: Path,
    bound_device: str | None = None,
    face_value: int | None = None,
) -> int:
    """Issue `count` new codes: plaintext to `out` (one per line, mode 0600), code_refs to Postgres and Redis.
    With `bound_device`, each code is bound to that customer device (the device_binding rule enforces it)."""
    done = await issue_to_file(conn, redis, keyring, campaign, count=count, out=out, bound_device=bound_device,
                               face_value=face_value)  # fmt: skip
    return done.codes
