"""Each campaign rule of lua/redeem.lua at its edges, against a real Redis: paused, validity after issue, allowed
stores and store groups, redemption hours in the campaign's time zone (across midnight, across a DST change),
count and face-value budgets - and the order the rules answer in."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import pytest
from redis.asyncio import Redis

from gateway import keys
from gateway.coderefs import KeyRing
from gateway.domain import Caller, Outcome, RedeemInput, RedeemResult
from gateway.redis_store import RedisCodeStore
from gateway.validation import check_redeem
from tests.conftest import T0_MS
from tests.integration.conftest import DAY_MS, Issue, set_rules

pytestmark = pytest.mark.asyncio(loop_scope="session")

CALLER = Caller(client_id="cl_a", brand_id=1, role="pos")
HOUR_MS = 3_600_000
YEAR_MS = 365 * DAY_MS
A_YEAR_AROUND_T0 = {"valid_from_ms": T0_MS - YEAR_MS, "valid_until_ms": T0_MS + YEAR_MS}


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).astimezone(UTC).timestamp() * 1000)


class Till:
    """Redeems and validates through the store (the script itself), at a given instant and store."""

    def __init__(self, redis: Redis, keyring: KeyRing) -> None:
        self.store = RedisCodeStore(redis)
        self.keyring = keyring
        self.calls = 0

    async def redeem(self, code: str, now: int, *, store: str = "s1", mode: str = "redeem") -> RedeemResult:
        self.calls += 1
        command = check_redeem(RedeemInput(code, f"k{self.calls}", store, "t1", "", None), self.keyring, CALLER)
        return await self.store.redeem_one(command, f"rid-{self.calls}", mode=mode, now_ms=now)  # type: ignore[arg-type]


def said(result: RedeemResult) -> tuple[Outcome, str]:
    return result.outcome, result.rule_reason


async def test_a_paused_campaign_answers_paused_and_redeems_again_once_resumed(
    issue: Issue, db: asyncpg.Connection, redis: Redis, keyring: KeyRing
) -> None:
    issued = await issue(2)
    till = Till(redis, keyring)
    await set_rules(db, redis, issued.campaign.id, {"status": "paused"})
    for mode in ("redeem", "validate"):
        assert said(await till.redeem(issued.codes[0], T0_MS, mode=mode)) == (
            Outcome.CAMPAIGN_PAUSED,
            "CAMPAIGN_PAUSED",
        )
    await set_rules(db, redis, issued.campaign.id, {"status": "active"})
    assert (await till.redeem(issued.codes[0], T0_MS)).outcome is Outcome.REDEEMED
    counted = await redis.hgetall(keys.stats_key(issued.campaign.id, 0, keys.stats_minute(T0_MS)))
    assert counted == {"CAMPAIGN_PAUSED": "1", "REDEEMED": "1"}  # Validate counts nothing


async def test_validity_days_after_issue_end_exactly_then(
    issue: Issue, db: asyncpg.Connection, redis: Redis, keyring: KeyRing
) -> None:
    issued = await issue(1, valid_from_ms=0, valid_until_ms=T0_MS + 10 * YEAR_MS, rules={"valid_days": 3})
    issued_at = await db.fetchval("SELECT issued_at FROM issued_codes WHERE campaign_id = $1", issued.campaign.id)
    end = int(issued_at.timestamp()) * 1000 + 3 * DAY_MS  # the bucket keeps the issue time in seconds
    till = Till(redis, keyring)
    assert (await till.redeem(issued.codes[0], end, mode="validate")).outcome is Outcome.EXPIRED
    assert (await till.redeem(issued.codes[0], end - 1, mode="validate")).outcome is Outcome.REDEEMABLE
    assert (await till.redeem(issued.codes[0], end - 1)).outcome is Outcome.REDEEMED


async def test_only_allowed_stores_and_the_stores_of_allowed_groups_redeem(
    issue: Issue, db: asyncpg.Connection, redis: Redis, keyring: KeyRing
) -> None:
    await db.execute(
        "INSERT INTO store_groups (brand_id, name, stores) VALUES (1, 'east', '{e1,e2}') ON CONFLICT DO NOTHING"
    )
    issued = await issue(4, rules={"allowed_stores": ["s1"], "allowed_store_groups": ["east"]})
    till = Till(redis, keyring)
    assert said(await till.redeem(issued.codes[0], T0_MS, store="s2")) == (Outcome.NOT_ALLOWED, "STORE_NOT_ALLOWED")
    assert said(await till.redeem(issued.codes[0], T0_MS, store="-")) == (Outcome.NOT_ALLOWED, "STORE_NOT_ALLOWED")
    for code, store in zip(issued.codes[1:], ("s1", "e1", "e2"), strict=True):
        assert (await till.redeem(code, T0_MS, store=store)).outcome is Outcome.REDEEMED
    # lifting the restriction applies to the next redemption
    await set_rules(db, redis, issued.campaign.id, {"allowed_stores": [], "allowed_store_groups": []})
    assert (await till.redeem(issued.codes[0], T0_MS, store="s2")).outcome is Outcome.REDEEMED


async def test_hours_in_the_campaigns_zone_start_inclusive_end_exclusive(
    issue: Issue, redis: Redis, keyring: KeyRing
) -> None:
    # T0 is Monday 2026-06-01 08:00 in Shanghai (UTC+8, no DST)
    hours = [{"days": [1], "start": "08:00", "end": "09:00"}]
    issued = await issue(1, rules={"time_zone": "Asia/Shanghai", "redemption_hours": hours}, **A_YEAR_AROUND_T0)
    till = Till(redis, keyring)
    code = issued.codes[0]
    for now, expected in ((T0_MS - 1, False), (T0_MS, True), (T0_MS + HOUR_MS - 1, True), (T0_MS + HOUR_MS, False),
                          (T0_MS + 7 * DAY_MS, True)):  # fmt: skip
        result = await till.redeem(code, now, mode="validate")
        assert (result.outcome is Outcome.REDEEMABLE) is expected, now
        if not expected:
            assert said(result) == (Outcome.NOT_ALLOWED, "OUTSIDE_REDEMPTION_HOURS")


async def test_hours_across_midnight_belong_to_the_day_they_start(issue: Issue, redis: Redis, keyring: KeyRing) -> None:
    hours = [{"days": [7], "start": "22:00", "end": "02:00"}]  # Sunday night into Monday
    issued = await issue(1, rules={"time_zone": "Europe/London", "redemption_hours": hours}, **A_YEAR_AROUND_T0)
    till = Till(redis, keyring)
    cases = {
        "2026-05-31T22:00:00+01:00": True,  # Sunday 22:00 BST
        "2026-05-31T21:59:59+01:00": False,
        "2026-06-01T01:59:00+01:00": True,  # Monday 01:59, the window began on Sunday
        "2026-06-01T02:00:00+01:00": False,
        "2026-06-07T01:00:00+01:00": False,  # Sunday 01:00: the window that began on Saturday is not allowed
    }
    for moment, expected in cases.items():
        result = await till.redeem(issued.codes[0], ms(moment), mode="validate")
        assert (result.outcome is Outcome.REDEEMABLE) is expected, moment


async def test_hours_follow_the_dst_change(issue: Issue, redis: Redis, keyring: KeyRing) -> None:
    hours = [{"days": [7], "start": "01:00", "end": "02:00"}]
    issued = await issue(1, rules={"time_zone": "Europe/London", "redemption_hours": hours}, **A_YEAR_AROUND_T0)
    till = Till(redis, keyring)
    cases = {
        # 2026-10-25: clocks go back at 02:00 BST, so 01:00-02:00 happens twice - both are inside
        "2026-10-25T00:30:00+00:00": True,  # 01:30 BST
        "2026-10-25T01:30:00+00:00": True,  # 01:30 GMT
        "2026-10-25T02:00:00+00:00": False,  # 02:00 GMT
        "2026-10-24T23:59:59+00:00": False,  # 00:59:59 BST
        # 2026-03-29: clocks go forward at 01:00 GMT to 02:00 BST - the hour does not exist that day
        "2026-03-29T00:59:59+00:00": False,  # 00:59:59 GMT
        "2026-03-29T01:00:00+00:00": False,  # 02:00 BST
        # a week later the window is there in summer time: 01:30 BST = 00:30 UTC
        "2026-04-05T00:30:00+00:00": True,
    }
    for moment, expected in cases.items():
        result = await till.redeem(issued.codes[0], ms(moment), mode="validate")
        assert (result.outcome is Outcome.REDEEMABLE) is expected, moment


async def test_a_count_budget_grants_exactly_its_size(issue: Issue, redis: Redis, keyring: KeyRing) -> None:
    issued = await issue(5, rules={"budget_count": 3})
    till = Till(redis, keyring)
    answers = [said(await till.redeem(code, T0_MS)) for code in issued.codes]
    assert answers == [(Outcome.REDEEMED, "")] * 3 + [(Outcome.BUDGET_EXHAUSTED, "BUDGET_COUNT_EXHAUSTED")] * 2
    assert said(await till.redeem(issued.codes[4], T0_MS, mode="validate"))[0] is Outcome.BUDGET_EXHAUSTED
    budget = await redis.hgetall(keys.budget_key(issued.campaign.id, 0))
    assert (budget["n"], budget["un"]) == ("3", "3")


async def test_a_face_value_budget_declines_the_code_that_would_exceed_it(
    issue: Issue, redis: Redis, keyring: KeyRing
) -> None:
    issued = await issue(3, rules={"face_value": 500, "currency": "CNY", "budget_value": 1200})
    till = Till(redis, keyring)
    answers = [said(await till.redeem(code, T0_MS)) for code in issued.codes]
    assert answers == [(Outcome.REDEEMED, "")] * 2 + [(Outcome.BUDGET_EXHAUSTED, "BUDGET_VALUE_EXHAUSTED")]
    assert (await redis.hget(keys.budget_key(issued.campaign.id, 0), "uv")) == "1000"


async def test_a_decline_for_the_code_itself_comes_before_the_budget(
    issue: Issue, redis: Redis, keyring: KeyRing
) -> None:
    issued = await issue(2, rules={"budget_count": 1})
    till = Till(redis, keyring)
    assert (await till.redeem(issued.codes[0], T0_MS)).outcome is Outcome.REDEEMED
    assert (await till.redeem(issued.codes[0], T0_MS)).outcome is Outcome.ALREADY_REDEEMED
    assert (await till.redeem(issued.codes[1], T0_MS + 2 * DAY_MS)).outcome is Outcome.EXPIRED
    assert said(await till.redeem(issued.codes[1], T0_MS)) == (Outcome.BUDGET_EXHAUSTED, "BUDGET_COUNT_EXHAUSTED")


async def test_budget_totals_above_1e14_are_written_as_integers(issue: Issue, redis: Redis, keyring: KeyRing) -> None:
    # Redis' Lua writes a number as "%.14g": 1.01e14 would become "1.01e+14" unless the script formats it
    issued = await issue(101, rules={"face_value": 10**12, "currency": "CNY", "budget_value": 10**15})
    till = Till(redis, keyring)
    for code in issued.codes:
        assert (await till.redeem(code, T0_MS)).outcome is Outcome.REDEEMED
    budget = await redis.hgetall(keys.budget_key(issued.campaign.id, 0))
    assert (budget["un"], budget["uv"]) == ("101", "101000000000000")
