"""Budget shares between a campaign's shards against a real Redis (gateway/campaigns/budget.py and
lua/budget_move.lua): a rebalance evens out the unused shares; shares plus transfers in flight always equal the
budget while redemptions race it, so what is granted never exceeds it; a transfer interrupted between its steps is
completed by the next rebalance with nothing lost or doubled; a budget raised, lowered, added or removed live."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis

from gateway import keys
from gateway.campaigns import budget
from gateway.campaigns.model import Campaign
from gateway.validation import InvalidRequest

CID = 77
K = 4
# A test double of the redeem script's budget step: grant one use (of face value ARGV[1]) only within the shard's
# shares, atomically - what the guard is, without codes.
CONSUME = """
local f = redis.call('HMGET', KEYS[1], 'n', 'un', 'v', 'uv')
local fv = tonumber(ARGV[1])
if f[1] and tonumber(f[2] or '0') >= tonumber(f[1]) then return 0 end
if f[3] and tonumber(f[4] or '0') + fv > tonumber(f[3]) then return 0 end
redis.call('HINCRBY', KEYS[1], 'un', 1)
if fv > 0 then redis.call('HINCRBY', KEYS[1], 'uv', fv) end
return 1
"""


def campaign(*, count: int | None = 400, value: int | None = None, shards: int = K) -> Campaign:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    return Campaign(
        CID, "budget", start, start.replace(year=2027), 1, shards, "k2", 1, budget_count=count, budget_value=value,
        currency="CNY" if value is not None else None,
    )  # fmt: skip


async def seed(redis: Redis, shares: list[dict[str, int]]) -> None:
    for shard, fields in enumerate(shares):
        await redis.hset(keys.budget_key(CID, shard), mapping=fields)  # type: ignore[arg-type]


async def hashes(redis: Redis, shards: int = K) -> list[dict[str, str]]:
    """Every shard's budget hash, read atomically (MULTI on the one test Redis)."""
    async with redis.pipeline(transaction=True) as pipe:
        for shard in range(shards):
            pipe.hgetall(keys.budget_key(CID, shard))
        found: list[dict[str, str]] = await pipe.execute()
    return found


def field(h: dict[str, str], name: str) -> int:
    return int(h.get(name, 0))


def outstanding(found: list[dict[str, str]], index: int) -> int:
    """Shares plus transfers taken and not yet received: must equal the budget at every instant."""
    total = sum(field(h, ("n", "v")[index]) for h in found)
    for h in found:
        for name, record in h.items():
            if name.startswith("o:"):
                amounts = record.split("|")
                to = int(amounts[2])
                if to >= 0 and f"i:{name[2:]}" not in found[to]:
                    total += int(amounts[index])
    return total


def unused(found: list[dict[str, str]], share: str = "n", used: str = "un") -> list[int]:
    return [field(h, share) - field(h, used) for h in found]


async def test_a_rebalance_evens_out_the_unused_shares_of_count_and_value(redis: Redis) -> None:
    await seed(redis, [
        {"n": 100, "un": 90, "v": 2500, "uv": 2000}, {"n": 100, "un": 10, "v": 2500, "uv": 0},
        {"n": 100, "un": 0, "v": 2500, "uv": 100}, {"n": 100, "un": 45, "v": 2500, "uv": 2499},
    ])  # fmt: skip
    report = await budget.rebalance(redis, campaign(value=10_000))

    found = await hashes(redis)
    assert sum(field(h, "n") for h in found) == 400 and sum(field(h, "v") for h in found) == 10_000
    assert sorted(unused(found)) == [63, 64, 64, 64]  # 255 unused, evenly
    assert max(unused(found, "v", "uv")) - min(unused(found, "v", "uv")) <= 1
    assert [field(h, "un") for h in found] == [90, 10, 0, 45]  # what was granted is untouched
    assert report.completed == 0 and report.steps and not any(report.over_granted.values())
    assert not any(name.startswith("o:") for h in found for name in h)

    again = await budget.rebalance(redis, campaign(value=10_000))
    assert again.steps == () and await hashes(redis) == found  # level already: nothing moves


