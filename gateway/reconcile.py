"""`rgw reconcile --campaign C [--repair]`: compare live Redis state, the outbox and the ledger, both ways.

- Uses and reversals Redis records (u:<n>, x:<n> in a code's hash) that are neither in the ledger nor on their
  way (in the outbox): the ledger is missing them. Repair re-enqueues their events from the records; the writer
  inserts them idempotently.
- Uses the ledger records that Redis does not show: Redis could grant them again. Repair marks them used in
  Redis (fail closed), loading the codes from Postgres first if Redis lost them (a code is issued in Redis iff its
  bucket field exists). Reversals the ledger records that Redis does not show: repair applies them (the use and
  its budget given back, once).
- The same code use with different redemption ids, or reversed under different reversal ids, on the two sides:
  reported (a double spend, a second reversal), never "repaired".
- Each shard's budget counters (un, uv, rev in rgw:{c.s}:budget; redemptions granted = un + rev) against the ledger
  plus the outbox: reported; repair corrects them by the difference (HINCRBY, never a SET: redemptions go on
  meanwhile, and each one counts).

Reading order makes a live campaign safe to check: RedisClient records first, then the outbox, then the ledger. An event
leaves the outbox only after the ledger committed it, so a record read first is in one or the other. The counters
are read in one MULTI with the outbox and its last entry id, and compared with the ledger's events up to that id
plus the outbox's: events after the read count on neither side.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from gateway import issuance, keys
from gateway.campaigns.model import Campaign, get_campaign
from gateway.ledger.events import PoisonEntry, decode_event, decode_reversal_event, is_reversal_entry
from gateway.redis_client import RedisClient
from gateway.uses import (
    History,
    Key,
    Reversal,
    Use,
    UseRepairs,
    from_record,
    ledger_reversals,
    ledger_uses,
    reversal_from_record,
)

CHUNK = 1000
COUNTERS = ("un", "uv", "rev")
# A cut-off beyond any stream id: the shard has no outbox stream, so every ledger row predates the snapshot.
_NO_STREAM = (10**30, 0)

# A shard's counters as the ledger has them, from events written to its outbox up to the snapshot's last id (a row
# written after the snapshot was not yet counted by Redis when its counters were read), leaving out the events
# still in the outbox (counted from there). Uses are counted once each (code_uses: a double spend's second
# redemption is an alarm, not a use Redis granted); outbox ids are compared as (ms, seq) stream ids.
_LEDGER_BUDGET = """
WITH cut AS (
    SELECT * FROM unnest($2::int[], $3::numeric[], $4::numeric[]) AS c(shard, ms, seq)
), events AS (
    SELECT r.shard, r.outbox_id, r.face_value, 1 AS redeemed, 0 AS reversed
    FROM code_uses cu JOIN redemptions r ON r.redemption_id = cu.redemption_id
    WHERE r.campaign_id = $1 AND r.redemption_id NOT IN (SELECT unnest($5::uuid[]))
    UNION ALL
    SELECT x.shard, x.outbox_id, x.face_value, 0, 1
    FROM reversals x
    WHERE x.campaign_id = $1 AND x.reversal_id NOT IN (SELECT unnest($6::uuid[]))
)
SELECT e.shard, sum(e.redeemed) AS red, sum(e.reversed) AS rev,
       sum(e.face_value * e.redeemed) AS red_value, sum(e.face_value * e.reversed) AS rev_value
FROM events e JOIN cut ON cut.shard = e.shard
WHERE CASE WHEN e.outbox_id ~ '^[0-9]+-[0-9]+$'
           THEN (split_part(e.outbox_id, '-', 1)::numeric, split_part(e.outbox_id, '-', 2)::numeric)
                <= (cut.ms, cut.seq)
           ELSE true END
GROUP BY e.shard"""


@dataclass(frozen=True, slots=True)
class BudgetDifference:
    """One shard's budget counters: what Redis holds and what the ledger and the outbox say."""

    shard: int
    redis: dict[str, int]
    expected: dict[str, int]

    @property
    def delta(self) -> dict[str, int]:
        """What to add to each counter that differs."""
        return {name: self.expected[name] - self.redis[name] for name in COUNTERS
                if self.expected[name] != self.redis[name]}  # fmt: skip

    def __str__(self) -> str:
        return f"shard {self.shard}: " + ", ".join(
            f"{name} {self.redis[name]} (ledger and outbox: {self.expected[name]})" for name in self.delta
        )


