"""Campaign state for the ledger, reconcile and rebuild tests, made without the gateway: issued codes in Postgres and
in their Redis buckets, uses and reversals recorded in Redis as the redeem and reverse scripts record them (use and
reversal records, budget counters) with their events appended to the outbox, and writers that drain it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import asyncpg
from redis.asyncio import Redis

from gateway import issuance, keys
from gateway.campaigns.model import Campaign, get_campaign
from gateway.campaigns.publish import publish_from_postgres
from gateway.coderefs import KeyRing
from gateway.ids import uuid7
from gateway.ledger.outbox import Outbox
from gateway.ledger.writer import LedgerWriter, WriterConfig
from gateway.uses import Reversal, Use, UseRepairs
from tests.conftest import T0_MS

DAY_MS = 86_400_000
FAST = WriterConfig(batch_size=100, batch_wait_s=0.01, poll_s=0.005, claim_idle_ms=200, backoff_base_s=0.01)
_CODE_COLUMNS = ["code_ref", "key_id", "campaign_id", "shard", "uses", "valid_from", "valid_until", "batch_id"]


def at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


@dataclass
class Codes:
    """A campaign and its issued codes' (shard, code_ref hex), in Postgres and Redis."""

    campaign: Campaign
    refs: list[tuple[int, str]]
    next_use: dict[str, int] = field(default_factory=dict)
    clock_ms: Iterator[int] = field(default_factory=lambda: iter(range(T0_MS, T0_MS + DAY_MS)))

    def use(self, i: int, *, face_value: int | None = None, device: str = "") -> Use:
        """The next use of code i, as the redeem script would record it (not yet recorded anywhere)."""
        shard, ref = self.refs[i]
        n = self.next_use[ref] = self.next_use.get(ref, 0) + 1
        now = next(self.clock_ms)
        fv = self.campaign.face_value if face_value is None else face_value
        c = self.campaign
        idem = f"i:{uuid.uuid4().hex}"
        return Use(c.id, shard, ref, c.key_id, n, uuid7(now), now, uuid.uuid4().hex, "cl_t/till-1", "store-1", "till-1",
                   device, "", "", "", idem, "cl_t", str(c.brand_id), fv, c.uses_per_code)  # fmt: skip

    def reversal(self, use: Use, *, reason: str = "refund") -> Reversal:
        """A reversal of `use`, as the reverse script would record it."""
        now = next(self.clock_ms)
        return Reversal(use.campaign_id, use.shard, use.code_ref, use.key_id, use.use_number, uuid7(now),
                        use.redemption_id, now, use.face_value, reason, "cl_t/till-2", "cl_t", use.brand_id,
                        f"r:{uuid.uuid4().hex}", uuid.uuid4().hex)  # fmt: skip


async def campaign_with_codes(
    db: asyncpg.Connection, redis: Redis, keyring: KeyRing, *, count: int, shards: int = 1, uses_per_code: int = 1,
    budget_count: int | None = None, budget_value: int | None = None, face_value: int = 0,
) -> Codes:  # fmt: skip
    """A campaign with these rules, published, and `count` issued codes spread over its shards (code_refs drawn at
    random: the tests never present a code), loaded into their buckets as the design has it."""
    made = await issuance.create_campaign(
        db, redis, keyring, name=f"ledger-{uuid.uuid4().hex[:8]}", valid_from=at(T0_MS - DAY_MS),
        valid_until=at(T0_MS + DAY_MS), uses_per_code=uses_per_code, shards=shards,
    )  # fmt: skip
    await db.execute(
        "UPDATE campaigns SET budget_count = $2, budget_value = $3, face_value = $4, currency = $5 WHERE id = $1",
        made.id, budget_count, budget_value, face_value, "CNY" if face_value or budget_value else None,
    )  # fmt: skip
    campaign = await get_campaign(db, made.id)
    await publish_from_postgres(db, redis, campaign)
    refs = [(n % shards, os.urandom(32).hex()) for n in range(count)]
    batch = uuid.uuid4()
    rows = [(bytes.fromhex(ref), campaign.key_id, campaign.id, shard, uses_per_code, campaign.valid_from,
             campaign.valid_until, batch) for shard, ref in refs]  # fmt: skip
    await db.copy_records_to_table("issued_codes", records=rows, columns=_CODE_COLUMNS)
    await load_buckets(redis, campaign.id, refs)
    return Codes(campaign, refs)


async def load_buckets(redis: Redis, campaign_id: int, refs: list[tuple[int, str]]) -> None:
    """Issue codes in Redis as the loader does: their bucket fields (issue time, s) and the shards' `iss`."""
    async with redis.pipeline(transaction=False) as pipe:
        for shard, ref in refs:
            pipe.hsetnx(keys.bucket_key(campaign_id, shard, ref), keys.bucket_field(ref), T0_MS // 1000)
            pipe.hincrby(keys.budget_key(campaign_id, shard), "iss", 1)
        await pipe.execute()


async def redeem(redis: Redis, *uses: Use) -> None:
    """Record uses in Redis (use record, counters, budget) and append their events, as the redeem script does."""
    assert await UseRepairs(redis).mark_used(uses) == len(uses)
    for use in uses:
        await redis.xadd(keys.outbox_key(use.campaign_id, use.shard), use.event())  # type: ignore[arg-type]


async def reverse(redis: Redis, *reversals: Reversal) -> None:
    """Apply reversals in Redis and append their events, as the reverse script does."""
    applied = await UseRepairs(redis).mark_reversed(reversals)
    assert (applied.applied, applied.skipped) == (len(reversals), [])
    for reversal in reversals:
        await redis.xadd(keys.outbox_key(reversal.campaign_id, reversal.shard), reversal.event())  # type: ignore[arg-type]


def writer(redis: Redis, database_url: str, consumer: str = "ledger-test") -> LedgerWriter:
    return LedgerWriter(Outbox(redis, consumer=consumer), partial(asyncpg.connect, database_url), FAST)


async def drain(redis: Redis, database_url: str) -> None:
    """Write every outbox entry to the ledger."""
    w = writer(redis, database_url)
    try:
        for _ in range(100):
            if await w.run_once() == 0:
                return
        raise AssertionError("the writer kept finding work")
    finally:
        await w.close()


async def budget(redis: Redis, campaign_id: int, shard: int) -> dict[str, int]:
    """A shard's budget hash as numbers (absent counters are 0), and "red": the redemptions it granted, un + rev."""
    found: Any = await redis.hgetall(keys.budget_key(campaign_id, shard))
    counters = {name: 0 for name in ("n", "v", "un", "uv", "rev")}
    counters |= {name: int(value) for name, value in found.items() if ":" not in name}
    return {**counters, "red": counters["un"] + counters["rev"]}


async def clean_reversals(db: asyncpg.Connection) -> None:
    """The session database keeps reversals between tests (the shared TRUNCATE predates them)."""
    await db.execute("TRUNCATE reversals, reversal_alarms")
