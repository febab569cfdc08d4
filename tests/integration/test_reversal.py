"""Reverse through the real gateway: a use and its budget given back exactly once, never a reused use number, the
window, tenant isolation, bad input - and the races: concurrent reversals of one redemption, and reversals racing
redemptions of the same multi-use code, ending with exact counts in Redis and in the ledger."""

from __future__ import annotations

import asyncio
import uuid
from functools import partial

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from gateway import keys
from gateway.clock import ManualClock
from gateway.ids import uuid7
from gateway.ledger.outbox import Outbox
from gateway.ledger.writer import LedgerWriter, WriterConfig
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from tests.integration.conftest import Issue, RunningGateway
from tests.integration.grpc_helpers import field_violations, redeem_request

pytestmark = pytest.mark.asyncio(loop_scope="session")

FAST = WriterConfig(batch_wait_s=0.0, poll_s=0.0, claim_idle_ms=60_000)


async def drain(redis: Redis, database_url: str) -> None:
    """Everything in the outboxes into the ledger (the Reverse RPC finds redemptions there)."""
    writer = LedgerWriter(Outbox(redis, consumer="reversal-test"), partial(asyncpg.connect, database_url), FAST)
    try:
        while await writer.run_once():
            pass
    finally:
        await writer.close()


def reverse_request(rid: str, key: str, reason: str = "REFUND") -> pb.ReverseRequest:
    return pb.ReverseRequest(
        redemption_id=rid, reason=reason, idempotency_key=key, store_id="store-1", terminal_id="till-1"
    )


async def redeemed(gateway: RunningGateway, code: str, key: str) -> pb.RedeemResponse:
    response: pb.RedeemResponse = await gateway.stub.Redeem(redeem_request(code, key))
    assert response.outcome == pb.OUTCOME_REDEEMED
    return response


async def test_a_reversal_gives_the_use_and_the_budget_back_once_and_never_reuses_the_use_number(
    gateway: RunningGateway, issue: Issue, redis: Redis, migrated: str, db: asyncpg.Connection
) -> None:
    issued = await issue(1, uses_per_code=2, rules={"budget_count": 10, "face_value": 300, "currency": "CNY"})
    code, cid = issued.codes[0], issued.campaign.id
    first = await redeemed(gateway, code, "r1")
    await drain(redis, migrated)

    reversal = await gateway.stub.Reverse(reverse_request(first.redemption_id, "x1"))
    assert (reversal.outcome, reversal.reason, reversal.uses_left, reversal.use_number, reversal.replayed) == (
        pb.REVERSAL_OUTCOME_REVERSED, "REVERSED", 2, 1, False)  # fmt: skip
    assert reversal.campaign_id == cid and uuid.UUID(reversal.reversal_id).version == 7
    budget = await redis.hgetall(keys.budget_key(cid, 0))
    assert (budget["un"], budget["uv"], budget["rev"]) == ("0", "0", "1")

    retry = await gateway.stub.Reverse(reverse_request(first.redemption_id, "x1"))
    assert (retry.outcome, retry.replayed, retry.reversal_id) == (pb.REVERSAL_OUTCOME_REVERSED, True,
                                                                  reversal.reversal_id)  # fmt: skip
    again = await gateway.stub.Reverse(reverse_request(first.redemption_id, "x2"))
    assert (again.outcome, again.reason, again.reversal_id) == (
        pb.REVERSAL_OUTCOME_ALREADY_REVERSED, "ALREADY_REVERSED", reversal.reversal_id)  # fmt: skip

    second = await redeemed(gateway, code, "r2")
    third = await redeemed(gateway, code, "r3")
    assert (second.use_number, third.use_number, third.uses_left) == (2, 3, 0)  # use 1 is never granted again
    await drain(redis, migrated)
    rows = await db.fetch("SELECT redemption_id, use_number, face_value, reason FROM reversals WHERE campaign_id = $1",
                          cid)  # fmt: skip
    assert [(str(r["redemption_id"]), r["use_number"], r["face_value"], r["reason"]) for r in rows] == [
        (first.redemption_id, 1, 300, "REFUND")]  # fmt: skip


async def test_the_reversal_window_and_campaigns_without_reversals(
    gateway: RunningGateway, issue: Issue, redis: Redis, migrated: str, clock: ManualClock
) -> None:
    windowed = await issue(1, rules={"reversal_window_seconds": 60})
    closed = await issue(1, rules={"reversal_window_seconds": 0})
    late = await redeemed(gateway, windowed.codes[0], "w1")
    never = await redeemed(gateway, closed.codes[0], "w2")
    await drain(redis, migrated)
    answer = await gateway.stub.Reverse(reverse_request(never.redemption_id, "n1"))
    assert (answer.outcome, answer.reason) == (pb.REVERSAL_OUTCOME_WINDOW_CLOSED, "REVERSALS_NOT_ALLOWED")
    clock.advance(60_001)
    answer = await gateway.stub.Reverse(reverse_request(late.redemption_id, "n2"))
    assert (answer.outcome, answer.reason) == (pb.REVERSAL_OUTCOME_WINDOW_CLOSED, "REVERSAL_WINDOW_CLOSED")
    assert (await gateway.stub.Redeem(redeem_request(windowed.codes[0], "w3"))).outcome == pb.OUTCOME_ALREADY_REDEEMED