@dataclass
class ReconcileReport:
    """The differences found (and what was repaired)."""

    campaign_id: int
    shards: int = 1
    codes_checked: int = 0
    codes_missing_in_redis: int = 0
    redis_uses: int = 0
    ledger_uses: int = 0
    in_outbox: int = 0
    missing_in_ledger: list[Use] = field(default_factory=list)
    missing_in_redis: list[Use] = field(default_factory=list)
    conflicting: list[tuple[Use, Use]] = field(default_factory=list)
    redis_reversals: int = 0
    ledger_reversals: int = 0
    reversals_in_outbox: int = 0
    reversals_missing_in_ledger: list[Reversal] = field(default_factory=list)
    reversals_missing_in_redis: list[Reversal] = field(default_factory=list)
    reversals_conflicting: list[tuple[Reversal, Reversal]] = field(default_factory=list)
    reversals_not_applied: list[tuple[Reversal, str]] = field(default_factory=list)
    budget: list[BudgetDifference] = field(default_factory=list)
    repaired: int = 0

    @property
    def discrepancies(self) -> int:
        return (len(self.missing_in_ledger) + len(self.missing_in_redis) + len(self.conflicting)
                + len(self.reversals_missing_in_ledger) + len(self.reversals_missing_in_redis)
                + len(self.reversals_conflicting) + len(self.budget))  # fmt: skip

    def summary(self) -> str:
        return (
            f"campaign {self.campaign_id}: {self.codes_checked} codes, {self.redis_uses} uses in Redis, "
            f"{self.ledger_uses} in the ledger, {self.in_outbox} in the outbox; missing in the ledger: "
            f"{len(self.missing_in_ledger)}, missing in Redis: {len(self.missing_in_redis)} "
            f"({self.codes_missing_in_redis} codes absent), conflicting: {len(self.conflicting)}; "
            f"reversals: {self.redis_reversals} in Redis, {self.ledger_reversals} in the ledger, "
            f"{self.reversals_in_outbox} in the outbox, {len(self.reversals_missing_in_ledger)} missing in the "
            f"ledger, {len(self.reversals_missing_in_redis)} missing in Redis, "
            f"{len(self.reversals_conflicting)} conflicting; budget counters differ on {len(self.budget)} of "
            f"{self.shards} shards; repaired: {self.repaired}"
        )

    def details(self, limit: int = 20) -> list[str]:
        """One line per difference (at most `limit` of each kind), for the operator."""
        lines = [f"  missing in ledger: {_use(u)}" for u in self.missing_in_ledger[:limit]]
        lines += [f"  missing in Redis: {_use(u)}" for u in self.missing_in_redis[:limit]]
        lines += [f"  conflicting: code_ref {mine.code_ref[:12]} use {mine.use_number}: Redis {mine.redemption_id}, "
                  f"ledger {theirs.redemption_id}" for mine, theirs in self.conflicting[:limit]]  # fmt: skip
        lines += [f"  reversal missing in ledger: {_reversal(x)}" for x in self.reversals_missing_in_ledger[:limit]]
        lines += [f"  reversal missing in Redis: {_reversal(x)}" for x in self.reversals_missing_in_redis[:limit]]
        lines += [f"  reversal conflicting: code_ref {mine.code_ref[:12]} use {mine.use_number}: Redis "
                  f"{mine.reversal_id}, ledger {theirs.reversal_id}"
                  for mine, theirs in self.reversals_conflicting[:limit]]  # fmt: skip
        lines += [f"  reversal not applied: {_reversal(x)}: {why}" for x, why in self.reversals_not_applied[:limit]]
        lines += [f"  budget counters of {difference}" for difference in self.budget[:limit]]
        return lines


def _use(use: Use) -> str:
    return f"code_ref {use.code_ref[:12]} use {use.use_number} ({use.redemption_id})"


def _reversal(reversal: Reversal) -> str:
    return f"code_ref {reversal.code_ref[:12]} use {reversal.use_number} ({reversal.reversal_id})"


# --- Redis records ---------------------------------------------------------------------------------------------


@dataclass
class RedisRecords:
    """The uses and reversals Redis records for a campaign's codes."""

    uses: dict[Key, Use] = field(default_factory=dict)
    reversals: dict[Key, Reversal] = field(default_factory=dict)

    def add(self, campaign_id: int, row: asyncpg.Record, state: dict[str, str]) -> None:
        ref, shard, kid = row["code_ref"].hex(), row["shard"], row["key_id"]
        uses = {int(name[2:]): from_record(campaign_id, shard, ref, kid, int(name[2:]), record)
                for name, record in state.items() if name.startswith("u:")}  # fmt: skip
        for use in uses.values():
            self.uses[use.key] = use
        for name, record in state.items():
            if name.startswith("x:"):
                n = int(name[2:])
                use = uses.get(n) or from_record(campaign_id, shard, ref, kid, n, "")  # a reversal of an unknown use
                reversal = reversal_from_record(use, record)
                self.reversals[reversal.key] = reversal


