"""The over-issuance guard under concurrency, through the real gateway: a budget of 100 and 1,000 concurrent
redemptions of distinct codes grant exactly 100 - on one shard, on four (each with its share), on four while a
rebalance moves unused budget between them, and for a face-value budget. Redis' counters and the ledger agree."""

from __future__ import annotations

import asyncio
from collections import Counter
from functools import partial

import asyncpg
import pytest
from redis.asyncio import Redis

from gateway import keys
from gateway.campaigns import budget
from gateway.campaigns.model import get_campaign
from gateway.ledger.outbox import Outbox
from gateway.ledger.writer import LedgerWriter, WriterConfig
from tests.integration.conftest import Issue, RunningGateway
from tests.integration.grpc_helpers import redeem_request

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.single_and_cluster]

FAST = WriterConfig(batch_wait_s=0.0, poll_s=0.0, claim_idle_ms=60_000)
CODES = 1000


async def drain(redis: Redis, database_url: str) -> None:
    writer = LedgerWriter(Outbox(redis, consumer="budget-test"), partial(asyncpg.connect, database_url), FAST)
    try:
        while await writer.run_once():
            pass
    finally:
        await writer.close()


RACES = iter(range(1_000_000))


async def race(gateway: RunningGateway, codes: list[str]) -> Counter[str]:
    """Every code redeemed once, all at once (new idempotency keys: no answer is a replay); answers by reason."""
    run = next(RACES)
    answers = await asyncio.gather(*(gateway.stub.Redeem(redeem_request(c, f"b{run}-{n}"))
                                     for n, c in enumerate(codes)))  # fmt: skip
    assert not any(answer.replayed for answer in answers)
    return Counter(answer.reason for answer in answers)


async def granted(redis: Redis, campaign_id: int, shards: int) -> tuple[int, int, int]:
    """Sum over shards of (shares, granted count, granted value)."""
    totals = [0, 0, 0]
    for shard in range(shards):
        fields = await redis.hgetall(keys.budget_key(campaign_id, shard))
        for i, name in enumerate(("n", "un", "uv")):
            totals[i] += int(fields.get(name, 0))
    return totals[0], totals[1], totals[2]


@pytest.mark.parametrize("shards", [1, 4])
async def test_a_count_budget_of_100_grants_exactly_100_of_1000_concurrent_redemptions(
    gateway: RunningGateway, issue: Issue, redis: Redis, migrated: str, db: asyncpg.Connection, shards: int
) -> None:
    issued = await issue(CODES, shards=shards, rules={"budget_count": 100})
    counts = await race(gateway, issued.codes)
    # with 4 shards each grants exactly its share (25 of ~250 codes), none more
    assert counts == {"REDEEMED": 100, "BUDGET_COUNT_EXHAUSTED": CODES - 100}
    assert await granted(redis, issued.campaign.id, shards) == (100, 100, 0)
    await drain(redis, migrated)
    assert await db.fetchval("SELECT count(*) FROM redemptions WHERE campaign_id = $1", issued.campaign.id) == 100


async def test_a_rebalance_during_the_race_never_lets_the_budget_be_exceeded(
    gateway: RunningGateway, issue: Issue, redis: Redis, migrated: str, db: asyncpg.Connection
) -> None:
    issued = await issue(CODES, shards=4, rules={"budget_count": 100})
    campaign = await get_campaign(db, issued.campaign.id)
    # a quarter of the codes on shard 0 only: its share runs out first, and rebalances keep moving the others'
    on_zero = [c for c in issued.codes if keys.shard_tag(campaign.id, 0) in _tag(c)]
    stop = asyncio.Event()

    async def rebalancing() -> int:
        runs = 0
        while not stop.is_set():
            await budget.rebalance(redis, campaign)
            runs += 1
            await asyncio.sleep(0)
        return runs

    mover = asyncio.create_task(rebalancing())
    try:
        first = await race(gateway, on_zero)
        rest = await race(gateway, [c for c in issued.codes if c not in set(on_zero)])
    finally:
        stop.set()
        runs = await mover
    assert runs > 1
    assert first["REDEEMED"] + rest["REDEEMED"] <= 100
    await budget.rebalance(redis, campaign)  # whatever is left unused is spread again; nothing is lost
    shares, used, _ = await granted(redis, campaign.id, 4)
    assert shares == 100 and used == first["REDEEMED"] + rest["REDEEMED"]
    # with the rest of the budget moved to where codes are left, every remaining code finds it
    leftover = await race(gateway, issued.codes)
    assert used + leftover["REDEEMED"] == 100  # ~750 codes were left unredeemed, spread over every shard
    await drain(redis, migrated)
    assert await db.fetchval("SELECT count(*) FROM redemptions WHERE campaign_id = $1", campaign.id) == 100


async def test_a_face_value_budget_is_never_exceeded(
    gateway: RunningGateway, issue: Issue, redis: Redis, migrated: str
) -> None:
    issued = await issue(CODES, rules={"face_value": 700, "currency": "CNY", "budget_value": 70_000})
    counts = await race(gateway, issued.codes)
    assert counts == {"REDEEMED": 100, "BUDGET_VALUE_EXHAUSTED": CODES - 100}
    assert await granted(redis, issued.campaign.id, 1) == (0, 100, 70_000)


def _tag(code: str) -> str:
    from gateway import codes

    route = codes.parse(code)
    return keys.shard_tag(route.campaign_id, route.shard)