async def test_another_brands_redemption_is_answered_as_one_that_does_not_exist(
    gateway: RunningGateway, issue: Issue, redis: Redis, migrated: str, clock: ManualClock
) -> None:
    issued = await issue(1)
    ours = await redeemed(gateway, issued.codes[0], "b1")
    await drain(redis, migrated)
    invented = uuid7(clock.now_ms())
    async with gateway.channel_as("other_internal") as channel:
        theirs = pb_grpc.RedemptionServiceStub(channel)
        for rid in (ours.redemption_id, invented):  # recent: it may not be in the ledger yet - retry
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await theirs.Reverse(reverse_request(rid, "b2"))
            assert failure.value.code() is grpc.StatusCode.UNAVAILABLE
        clock.advance(5 * 60_000 + 1)
        answers = [await theirs.Reverse(reverse_request(rid, "b3")) for rid in (ours.redemption_id, invented)]
    assert answers[0] == answers[1] == pb.ReverseResponse(
        outcome=pb.REVERSAL_OUTCOME_NOT_FOUND, reason="REDEMPTION_NOT_FOUND")  # fmt: skip
    assert (await redis.hget(keys.budget_key(issued.campaign.id, 0), "rev")) is None  # nothing changed


async def test_bad_input_is_invalid_argument_naming_each_field(gateway: RunningGateway) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gateway.stub.Reverse(pb.ReverseRequest(redemption_id="nope", reason="no|pipes", store_id="store-1"))
    assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(failure.value)) == {"redemption_id", "reason", "idempotency_key", "terminal_id"}


async def test_concurrent_reversals_of_one_redemption_give_back_one_use(
    gateway: RunningGateway, issue: Issue, redis: Redis, migrated: str, db: asyncpg.Connection
) -> None:
    issued = await issue(1, uses_per_code=3, rules={"budget_count": 5})
    first = await redeemed(gateway, issued.codes[0], "c0")
    await drain(redis, migrated)
    answers = await asyncio.gather(*(
        gateway.stub.Reverse(reverse_request(first.redemption_id, f"c{n}")) for n in range(1, 31)
    ))  # fmt: skip
    outcomes = sorted(a.outcome for a in answers)
    assert outcomes == [pb.REVERSAL_OUTCOME_REVERSED] + [pb.REVERSAL_OUTCOME_ALREADY_REVERSED] * 29
    assert len({a.reversal_id for a in answers}) == 1
    cid = issued.campaign.id
    budget = await redis.hgetall(keys.budget_key(cid, 0))
    assert (budget["un"], budget["rev"]) == ("0", "1")
    await drain(redis, migrated)
    assert await db.fetchval("SELECT count(*) FROM reversals WHERE campaign_id = $1", cid) == 1
    assert await db.fetchval("SELECT count(*) FROM reversal_alarms") == 0


async def test_reversals_racing_redemptions_of_one_multi_use_code_lose_nothing(
    gateway: RunningGateway, issue: Issue, redis: Redis, migrated: str, db: asyncpg.Connection
) -> None:
    issued = await issue(1, uses_per_code=30)
    code, cid = issued.codes[0], issued.campaign.id
    before = [await redeemed(gateway, code, f"m{n}") for n in range(20)]
    await drain(redis, migrated)
    reversals = [gateway.stub.Reverse(reverse_request(r.redemption_id, f"v{n}")) for n, r in enumerate(before)]
    redemptions = [gateway.stub.Redeem(redeem_request(code, f"n{n}")) for n in range(20)]
    mixed = [call for pair in zip(reversals, redemptions, strict=True) for call in pair]
    answers = await asyncio.gather(*mixed)
    reversed_ = [a for a in answers if isinstance(a, pb.ReverseResponse) and a.outcome == pb.REVERSAL_OUTCOME_REVERSED]
    granted = [a for a in answers if isinstance(a, pb.RedeemResponse) and a.outcome == pb.OUTCOME_REDEEMED]
    declined = [a for a in answers if isinstance(a, pb.RedeemResponse) and a.outcome != pb.OUTCOME_REDEEMED]
    assert len(reversed_) == 20  # every redemption from before was reversed, whatever it raced
    assert 10 <= len(granted) <= 20 and {a.outcome for a in declined} <= {pb.OUTCOME_ALREADY_REDEEMED}
    assert len(granted) + len(declined) == 20
    uses = [a.use_number for a in (*before, *granted)]
    assert len(uses) == len(set(uses))  # a use number is granted once
    state = await redis.hgetall(keys.code_key(cid, 0, (await db.fetchval(
        "SELECT encode(code_ref, 'hex') FROM issued_codes WHERE campaign_id = $1", cid))))  # fmt: skip
    assert int(state["used"]) == 20 + len(granted) - 20
    await drain(redis, migrated)
    assert await db.fetchval("SELECT count(*) FROM redemptions WHERE campaign_id = $1", cid) == 20 + len(granted)
    assert await db.fetchval("SELECT count(*) FROM reversals WHERE campaign_id = $1", cid) == 20