async def test_a_take_never_takes_more_than_the_unused_share(redis: Redis) -> None:
    await seed(redis, [{"n": 10, "un": 8, "v": 100, "uv": 100}])
    moves = budget.Moves(redis, CID)
    assert await moves.take(0, "t1", 5, 50, 1) == (2, 0)
    assert await moves.take(0, "t1", 5, 50, 1) == (2, 0)  # the same id again: its record, nothing more
    assert await moves.take(0, "t2", 5, 50, 1) == (0, 0)
    h = (await hashes(redis, 1))[0]
    assert (field(h, "n"), h["o:t1"], "o:t2" in h) == (8, "2|0|1", False)
    assert await moves.give(1, "t1", 2, 0) and not await moves.give(1, "t1", 2, 0)
    assert field((await hashes(redis, 2))[1], "n") == 2


async def test_a_rebalance_racing_redemptions_never_lets_the_grants_exceed_the_budget(redis: Redis) -> None:
    c = campaign(count=400)
    await seed(redis, [{"n": 100}] * K)
    consume = redis.register_script(CONSUME)
    granted = samples = moved = 0
    stop = asyncio.Event()

    async def consumer(seed_: int) -> None:
        nonlocal granted
        rng = random.Random(seed_)
        for _ in range(60):
            shard = 0 if rng.random() < 0.7 else rng.randrange(K)  # shard 0 runs out first
            got = int(await consume(keys=[keys.budget_key(CID, shard)], args=[0]))
            granted += got  # after the await: `granted += await ...` would read `granted` before it
            await asyncio.sleep(0.002)

    async def rebalancer() -> None:
        nonlocal moved
        while not stop.is_set():
            moved += len((await budget.rebalance(redis, c)).steps)

    async def monitor() -> None:
        nonlocal samples
        while not stop.is_set():
            found = await hashes(redis)
            assert outstanding(found, 0) == 400
            assert sum(field(h, "un") for h in found) <= 400
            assert all(field(h, "un") <= field(h, "n") for h in found)  # a share is only lowered by its unused part
            samples += 1
            await asyncio.sleep(0)

    background = [asyncio.create_task(rebalancer()), asyncio.create_task(monitor())]
    await asyncio.gather(*(consumer(i) for i in range(40)))  # 2,400 attempts on a budget of 400
    stop.set()
    await asyncio.gather(*background)

    await budget.rebalance(redis, c)
    for shard in range(K):  # drain what is left: every unit of the budget can still be granted, once
        while await consume(keys=[keys.budget_key(CID, shard)], args=[0]):
            granted += 1
    found = await hashes(redis)
    assert granted == sum(field(h, "un") for h in found) == 400
    assert outstanding(found, 0) == 400 and samples > 10 and moved >= 3  # it did race


async def test_a_transfer_interrupted_after_its_take_is_completed_by_the_next_rebalance(redis: Redis) -> None:
    await seed(redis, [{"n": 100, "un": 0}, {"n": 100, "un": 100}, {"n": 100, "un": 50}, {"n": 100, "un": 50}])
    moves = budget.Moves(redis, CID)
    assert await moves.take(0, "crashed", 30, 0, 1) == (30, 0)  # ... and the process died here
    found = await hashes(redis)
    assert field(found[0], "n") == 70 and field(found[1], "n") == 100 and outstanding(found, 0) == 400

    report = await budget.rebalance(redis, campaign())
    found = await hashes(redis)
    assert report.completed == 1
    assert "o:crashed" not in found[0] and found[1].get("i:crashed") == "1"
    assert sum(field(h, "n") for h in found) == 400  # nothing lost, nothing doubled
    assert sorted(unused(found)) == [50] * 4


async def test_a_transfer_interrupted_after_its_give_is_not_given_twice(redis: Redis) -> None:
    await seed(redis, [{"n": 100}] * K)
    moves = budget.Moves(redis, CID)
    await moves.take(2, "half-done", 40, 0, 3)
    await moves.give(3, "half-done", 40, 0)  # ... and the process died before `done`
    assert outstanding(await hashes(redis), 0) == 400

    report = await budget.rebalance(redis, campaign())
    found = await hashes(redis)
    assert report.completed == 1 and not any(name.startswith("o:") for h in found for name in h)
    assert [field(h, "n") for h in found] == [100] * 4