async def _redis_records(conn: asyncpg.Connection, redis: RedisClient, report: ReconcileReport) -> RedisRecords:
    records = RedisRecords()
    query = "SELECT code_ref, shard, key_id FROM issued_codes WHERE campaign_id = $1"
    async with conn.transaction():
        cursor = await conn.cursor(query, report.campaign_id)
        while rows := await cursor.fetch(CHUNK):
            for row, state in zip(rows, await _code_states(redis, report, rows), strict=True):
                report.codes_checked += 1
                records.add(report.campaign_id, row, state)
    return records


async def _code_states(redis: RedisClient, report: ReconcileReport, rows: list[asyncpg.Record]) -> list[dict[str, str]]:
    """Each code's own hash (empty when it has none), and the count of codes not issued in Redis: one round trip
    asks whether each is issued and has a hash, a second reads only the hashes that exist."""
    cid = report.campaign_id
    refs = [(row["shard"], row["code_ref"].hex()) for row in rows]
    async with redis.pipeline(transaction=False) as pipe:
        for shard, ref in refs:
            pipe.hexists(keys.bucket_key(cid, shard, ref), keys.bucket_field(ref))
            pipe.exists(keys.code_key(cid, shard, ref))
        found: list[Any] = await pipe.execute()
    issued, has_hash = found[0::2], found[1::2]
    report.codes_missing_in_redis += sum(1 for flag in issued if not flag)
    async with redis.pipeline(transaction=False) as pipe:
        for (shard, ref), exists in zip(refs, has_hash, strict=True):
            if exists:
                pipe.hgetall(keys.code_key(cid, shard, ref))
        hashes: list[dict[str, str]] = await pipe.execute()
    states = iter(hashes)
    return [next(states) if exists else {} for exists in has_hash]


# --- the outbox and the budget counters ------------------------------------------------------------------------


@dataclass
class ShardSnapshot:
    """One shard's budget counters and outbox, read in one MULTI (the scripts change both atomically)."""

    shard: int
    counters: dict[str, int]
    last_id: tuple[int, int]  # the outbox's last generated entry id: later events were not counted yet
    uses: dict[str, tuple[Key, int]] = field(default_factory=dict)  # redemption id -> (code use, face value)
    reversals: dict[str, tuple[Key, int]] = field(default_factory=dict)  # reversal id -> (code use, face value)

    def add(self, fields: dict[str, str]) -> None:
        with contextlib.suppress(PoisonEntry, ValueError):  # poison is the writer's to dead-letter
            if is_reversal_entry(fields):
                x = decode_reversal_event(fields)
                self.reversals[x["xid"]] = ((x["ref"], int(x["use"])), int(x["fv"] or 0))
            else:
                e = decode_event(fields)
                self.uses[e["rid"]] = ((e["ref"], int(e["use"])), int(e["fv"] or 0))


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def _snapshot(redis: RedisClient, campaign_id: int, shard: int) -> ShardSnapshot:
    outbox = keys.outbox_key(campaign_id, shard)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hmget(keys.budget_key(campaign_id, shard), list(COUNTERS))
        pipe.xrange(outbox)
        pipe.xinfo_stream(outbox)
        counters, entries, info = await pipe.execute(raise_on_error=False)
    last = _NO_STREAM if isinstance(info, Exception) else _stream_id(str(info["last-generated-id"]))
    snapshot = ShardSnapshot(shard, {name: int(v or 0) for name, v in zip(COUNTERS, counters, strict=True)}, last)
    for _, fields in entries:
        snapshot.add(fields)
    return snapshot


async def _snapshots(redis: RedisClient, campaign: Campaign) -> list[ShardSnapshot]:
    return [await _snapshot(redis, campaign.id, shard) for shard in range(campaign.shards)]


async def _budget_differences(
    conn: asyncpg.Connection, campaign_id: int, snapshots: list[ShardSnapshot]
) -> list[BudgetDifference]:
    """The shards whose counters differ from the ledger's events up to the snapshot plus the outbox's."""
    cut = [s.shard for s in snapshots], [str(s.last_id[0]) for s in snapshots], [str(s.last_id[1]) for s in snapshots]
    rids = [rid for s in snapshots for rid in s.uses]
    xids = [xid for s in snapshots for xid in s.reversals]
    rows = {r["shard"]: r for r in await conn.fetch(_LEDGER_BUDGET, campaign_id, *cut, _uuids(rids), _uuids(xids))}
    differences = []
    for s in snapshots:
        row = rows.get(s.shard)
        red = (row["red"] if row else 0) + len(s.uses)
        rev = (row["rev"] if row else 0) + len(s.reversals)
        red_value = (row["red_value"] if row else 0) + sum(fv for _, fv in s.uses.values())
        rev_value = (row["rev_value"] if row else 0) + sum(fv for _, fv in s.reversals.values())
        expected = {"un": red - rev, "uv": red_value - rev_value, "rev": rev}
        difference = BudgetDifference(s.shard, s.counters, {k: int(v) for k, v in expected.items()})
        if difference.delta:
            differences.append(difference)
    return differences


