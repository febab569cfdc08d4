"""`rgw campaign status C` and the redeem script's per-minute decision counters it reads (gateway/keys.py
`stats_key`), against the real servers: counts, windows and rates on the test clock, the budget and the outbox
lag before and after the ledger writer drains, the JSON shape, an unknown campaign."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from functools import partial
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from gateway import codes, keys
from gateway.campaigns import admin
from gateway.campaigns.status import campaign_status, render, to_json
from gateway.clock import ManualClock
from gateway.coderefs import KeyRing
from gateway.domain import Caller, IdempotencyConflict, ItemFailure, Outcome, RedeemInput
from gateway.ledger.outbox import Outbox
from gateway.ledger.writer import LedgerWriter
from gateway.redis_store import RedisCodeStore, load_lua
from gateway.validation import check_redeem
from risk import keys as risk_keys
from tests.conftest import T0_MS, gateway_environ
from tests.integration.conftest import DAY_MS, Issue, RunningGateway
from tests.integration.grpc_helpers import redeem_request
from tests.integration.risk_e2e_helpers import FAST, add_store, announce
from tests.integration.test_cli import rgw

MINUTE_MS = 60_000
CALLER = Caller(client_id="cl_a", brand_id=1, role="pos")  # the `issue` fixture's campaigns are brand 1's


def command(code: str, keyring: KeyRing, key: str = "idem-1", device: str = "dev-1"):  # type: ignore[no-untyped-def]
    return check_redeem(RedeemInput(code, key, "s1", "t1", device, None), keyring, CALLER)


async def counters(redis: Redis, campaign_id: int, at_ms: int) -> dict[str, int]:
    """The decision counters of shard 0 for the minute of `at_ms`."""
    found = await redis.hgetall(keys.stats_key(campaign_id, 0, keys.stats_minute(at_ms)))
    return {str(reason): int(n) for reason, n in found.items()}


# -- The script's contract ----------------------------------------------------------------------------------------


async def test_the_script_counts_each_decided_redeem_once_in_the_minute_of_its_now(
    issue: Issue, redis: Redis, keyring: KeyRing
) -> None:
    issued = await issue(3, valid_from_ms=T0_MS, valid_until_ms=T0_MS + DAY_MS)
    store = RedisCodeStore(redis)
    cid = issued.campaign.id
    now = T0_MS + 5_000
    a, b, c = issued.codes

    assert (await store.redeem_one(command(a, keyring), "rid-1", mode="redeem", now_ms=now)).outcome is Outcome.REDEEMED
    replay = await store.redeem_one(command(a, keyring), "rid-2", mode="redeem", now_ms=now + 1)
    used = await store.redeem_one(command(a, keyring, key="idem-2"), "rid-3", mode="redeem", now_ms=now + 2)
    for code, at in ((a, now), (b, now), (c, T0_MS - 1), (c, T0_MS + DAY_MS)):  # Validate counts nothing
        await store.redeem_one(command(code, keyring, key="idem-v"), "rid-4", mode="validate", now_ms=at)
    unknown = codes.generate(codes.Route(cid, 0))
    not_found = await store.redeem_one(command(unknown, keyring), "r", mode="redeem", now_ms=now)
    early = await store.redeem_one(command(b, keyring), "rid-5", mode="redeem", now_ms=T0_MS - 1)
    late = await store.redeem_one(command(c, keyring), "rid-6", mode="redeem", now_ms=T0_MS + DAY_MS)
    late_again = await store.redeem_one(command(c, keyring), "rid-7", mode="redeem", now_ms=T0_MS + DAY_MS + 1)

    assert replay.replayed and used.outcome is Outcome.ALREADY_REDEEMED
    assert not_found.outcome is Outcome.NOT_FOUND  # not attributable to the campaign: never counted
    assert [r.outcome for r in (early, late, late_again)] == [Outcome.NOT_YET_VALID] + [Outcome.EXPIRED] * 2
    assert await counters(redis, cid, now) == {"REDEEMED": 1, "NO_USES_LEFT": 1}  # the replay: not again
    assert await counters(redis, cid, T0_MS - 1) == {"CODE_NOT_YET_VALID": 1}  # the minute before T0
    # a decline records nothing for replay: its retry is decided, and counted, again
    assert await counters(redis, cid, T0_MS + DAY_MS) == {"CODE_EXPIRED": 2}
    stats = [key async for key in redis.scan_iter(match=f"rgw:{{c{cid}.0}}:stats:*")]
    assert len(stats) == 3  # nothing for the unknown code, nothing for Validate


async def test_a_batch_is_counted_item_by_item_and_a_key_reused_with_another_request_is_not_counted(
    issue: Issue, redis: Redis, keyring: KeyRing
) -> None:
    issued = await issue(2)
    store = RedisCodeStore(redis)
    a, b = issued.codes
    batch = [command(a, keyring, key="k-a"), command(b, keyring, key="k-b"), command(a, keyring, key="k-c")]
    decided = await store.decide(batch, ["r-a", "r-b", "r-c"], mode="redeem", now_ms=T0_MS)
    assert [getattr(d, "outcome", None) for d in decided] == [Outcome.REDEEMED] * 2 + [Outcome.ALREADY_REDEEMED]
    conflict = await store.decide([command(a, keyring, key="k-a", device="other")], ["r-d"], mode="redeem",
                                  now_ms=T0_MS)  # fmt: skip
    # IDEMPOTENCY_MISMATCH: a fault, not a decision
    assert isinstance(conflict[0], ItemFailure) and isinstance(conflict[0].error, IdempotencyConflict)
    assert await counters(redis, issued.campaign.id, T0_MS) == {"REDEEMED": 2, "NO_USES_LEFT": 1}


async def test_the_counters_expire_and_their_expiry_is_written_once(
    issue: Issue, redis: Redis, keyring: KeyRing
) -> None:
    issued = await issue(3)
    store = RedisCodeStore(redis)
    key = keys.stats_key(issued.campaign.id, 0, keys.stats_minute(T0_MS))
    await store.redeem_one(command(issued.codes[0], keyring), "r-1", mode="redeem", now_ms=T0_MS)
    assert keys.STATS_TTL_MS - 5_000 < await redis.pttl(key) <= keys.STATS_TTL_MS

    # A later decision in the same minute leaves the expiry alone (no PEXPIRE for the AOF on every attempt) ...
    await redis.pexpire(key, 60_000)
    await store.redeem_one(command(issued.codes[1], keyring), "r-2", mode="redeem", now_ms=T0_MS + 1)
    assert 0 < await redis.pttl(key) <= 60_000
    # ... but one that finds the key without an expiry gives it one: the counters never outlive it.
    await redis.persist(key)
    await store.redeem_one(command(issued.codes[2], keyring), "r-3", mode="redeem", now_ms=T0_MS + 2)
    assert keys.STATS_TTL_MS - 5_000 < await redis.pttl(key) <= keys.STATS_TTL_MS
    assert await counters(redis, issued.campaign.id, T0_MS) == {"REDEEMED": 3}


def test_the_scripts_expiry_is_the_one_keys_py_documents() -> None:
    assert f"local STATS_TTL_MS = {keys.STATS_TTL_MS}" in load_lua("redeem.lua")
    assert keys.stats_key(42, 3, 29_671_200) == "rgw:{c42.3}:stats:29671200"  # the campaign shard's hash tag


# -- The status, end to end -----------------------------------------------------------------------------------


async def drain(redis: Redis, migrated: str, consumer: str) -> None:
    writer = LedgerWriter(Outbox(redis, consumer=consumer), partial(asyncpg.connect, migrated), FAST)
    try:
        for _ in range(50):
            if await writer.run_once() == 0:
                return
        raise AssertionError("the writer kept finding work")
    finally:
        await writer.close()


async def redeem(gateway: RunningGateway, code: str, key: str, **fields: Any) -> tuple[str, bool]:
    reply = await gateway.stub.Redeem(redeem_request(code, key, **fields))
    return reply.reason, reply.replayed


async def test_status_counts_windows_budget_and_outbox_lag_before_and_after_the_writer(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis, clock: ManualClock, migrated: str
) -> None:
    await db.execute("TRUNCATE risk_events")  # the shared db fixture leaves it to the risk tests
    # valid for ten minutes from T0 (a minute boundary): one minute before it, near its end, and just after it
    issued = await issue(4, valid_from_ms=T0_MS, valid_until_ms=T0_MS + 10 * MINUTE_MS)
    cid = issued.campaign.id
    a, b, c, d = issued.codes
    await add_store(db, "store-2", at=(31.20, 121.50))
    await announce(gateway, db, redis)

    clock.value = T0_MS - MINUTE_MS  # minute T0-1
    assert await redeem(gateway, d, "k-early") == ("CODE_NOT_YET_VALID", False)
    clock.value = T0_MS + 9 * MINUTE_MS + 45_000  # minute T0+9
    for code in (a, b, c):
        assert await redeem(gateway, code, "k-1") == ("REDEEMED", False)
    assert await redeem(gateway, a, "k-1") == ("REDEEMED", True)  # a retry: not counted again
    assert await redeem(gateway, a, "k-2") == ("NO_USES_LEFT", False)
    assert await redeem(gateway, d, "k-3", store="store-2") == ("TERMINAL_STORE_MISMATCH", False)  # till-1 is store-1's
    assert await redeem(gateway, codes.generate(codes.Route(cid, 0)), "k-4") == ("CODE_NOT_FOUND", False)
    clock.value = T0_MS + 10 * MINUTE_MS + 10_000  # minute T0+10
    assert await redeem(gateway, d, "k-5") == ("CODE_EXPIRED", False)
    now = T0_MS + 10 * MINUTE_MS + 30_000

    before = await campaign_status(db, redis, cid, now_ms=now)

    # the last 1 min runs from the start of minute T0+9 (90 s ago), the last 5 min from T0+5, the last 60 from T0-50
    one, five = before.rates
    assert (one.minutes, one.since_ms, one.seconds, one.counts.get("REDEEMED")) == (1, T0_MS + 9 * MINUTE_MS, 90, 3)
    assert (five.since_ms, five.seconds, five.counts.get("REDEEMED")) == (T0_MS + 5 * MINUTE_MS, 330, 3)
    assert one.rate("REDEEMED") == pytest.approx(3 / 90) and five.rate("REDEEMED") == pytest.approx(3 / 330)
    last5, last60 = before.declines
    assert {r: last5.counts.get(r, 0) for r in ("NO_USES_LEFT", "CODE_EXPIRED", "CODE_NOT_YET_VALID")} == {
        "NO_USES_LEFT": 1, "CODE_EXPIRED": 1, "CODE_NOT_YET_VALID": 0}  # fmt: skip
    assert dict(last60.counts) == {"REDEEMED": 3, "NO_USES_LEFT": 1, "CODE_EXPIRED": 1, "CODE_NOT_YET_VALID": 1}
    assert last60.since_ms == T0_MS - 50 * MINUTE_MS
    # the risk denial is in the brand's stream, not yet in risk_events; the redemptions are in the outbox
    assert [dict(w.counts) for w in before.risk_denials] == [{}, {}]
    budget = before.budget
    assert (budget.issued_codes, budget.uses_issued, budget.in_ledger, budget.in_outbox) == (4, 4, 0, 3)
    assert (budget.uses_redeemed, budget.percent, budget.approximate) == (3, 75.0, False)
    lag = before.outbox
    assert (lag.shards, lag.entries, lag.pending, lag.unread, lag.dead_letters) == (1, 3, 0, 3, 0)
    assert lag.oldest_age_seconds is not None and 0 <= lag.oldest_age_seconds < 60  # Redis' clock, not the test's
    waiting: Any = await redis.xrange(keys.outbox_key(cid, 0))

    # A writer that read the entries and stopped before acknowledging them: pending, not unread.
    stalled = Outbox(redis, consumer="stalled")
    await stalled.refresh()
    read = await stalled.read(100)
    assert [e.id for e in read if e.stream == keys.outbox_key(cid, 0)] == [entry_id for entry_id, _ in waiting]
    pending = (await campaign_status(db, redis, cid, now_ms=now)).outbox
    assert (pending.entries, pending.pending, pending.unread) == (3, 3, 0)

    await redis.sadd(keys.OUTBOXES, risk_keys.events_key(1))  # as each gateway's upkeep does (every second)
    await drain(redis, migrated, "stalled")  # the same consumer takes its pending entries first
    after = await campaign_status(db, redis, cid, now_ms=now)

    assert (after.budget.in_ledger, after.budget.in_outbox, after.budget.uses_redeemed) == (3, 0, 3)
    assert (after.outbox.entries, after.outbox.pending, after.outbox.oldest_age_seconds) == (0, 0, None)
    assert [dict(w.counts) for w in after.risk_denials] == [{"TERMINAL_STORE_MISMATCH": 1}] * 2
    assert after.declines == before.declines and after.rates == before.rates

    # An entry the ledger already holds but the writer has not yet deleted (it commits, then acknowledges) is
    # still waiting in the outbox but counted once in the budget.
    await redis.xadd(keys.outbox_key(cid, 0), waiting[0][1])
    racing = await campaign_status(db, redis, cid, now_ms=now)
    assert (racing.outbox.entries, racing.budget.in_outbox, racing.budget.uses_redeemed) == (1, 0, 3)

    report = to_json(after)
    assert report["declines"]["60m"]["by_reason"] == {  # type: ignore[index]
        "NO_USES_LEFT": 1, "CODE_EXPIRED": 1, "CODE_NOT_YET_VALID": 1}  # fmt: skip
    text = render(after)
    assert "CODE_NOT_FOUND" in text and "not attributable" in text and "75.00%" in text


def _shape(value: object) -> object:
    """The keys of a JSON object, recursively (values replaced by their type's name)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    return type(value).__name__


async def test_the_command_prints_the_status_as_text_and_json(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis_url: str, migrated: str, clock: ManualClock
) -> None:
    await db.execute("TRUNCATE risk_events")
    clock.value = int(time.time() * 1000)  # the command reads the counters up to the wall clock's minute
    issued = await issue(2, valid_from_ms=clock.value - DAY_MS, valid_until_ms=clock.value + DAY_MS)
    a, _ = issued.codes
    assert await redeem(gateway, a, "k-1") == ("REDEEMED", False)
    assert await redeem(gateway, a, "k-2") == ("NO_USES_LEFT", False)
    env = gateway_environ(redis_url, migrated)

    result = rgw(env, "campaign", "status", str(issued.campaign.id), "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert _shape(report) == {
        "as_of": "str",
        "campaign": {"id": "int", "name": "str", "brand_id": "int", "brand_slug": "str", "brand_name": "str",
                     "valid_from": "str", "valid_until": "str", "state": "str", "uses_per_code": "int",
                     "shards": "int", "status": "str", "budget_count": "NoneType", "budget_value": "NoneType",
                     "currency": "NoneType"},
        "counters": {"issued": "int", "redeemed": "int", "reversed": "int", "budget_count_used": "int",
                     "budget_count_left": "NoneType", "budget_value_used": "int", "budget_value_left": "NoneType"},
        "budget": {"issued_codes": "int", "uses_issued": "int", "uses_redeemed": "int", "percent": "float",
                   "in_ledger": "int", "in_outbox": "int", "dead_lettered": "int", "approximate": "bool"},
        "rate": {"1m": {"since": "str", "seconds": "float", "redemptions": "int", "per_second": "float"},
                 "5m": {"since": "str", "seconds": "float", "redemptions": "int", "per_second": "float"},
                 "total_redemptions": "int"},
        "declines": {"5m": {"since": "str", "seconds": "float", "by_reason": {"NO_USES_LEFT": "int",
                            "CODE_EXPIRED": "int", "CODE_NOT_YET_VALID": "int"}},
                     "60m": {"since": "str", "seconds": "float", "by_reason": {"NO_USES_LEFT": "int",
                             "CODE_EXPIRED": "int", "CODE_NOT_YET_VALID": "int"}},
                     "not_attributable": {"CODE_NOT_FOUND": "str"}},
        "risk_denials": {"5m": {"since": "str", "seconds": "float", "by_reason": {}},
                         "60m": {"since": "str", "seconds": "float", "by_reason": {}}},
        "outbox": {"shards": "int", "entries": "int", "pending": "int", "unread": "int",
                   "oldest_age_seconds": "float", "dead_letters": "int"},
    }  # fmt: skip
    assert report["campaign"]["id"] == issued.campaign.id and report["campaign"]["state"] == "open"
    assert (report["budget"]["issued_codes"], report["budget"]["uses_redeemed"], report["budget"]["percent"]) == (
        2, 1, 50.0)  # fmt: skip
    one = report["rate"]["1m"]
    assert one["redemptions"] == 1 and 60 <= one["seconds"] < 180
    assert one["per_second"] == pytest.approx(1 / one["seconds"])
    assert report["declines"]["5m"]["by_reason"]["NO_USES_LEFT"] == 1
    assert (report["outbox"]["entries"], report["outbox"]["unread"]) == (1, 1)

    text = rgw(env, "campaign", "status", str(issued.campaign.id))
    assert text.returncode == 0, text.stderr
    assert "uses redeemed  1 = 50.00%" in text.stdout and "CODE_NOT_FOUND" in text.stdout
    assert "status         active" in text.stdout and "budget count   1 used; no limit" in text.stdout


def test_an_unknown_campaign_is_a_clear_message_and_exit_1(redis_url: str, migrated: str) -> None:
    result = rgw(gateway_environ(redis_url, migrated), "campaign", "status", "987654")
    assert result.returncode == 1
    assert result.stderr.strip() == "rgw: no campaign 987654" and "Traceback" not in result.stderr
    assert result.stdout == ""


async def test_the_status_shows_a_pause_and_the_budget_from_the_live_counters(
    db: asyncpg.Connection, redis: Redis
) -> None:
    start = datetime.fromtimestamp(T0_MS / 1000, UTC)
    made = await admin.create_campaign(
        db, redis, actor="tests", brand_id=1, key_id="k2", fields={
            "name": "budgeted", "valid_from": start, "valid_until": start.replace(month=start.month + 1),
            "shards": 2, "budget_count": 10, "budget_value": 1_000, "face_value": 100, "currency": "CNY",
        },
    )  # fmt: skip
    cid = made.value.id
    await admin.set_status(db, redis, actor="tests", brand_id=1, campaign_id=cid, status="paused")
    await redis.hset(keys.budget_key(cid, 0), mapping={"un": 3, "uv": 300, "red": 4, "rev": 1, "iss": 20})
    await redis.hset(keys.budget_key(cid, 1), mapping={"un": 1, "uv": 100, "red": 1, "iss": 20})

    status = await campaign_status(db, redis, cid, now_ms=T0_MS)
    report: Any = to_json(status)
    assert report["campaign"]["status"] == "paused"
    assert (report["campaign"]["budget_count"], report["campaign"]["currency"]) == (10, "CNY")
    assert report["counters"] == {
        "issued": 40, "redeemed": 5, "reversed": 1, "budget_count_used": 4, "budget_count_left": 6,
        "budget_value_used": 400, "budget_value_left": 600,
    }  # fmt: skip
    text = render(status)
    assert "status         paused" in text and "budget count   4 used; 6 left of 10" in text
    assert "budget value   400 used; 600 left of 1,000 (CNY)" in text
