"""`rgw reconcile` and `rgw rebuild-redis` with reversals and budgets: reversals missing on either side, the same
use reversed twice, budget counters, a rebuild after FLUSHALL or killed midway, the repair scripts, and repairs
while redemptions continue."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from gateway import keys
from gateway import reconcile as reconcile_module
from gateway.campaigns.model import Campaign, get_campaign, split
from gateway.campaigns.publish import publish_from_postgres
from gateway.coderefs import KeyRing
from gateway.ledger.events import parse, parse_reversal
from gateway.ledger.store import write_batch
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.rebuild import rebuild_redis
from gateway.reconcile import ReconcileReport, ShardSnapshot, reconcile
from gateway.uses import Reversal, Use, UseRepairs
from tests.conftest import gateway_environ
from tests.integration.chaos_helpers import sigkill
from tests.integration.conftest import Issue, RunningGateway
from tests.integration.grpc_helpers import redeem_request
from tests.integration.ledger_state import (
    Codes,
    budget,
    campaign_with_codes,
    clean_reversals,
    load_buckets,
    redeem,
    reverse,
)
from tests.integration.ledger_state import drain as ledger_state_drain
from tests.integration.ledger_state import writer as ledger_writer
from tests.integration.test_reconcile import redeem_all, rgw


@pytest_asyncio.fixture(loop_scope="session")
async def ledger(db: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """The test database with no reversals left from earlier tests."""
    await clean_reversals(db)
    yield db


async def redeemed_and_reversed(
    db: asyncpg.Connection, redis: Redis, keyring: KeyRing, migrated: str, *, count: int, reversed_: int, **rules: Any
) -> tuple[Codes, list[Use], list[Reversal]]:
    """`count` codes each used once and the first `reversed_` of those uses reversed, all in the ledger."""
    codes = await campaign_with_codes(db, redis, keyring, count=count, **rules)
    uses = [codes.use(i) for i in range(count)]
    await redeem(redis, *uses)
    reversals = [codes.reversal(u) for u in uses[:reversed_]]
    await reverse(redis, *reversals)
    await ledger_state_drain(redis, migrated)
    return codes, uses, reversals


async def test_consistent_campaign_with_reversals_passes(
    ledger: asyncpg.Connection, redis: Redis, keyring: KeyRing, redis_url: str, migrated: str
) -> None:
    codes, _, _ = await redeemed_and_reversed(ledger, redis, keyring, migrated, count=4, reversed_=2, shards=2,
                                              face_value=100, budget_count=10)  # fmt: skip
    result = rgw(redis_url, migrated, "reconcile", "--campaign", str(codes.campaign.id))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reversals: 2 in Redis, 2 in the ledger, 0 in the outbox" in result.stdout
    assert "budget counters differ on 0 of 2 shards" in result.stdout


async def test_reversal_missing_in_the_ledger_is_reenqueued_and_written(
    ledger: asyncpg.Connection, redis: Redis, keyring: KeyRing, migrated: str
) -> None:
    codes, _, reversals = await redeemed_and_reversed(ledger, redis, keyring, migrated, count=3, reversed_=2,
                                                      face_value=100)  # fmt: skip
    lost = reversals[1]
    await ledger.execute("DELETE FROM reversals WHERE reversal_id = $1", lost.reversal_id)

    found = await reconcile(ledger, redis, codes.campaign.id, repair=False)
    repaired = await reconcile(ledger, redis, codes.campaign.id, repair=True)
    await ledger_state_drain(redis, migrated)
    after = await reconcile(ledger, redis, codes.campaign.id, repair=False)

    assert [x.reversal_id for x in found.reversals_missing_in_ledger] == [lost.reversal_id]
    assert (found.redis_reversals, found.ledger_reversals, found.reversals_missing_in_redis) == (2, 1, [])
    # Redis gave the use back; the ledger does not know: its counters differ from the ledger's, until re-enqueued.
    assert [str(d) for d in found.budget] == ["shard 0: un 1 (ledger and outbox: 2), uv 100 (ledger and outbox: 200), "
                                              "rev 2 (ledger and outbox: 1)"]  # fmt: skip
    assert repaired.repaired == 1 and after.discrepancies == 0, after.summary()
    row = await ledger.fetchrow("SELECT * FROM reversals WHERE reversal_id = $1", lost.reversal_id)
    assert row is not None and str(row["redemption_id"]) == lost.redemption_id
    assert (row["reason"], row["caller"], row["client_id"], row["face_value"]) == ("refund", "cl_t/till-2", "cl_t", 100)
    assert int(row["reversed_at"].timestamp() * 1000) == lost.at_ms and row["use_number"] == 1


async def test_reversal_missing_in_redis_is_applied(
    ledger: asyncpg.Connection, redis: Redis, keyring: KeyRing, migrated: str
) -> None:
    codes, uses, reversals = await redeemed_and_reversed(ledger, redis, keyring, migrated, count=2, reversed_=1,
                                                         face_value=300, budget_count=5)  # fmt: skip
    before = await budget(redis, codes.campaign.id, 0)
    lost = reversals[0]
    code_key = keys.code_key(codes.campaign.id, 0, lost.code_ref)
    # Redis lost the reversal with everything it changed: the record, the use given back, the budget counters.
    await redis.hdel(code_key, "x:1", lost.idem)
    await redis.hincrby(code_key, "used", 1)
    await redis.hset(keys.budget_key(codes.campaign.id, 0), mapping={"un": 2, "uv": 600, "rev": 0})

    found = await reconcile(ledger, redis, codes.campaign.id, repair=False)
    repaired = await reconcile(ledger, redis, codes.campaign.id, repair=True)
    after = await reconcile(ledger, redis, codes.campaign.id, repair=False)

    assert [x.reversal_id for x in found.reversals_missing_in_redis] == [lost.reversal_id]
    assert found.reversals_missing_in_ledger == [] and len(found.budget) == 1
    assert repaired.repaired == 1 and repaired.reversals_not_applied == []
    assert after.discrepancies == 0, after.summary()
    state: Any = await redis.hgetall(code_key)
    assert state["x:1"].split("|")[:3] == [lost.reversal_id, str(lost.at_ms), "refund"] and state["used"] == "0"
    assert state[lost.idem] == f"{lost.fingerprint}|{lost.reversal_id}|{lost.at_ms}|1|1"  # a retried Reverse replays
    assert await budget(redis, codes.campaign.id, 0) == before
    untouched: Any = await redis.hget(keys.code_key(codes.campaign.id, 0, uses[1].code_ref), "u:1")
    assert untouched.startswith(uses[1].redemption_id)


async def test_the_same_use_reversed_under_different_ids_is_reported_not_repaired(
    ledger: asyncpg.Connection, redis: Redis, keyring: KeyRing, migrated: str
) -> None:
    codes, _, reversals = await redeemed_and_reversed(ledger, redis, keyring, migrated, count=1, reversed_=1)
    theirs = reversals[0]
    code_key = keys.code_key(codes.campaign.id, 0, theirs.code_ref)
    other = str(uuid.uuid4())
    await redis.hset(code_key, "x:1", f"{other}|{theirs.at_ms}|refund|cl_t/till-2|cl_t")

    found = await reconcile(ledger, redis, codes.campaign.id, repair=True)

    assert [(mine.reversal_id, ledger_x.reversal_id) for mine, ledger_x in found.reversals_conflicting] == [
        (other, theirs.reversal_id)
    ]
    assert found.repaired == 0 and "reversal conflicting" in "\n".join(found.details())
    record: Any = await redis.hget(code_key, "x:1")
    assert record.startswith(other)


async def test_budget_counter_differences_are_found_and_repaired(
    ledger: asyncpg.Connection, redis: Redis, keyring: KeyRing, migrated: str
) -> None:
    codes, _, _ = await redeemed_and_reversed(ledger, redis, keyring, migrated, count=6, reversed_=2, shards=2,
                                              face_value=100, budget_count=20, budget_value=5000)  # fmt: skip
    cid = codes.campaign.id
    # On the way: one more redemption in the outbox, and one the writer committed but did not acknowledge (died).
    waiting, committed = codes.use(4), codes.use(5)
    await redeem(redis, waiting, committed)
    entry: Any = await redis.xrange(keys.outbox_key(cid, committed.shard), count=1)
    await write_batch(ledger, [parse(entry[0][0], entry[0][1])])
    expected = [await budget(redis, cid, shard) for shard in range(2)]
    await redis.hincrby(keys.budget_key(cid, 0), "un", 5)
    await redis.hincrby(keys.budget_key(cid, 1), "uv", -100)
    await redis.hset(keys.budget_key(cid, 1), "rev", 7)

    found = await reconcile(ledger, redis, cid, repair=False)
    repaired = await reconcile(ledger, redis, cid, repair=True)
    after = await reconcile(ledger, redis, cid, repair=False)

    assert found.discrepancies == 2 and (found.in_outbox, found.ledger_uses) == (2, 7)
    assert {d.shard: d.delta for d in found.budget} == {0: {"un": -5}, 1: {"uv": 100, "rev": -6}}
    assert repaired.repaired == 2 and after.discrepancies == 0, after.summary()
    assert [await budget(redis, cid, shard) for shard in range(2)] == expected
    assert (expected[0]["red"] + expected[1]["red"], expected[0]["rev"] + expected[1]["rev"]) == (8, 2)


async def test_rebuild_after_flushall_restores_uses_reversals_budget_and_shares(
    ledger: asyncpg.Connection, redis: Redis, keyring: KeyRing, migrated: str
) -> None:
    codes, uses, reversals = await redeemed_and_reversed(ledger, redis, keyring, migrated, count=7, reversed_=3,
                                                         shards=2, uses_per_code=2, face_value=250,
                                                         budget_count=10, budget_value=2000)  # fmt: skip
    second = codes.use(6)  # code 6's second use
    await redeem(redis, second)
    await ledger_state_drain(redis, migrated)
    cid = codes.campaign.id
    before = {ref: await redis.hgetall(keys.code_key(cid, shard, ref)) for shard, ref in codes.refs}
    await redis.flushdb()

    report = await rebuild_redis(ledger, redis)
    again = await rebuild_redis(ledger, redis)

    assert (report.campaigns, report.codes, report.uses_restored, report.reversals_restored) == (1, 7, 8, 3)
    assert (again.uses_restored, again.reversals_restored) == (0, 0)  # idempotent: nothing counted twice
    for shard, ref in codes.refs:
        state: Any = await redis.hgetall(keys.code_key(cid, shard, ref))
        assert {k: v for k, v in state.items() if k[:2] in ("u:", "x:")} == {
            k: v for k, v in before[ref].items() if k[:2] in ("u:", "x:")
        }
        assert (state["used"], state["seq"]) == (before[ref]["used"], before[ref]["seq"])
    shards = [await budget(redis, cid, shard) for shard in range(2)]
    granted = [sum(1 for u in [*uses, second] if u.shard == s) - sum(1 for x in reversals if x.shard == s)
               for s in range(2)]  # fmt: skip
    for s, counters in enumerate(shards):
        assert counters["un"] == granted[s] and counters["uv"] == 250 * granted[s]
        assert counters["red"] == sum(1 for u in [*uses, second] if u.shard == s)
        assert counters["rev"] == sum(1 for x in reversals if x.shard == s)
    assert sum(c["n"] for c in shards) == 10 and sum(c["v"] for c in shards) == 2000
    # What is left to grant is exactly what the ledger says, split evenly between the shards.
    assert sorted(c["n"] - c["un"] for c in shards) == sorted(split(10 - 5, 2))
    assert sorted(c["v"] - c["uv"] for c in shards) == sorted(split(2000 - 5 * 250, 2))
    assert await redis.exists(keys.INITIALISED)


@pytest.mark.slow
async def test_rebuild_killed_midway_then_run_again_restores_exactly(
    ledger: asyncpg.Connection, redis: Redis, keyring: KeyRing, redis_url: str, migrated: str
) -> None:
    count, reversed_ = 20_000, 5_000
    codes = await campaign_with_codes(ledger, redis, keyring, count=count, shards=2, face_value=10,
                                      budget_count=30_000, budget_value=250_000)  # fmt: skip
    uses = [codes.use(i) for i in range(count)]
    reversals = [codes.reversal(u) for u in uses[:reversed_]]
    for n in range(0, count, 5000):  # straight into the ledger: Redis is about to be lost anyway
        await write_batch(ledger, [parse(f"{u.at_ms}-{i}", u.event()) for i, u in enumerate(uses[n : n + 5000])])
    await write_batch(ledger, [], reversal_rows=[parse_reversal(f"{x.at_ms}-0", x.event()) for x in reversals])
    await redis.flushdb()
    cid = codes.campaign.id

    env = {**os.environ, **gateway_environ(redis_url, migrated)}
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "rebuild-redis"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while not int(await redis.hget(keys.budget_key(cid, 0), "un") or 0):
            assert proc.poll() is None, "the rebuild ended before it was caught restoring uses"
            await asyncio.sleep(0.002)
        sigkill(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    caught = [await budget(redis, cid, shard) for shard in range(2)]
    assert not await redis.exists(keys.INITIALISED), "the rebuild finished before it was killed"

    report = await rebuild_redis(ledger, redis)

    assert sum(c["red"] for c in caught) < count and report.uses_restored == count - sum(c["red"] for c in caught)
    shards = [await budget(redis, cid, shard) for shard in range(2)]
    for s, counters in enumerate(shards):
        red = sum(1 for u in uses if u.shard == s)
        rev = sum(1 for x in reversals if x.shard == s)
        assert (counters["red"], counters["rev"], counters["un"], counters["uv"]) == (red, rev, red - rev,
                                                                                      10 * (red - rev))  # fmt: skip
    assert sum(c["n"] for c in shards) == 30_000 and sum(c["v"] for c in shards) == 250_000
    assert sorted(c["n"] - c["un"] for c in shards) == sorted(split(30_000 - (count - reversed_), 2))
    async with redis.pipeline(transaction=False) as pipe:
        for u in uses:
            pipe.hget(keys.code_key(cid, u.shard, u.code_ref), "used")
        used: list[Any] = await pipe.execute()
    assert used == ["0"] * reversed_ + ["1"] * (count - reversed_)
    assert await redis.exists(keys.INITIALISED)


# --- the repair scripts (lua/mark_used.lua, lua/mark_reversed.lua): register, call, inspect, call again ---------


async def test_mark_used_needs_an_issued_code_and_counts_a_use_once(
    ledger: asyncpg.Connection, redis: Redis, keyring: KeyRing
) -> None:
    codes = await campaign_with_codes(ledger, redis, keyring, count=2, uses_per_code=3, face_value=70)
    cid, repairs = codes.campaign.id, UseRepairs(redis)
    first, second = codes.use(0, device="dev-1"), codes.use(0, device="dev-2")
    shard, ref = codes.refs[0]
    await redis.hdel(keys.bucket_key(cid, shard, ref), keys.bucket_field(ref))
    with pytest.raises(LookupError, match="not issued in Redis"):
        await repairs.mark_used([first])
    assert not await redis.exists(keys.code_key(cid, shard, ref)) and (await budget(redis, cid, 0))["red"] == 0

    await load_buckets(redis, cid, [(shard, ref)])
    assert await repairs.mark_used([second]) == 1  # use 2 before use 1 (a rebuild's order is the ledger's)
    assert await repairs.mark_used([first, second]) == 1

    state: Any = await redis.hgetall(keys.code_key(cid, shard, ref))
    assert (state["used"], state["seq"], state["last"], state["dev"]) == ("2", "2", str(second.at_ms), "dev-1")
    assert state["u:1"] == first.record() and state["u:2"] == second.record()
    assert state[first.idem] == f"{first.fingerprint}|{first.redemption_id}|{first.at_ms}|1|2"
    counters = await budget(redis, cid, 0)
    assert (counters["un"], counters["uv"], counters["red"], counters["rev"]) == (2, 140, 2, 0)


async def test_mark_reversed_gives_a_recorded_use_back_once(
    ledger: asyncpg.Connection, redis: Redis, keyring: KeyRing
) -> None:
    codes = await campaign_with_codes(ledger, redis, keyring, count=1, uses_per_code=2, face_value=70)
    cid, repairs = codes.campaign.id, UseRepairs(redis)
    use = codes.use(0)
    undo, unknown = codes.reversal(use), codes.reversal(codes.use(0))  # use 2 never recorded
    forged = dataclasses.replace(undo, redemption_id=str(uuid.uuid4()))
    await redeem(redis, use)

    skipped = await repairs.mark_reversed([unknown, forged])
    applied = await repairs.mark_reversed([undo])
    again = await repairs.mark_reversed([undo])

    assert [why for _, why in skipped.skipped] == ["its use is not recorded in Redis",
                                                   "its use carries another redemption id in Redis"]  # fmt: skip
    assert (skipped.applied, applied.applied, again.applied, again.skipped) == (0, 1, 0, [])
    state: Any = await redis.hgetall(keys.code_key(cid, 0, use.code_ref))
    assert (state["used"], state["seq"], state["x:1"]) == ("0", "1", undo.record())  # use numbers never reused
    counters = await budget(redis, cid, 0)
    assert (counters["un"], counters["uv"], counters["red"], counters["rev"]) == (0, 0, 1, 1)


async def test_repairs_during_a_budget_race_never_let_the_campaign_overrun(
    gateway: RunningGateway, issue: Issue, ledger: asyncpg.Connection, redis: Redis, migrated: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """reconcile --repair corrects counters by a difference read atomically with the outbox, never by a SET: run
    over and over while 600 redemptions race for a budget of 500 (and the writer drains), it changes nothing."""
    take_snapshots = reconcile_module._snapshots

    async def slow_snapshots(redis: Redis, campaign: Campaign) -> list[ShardSnapshot]:
        taken = await take_snapshots(redis, campaign)
        await asyncio.sleep(0.05)  # redemptions made and written to the ledger meanwhile must not count
        return taken

    monkeypatch.setattr(reconcile_module, "_snapshots", slow_snapshots)
    issued = await issue(600)
    cid = issued.campaign.id
    await ledger.execute("UPDATE campaigns SET budget_count = 500 WHERE id = $1", cid)
    await publish_from_postgres(ledger, redis, await get_campaign(ledger, cid))
    stop, racing = asyncio.Event(), asyncio.Event()
    draining = ledger_writer(redis, migrated, "race-writer")  # small batches: the ledger grows all the time
    conn = await asyncpg.connect(migrated)
    rounds: list[ReconcileReport] = []

    async def repair_until_done() -> None:
        while racing.is_set() or not rounds:
            rounds.append(await reconcile(conn, redis, cid, repair=True))

    async def race() -> list[pb.RedeemResponse]:
        replies = []
        for start in range(0, 600, 10):  # in waves, so repairs run between and during them
            wave = issued.codes[start : start + 10]
            replies += await asyncio.gather(*(gateway.stub.Redeem(redeem_request(c, "k")) for c in wave))
            await asyncio.sleep(0.01)
        racing.clear()
        return replies

    racing.set()
    tasks = [asyncio.create_task(draining.run(stop)), asyncio.create_task(repair_until_done())]
    try:
        replies = await race()
        await tasks[1]
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await conn.close()
    await ledger_state_drain(redis, migrated)

    outcomes = [r.outcome for r in replies]
    assert (outcomes.count(pb.OUTCOME_REDEEMED), outcomes.count(pb.OUTCOME_BUDGET_EXHAUSTED)) == (500, 100)
    assert len(rounds) >= 3, f"only {len(rounds)} reconcile rounds ran during the race"
    assert (await budget(redis, cid, 0))["un"] == 500
    assert await ledger.fetchval("SELECT count(*) FROM redemptions WHERE campaign_id = $1", cid) == 500
    final = await reconcile(ledger, redis, cid, repair=False)
    assert final.discrepancies == 0, final.summary()


async def test_redemptions_written_to_the_ledger_while_reconcile_runs_are_not_counted_twice(
    gateway: RunningGateway, issue: Issue, ledger: asyncpg.Connection, redis: Redis, migrated: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Right after each read of the counters and the outbox, one more redemption is made and written to the
    ledger: the counters did not include it, so neither may what they are compared with."""
    issued = await issue(3)
    await redeem_all(gateway, issued.codes[:1])
    await ledger_state_drain(redis, migrated)
    take_snapshots, late = reconcile_module._snapshots, iter(issued.codes[1:])

    async def snapshot_then_redeem(redis: Redis, campaign: Campaign) -> list[ShardSnapshot]:
        taken = await take_snapshots(redis, campaign)
        reply = await gateway.stub.Redeem(redeem_request(next(late), "late"))
        assert reply.outcome == pb.OUTCOME_REDEEMED
        await ledger_state_drain(redis, migrated)
        return taken

    monkeypatch.setattr(reconcile_module, "_snapshots", snapshot_then_redeem)
    report = await reconcile(ledger, redis, issued.campaign.id, repair=True)  # reads counters twice: two late ones

    assert report.budget == [] and report.repaired == 0, report.details()
    assert (await budget(redis, issued.campaign.id, 0))["un"] == 3