def _uuids(ids: list[str]) -> list[str]:
    """Outbox ids that are UUIDs (anything else is poison, never in the ledger)."""
    valid = []
    for text in ids:
        with contextlib.suppress(ValueError):
            valid.append(str(uuid.UUID(text)))
    return valid


async def _correct_budget(redis: RedisClient, campaign_id: int, differences: list[BudgetDifference]) -> int:
    """Add each shard's difference to its counters (atomically per shard); returns the shards corrected."""
    for difference in differences:
        async with redis.pipeline(transaction=True) as pipe:
            for name, delta in difference.delta.items():
                pipe.hincrby(keys.budget_key(campaign_id, difference.shard), name, delta)
            await pipe.execute()
    return len(differences)


# --- comparison and repair -------------------------------------------------------------------------------------


def _compare_uses(report: ReconcileReport, redis: dict[Key, Use], ledger: dict[Key, Use], waiting: set[Key]) -> None:
    report.redis_uses, report.ledger_uses, report.in_outbox = len(redis), len(ledger), len(waiting)
    report.missing_in_ledger = [u for k, u in redis.items() if k not in ledger and k not in waiting]
    report.missing_in_redis = [u for k, u in ledger.items() if k not in redis]
    report.conflicting = [(u, ledger[k]) for k, u in redis.items()
                          if k in ledger and ledger[k].redemption_id != u.redemption_id]  # fmt: skip


def _compare_reversals(
    report: ReconcileReport, redis: dict[Key, Reversal], ledger: dict[Key, Reversal], waiting: set[Key]
) -> None:
    report.redis_reversals, report.ledger_reversals, report.reversals_in_outbox = len(redis), len(ledger), len(waiting)
    report.reversals_missing_in_ledger = [x for k, x in redis.items() if k not in ledger and k not in waiting]
    report.reversals_missing_in_redis = [x for k, x in ledger.items() if k not in redis]
    report.reversals_conflicting = [(x, ledger[k]) for k, x in redis.items()
                                    if k in ledger and ledger[k].reversal_id != x.reversal_id]  # fmt: skip


async def reconcile(conn: asyncpg.Connection, redis: RedisClient, campaign_id: int, *, repair: bool) -> ReconcileReport:
    """Find (and with `repair`, fix) every difference between Redis, the outbox and the ledger."""
    campaign = await get_campaign(conn, campaign_id)
    report = ReconcileReport(campaign_id, shards=campaign.shards)
    in_redis = await _redis_records(conn, redis, report)
    snapshots = await _snapshots(redis, campaign)
    uses, reversals = await ledger_uses(conn, campaign_id), await ledger_reversals(conn, campaign_id)
    _compare_uses(report, in_redis.uses, uses, {k for s in snapshots for k, _ in s.uses.values()})
    _compare_reversals(report, in_redis.reversals, reversals, {k for s in snapshots for k, _ in s.reversals.values()})
    report.budget = await _budget_differences(conn, campaign_id, snapshots)
    if repair:
        await _repair(conn, redis, campaign, report, History.replay(uses.values(), reversals.values()))
    return report


async def _repair(
    conn: asyncpg.Connection, redis: RedisClient, campaign: Campaign, report: ReconcileReport, history: History
) -> None:
    repairs = UseRepairs(redis)
    if report.codes_missing_in_redis:
        await issuance.load_codes(conn, redis, campaign_id=campaign.id)
    report.repaired += await repairs.mark_used(report.missing_in_redis, history)
    applied = await repairs.mark_reversed(report.reversals_missing_in_redis, history)
    report.repaired += applied.applied
    report.reversals_not_applied = applied.skipped
    report.repaired += await repairs.reenqueue(report.missing_in_ledger)
    report.repaired += await repairs.reenqueue_reversals(report.reversals_missing_in_ledger)
    # Last, from a fresh snapshot: the repairs above changed counters (mark_used, mark_reversed) and the outbox.
    fresh = await _budget_differences(conn, campaign.id, await _snapshots(redis, campaign))
    report.repaired += await _correct_budget(redis, campaign.id, fresh)