async def test_a_rebalance_brings_the_shares_back_to_the_budget(redis: Redis) -> None:
    # a raise committed in Postgres whose gives never happened, and a lowering whose take was never settled
    await seed(redis, [{"n": 50, "un": 10}, {"n": 50, "un": 10}, {"n": 50}, {"n": 50}])
    moves = budget.Moves(redis, CID)
    await moves.take(0, "lowering", 20, 0, budget.NOWHERE)
    report = await budget.rebalance(redis, campaign(count=400))
    found = await hashes(redis)
    assert report.completed == 1 and sum(field(h, "n") for h in found) == 400
    assert sorted(unused(found)) == [95] * 4
    assert any(step.donor == budget.NOWHERE for step in report.steps)


async def test_a_budget_lowered_is_taken_from_the_unused_shares_first(redis: Redis) -> None:
    await seed(redis, [{"n": 100, "un": 80}, {"n": 100, "un": 20}, {"n": 100}, {"n": 100, "un": 100}])
    before, after = campaign(count=400), campaign(count=250)
    committed: list[str] = []

    async def commit() -> str:
        committed.append("postgres")
        return "done"

    assert await budget.change_budget(redis, before, after, budget.COUNT, commit) == "done"
    found = await hashes(redis)
    assert committed == ["postgres"] and sum(field(h, "n") for h in found) == 250
    assert sorted(unused(found)) == [0, 16, 17, 17]  # the fullest gave first: 50 unused left, level
    assert not any(name.startswith("o:") for h in found for name in h)


async def test_a_budget_below_what_was_granted_is_refused_and_nothing_changes(redis: Redis) -> None:
    await seed(redis, [{"n": 100, "un": 80}, {"n": 100, "un": 20}, {"n": 100}, {"n": 100, "un": 100}])
    before = await hashes(redis)

    async def commit() -> None:
        raise AssertionError("must not commit")

    with pytest.raises(InvalidRequest) as refused:
        await budget.change_budget(redis, campaign(count=400), campaign(count=150), budget.COUNT, commit)
    (violation,) = refused.value.violations
    assert violation.field == "budget_count" and "150" in violation.description and "200" in violation.description
    assert await hashes(redis) == before


async def test_a_lowering_whose_commit_fails_is_given_back(redis: Redis) -> None:
    await seed(redis, [{"n": 100, "un": 10}] * K)

    async def commit() -> None:
        raise ConnectionError("postgres went away")

    with pytest.raises(ConnectionError):
        await budget.change_budget(redis, campaign(count=400), campaign(count=300), budget.COUNT, commit)
    found = await hashes(redis)
    assert [field(h, "n") for h in found] == [100] * 4
    assert not any(name.startswith("o:") for h in found for name in h)


async def test_a_budget_raised_added_and_removed_live(redis: Redis) -> None:
    await seed(redis, [{"n": 100, "un": 100}, {"n": 100}, {"n": 100}, {"n": 100}])

    async def commit() -> None:
        return None

    await budget.change_budget(redis, campaign(count=400), campaign(count=480), budget.COUNT, commit)
    assert [field(h, "n") for h in await hashes(redis)] == [120, 120, 120, 120]

    await budget.change_budget(redis, campaign(count=480), campaign(count=None), budget.COUNT, commit)
    assert not any("n" in h for h in await hashes(redis))

    # a limit added to a campaign that had none: every shard first capped at what it granted, then given the rest
    await redis.hset(keys.budget_key(CID, 2), "un", 30)
    await budget.change_budget(redis, campaign(count=None), campaign(count=200), budget.COUNT, commit)
    found = await hashes(redis)
    assert sum(field(h, "n") for h in found) == 200 and all(field(h, "n") >= field(h, "un") for h in found)
    with pytest.raises(InvalidRequest):  # 130 granted: a limit of 100 cannot be added
        await budget.change_budget(redis, campaign(count=None), campaign(count=100), budget.COUNT, commit)


async def test_a_value_budget_added_to_a_live_campaign_is_never_exceeded(redis: Redis) -> None:
    c = campaign(count=None, value=None)
    await seed(redis, [{"uv": 300}, {"uv": 0}, {"uv": 100}, {"uv": 0}])

    async def commit() -> None:
        return None

    await budget.change_budget(redis, c, campaign(count=None, value=1000), budget.VALUE, commit)
    consume = redis.register_script(CONSUME)
    for shard in range(K):
        while await consume(keys=[keys.budget_key(CID, shard)], args=[7]):
            pass
    found = await hashes(redis)
    assert sum(field(h, "v") for h in found) == 1000
    assert 1000 - 4 * 6 <= sum(field(h, "uv") for h in found) <= 1000
