"""`rgw reconcile --campaign C [--repair]`: compare live Redis state, the outbox and the ledger, both ways.

- Uses Redis records that are neither in the ledger nor on their way (in the outbox): the ledger is missing
  them. Repair re-enqueues their events from the use records; the writer inserts them idempotently.
- Uses the ledger records that Redis does not show: Redis could grant them again. Repair marks them used in
  Redis (fail closed), loading the code from Postgres first if Redis lost it.
- The same code use with different redemption ids on the two sides: reported (a double spend), never "repaired".
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.asyncio import Redis

from gateway import issuance, keys
from gateway.ledger.events import PoisonEntry, decode_event
from gateway.uses import Use, UseRepairs, from_record, ledger_uses

CHUNK = 1000


@dataclass
class ReconcileReport:
    """The differences found (and what was repaired)."""

    campaign_id: int
    codes_checked: int = 0
    codes_missing_in_redis: int = 0
    redis_uses: int = 0
    ledger_uses: int = 0
    in_outbox: int = 0
    missing_in_ledger: list[Use] = field(default_factory=list)
    missing_in_redis: list[Use] = field(default_factory=list)
    conflicting: list[tuple[Use, Use]] = field(default_factory=list)
    repaired: int = 0

    @property
    def discrepancies(self) -> int:
        return len(self.missing_in_ledger) + len(self.missing_in_redis) + len(self.conflicting)

    def summary(self) -> str:
        return (
            f"campaign {self.campaign_id}: {self.codes_checked} codes, {self.redis_uses} uses in Redis, "
            f"{self.ledger_uses} in the ledger, {self.in_outbox} in the outbox; missing in the ledger: "
            f"{len(self.missing_in_ledger)}, missing in Redis: {len(self.missing_in_redis)} "
            f"({self.codes_missing_in_redis} codes absent), conflicting: {len(self.conflicting)}; "
            f"repaired: {self.repaired}"
        )


async def _redis_uses(conn: asyncpg.Connection, redis: Redis, report: ReconcileReport) -> dict[tuple[str, int], Use]:
    uses: dict[tuple[str, int], Use] = {}
    query = "SELECT code_ref, shard, key_id FROM issued_codes WHERE campaign_id = $1"
    async with conn.transaction():
        cursor = await conn.cursor(query, report.campaign_id)
        while rows := await cursor.fetch(CHUNK):
            async with redis.pipeline(transaction=False) as pipe:
                for row in rows:
                    pipe.hgetall(keys.code_key(report.campaign_id, row["shard"], row["code_ref"].hex()))
                states: list[dict[str, str]] = await pipe.execute()
            for row, state in zip(rows, states, strict=True):
                report.codes_checked += 1
                report.codes_missing_in_redis += not state
                for name, record in state.items():
                    if name.startswith("u:"):
                        use = from_record(report.campaign_id, row["shard"], row["code_ref"].hex(), row["key_id"],
                                          int(name[2:]), record)  # fmt: skip
                        uses[use.key] = use
    return uses


async def _in_outbox(redis: Redis, campaign_id: int, shards: int) -> set[tuple[str, int]]:
    waiting: set[tuple[str, int]] = set()
    for shard in range(shards):
        entries: Any = await redis.xrange(keys.outbox_key(campaign_id, shard))
        for _, fields in entries:
            with contextlib.suppress(PoisonEntry, ValueError):
                event = decode_event(fields)
                waiting.add((event["ref"], int(event["use"])))
    return waiting


async def reconcile(conn: asyncpg.Connection, redis: Redis, campaign_id: int, *, repair: bool) -> ReconcileReport:
    """Find (and with `repair`, fix) every difference between Redis, the outbox and the ledger."""
    campaign = await issuance.get_campaign(conn, campaign_id)
    report = ReconcileReport(campaign_id)
    in_redis = await _redis_uses(conn, redis, report)
    in_ledger = await ledger_uses(conn, campaign_id)
    waiting = await _in_outbox(redis, campaign_id, campaign.shards)
    report.redis_uses, report.ledger_uses, report.in_outbox = len(in_redis), len(in_ledger), len(waiting)
    report.missing_in_ledger = [u for k, u in in_redis.items() if k not in in_ledger and k not in waiting]
    report.missing_in_redis = [u for k, u in in_ledger.items() if k not in in_redis]
    report.conflicting = [
        (u, in_ledger[k])
        for k, u in in_redis.items()
        if k in in_ledger and in_ledger[k].redemption_id != u.redemption_id
    ]
    if repair:
        repairs = UseRepairs(redis)
        if report.codes_missing_in_redis:
            await issuance.load_codes(conn, redis, campaign_id=campaign_id)
        report.repaired += await repairs.mark_used(report.missing_in_redis)
        report.repaired += await repairs.reenqueue(report.missing_in_ledger)
    return report
