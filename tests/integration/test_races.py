"""Invariant 1 under real concurrency: many terminals, real channels, one real Redis."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from redis.asyncio import Redis

from gateway import keys
from gateway.grpc_api.client_auth import authenticated_channel
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from tests.integration.conftest import Issue, RunningGateway
from tests.integration.grpc_helpers import outbox_events, redeem_request

pytestmark = pytest.mark.single_and_cluster


async def _storm(
    gateway: RunningGateway, requests: list[tuple[int, pb.RedeemRequest]], terminals: int
) -> list[pb.RedeemResponse]:
    """Send every request at once, each terminal on its own channel (its own HTTP/2 connection)."""
    key = gateway.tenants.keys["pos"]
    channels = [authenticated_channel(gateway.target, key) for _ in range(terminals)]
    stubs = [pb_grpc.RedemptionServiceStub(c) for c in channels]
    try:
        await asyncio.gather(*(c.channel_ready() for c in channels))
        return list(await asyncio.gather(*(stubs[t].Redeem(r, timeout=60) for t, r in requests)))
    finally:
        await asyncio.gather(*(c.close() for c in channels))


async def test_500_concurrent_redeems_of_one_code_from_50_terminals(
    gateway: RunningGateway, issue: Issue, redis: Redis
) -> None:
    issued = await issue(1)
    code = issued.codes[0]
    requests = [(n % 50, redeem_request(code, f"key-{n}", terminal=f"till-{n % 50}")) for n in range(500)]

    responses = await _storm(gateway, requests, terminals=50)

    outcomes = Counter(r.outcome for r in responses)
    assert outcomes == {pb.OUTCOME_REDEEMED: 1, pb.OUTCOME_ALREADY_REDEEMED: 499}
    assert not any(r.replayed for r in responses)
    assert await redis.xlen(keys.outbox_key(issued.campaign.id, 0)) == 1
    winner = next(r for r in responses if r.outcome == pb.OUTCOME_REDEEMED)
    event = (await outbox_events(redis, issued.campaign.id))[0]
    assert event["rid"] == winner.redemption_id


async def test_100_codes_each_redeemed_by_10_concurrent_callers(
    gateway: RunningGateway, issue: Issue, redis: Redis
) -> None:
    issued = await issue(100)
    requests = [
        (caller, redeem_request(code, f"k-{i}-{caller}", terminal=f"till-{caller}"))
        for i, code in enumerate(issued.codes)
        for caller in range(10)
    ]

    responses = await _storm(gateway, requests, terminals=10)

    redeemed = [
        req.code for (_, req), resp in zip(requests, responses, strict=True) if resp.outcome == pb.OUTCOME_REDEEMED
    ]
    assert len(redeemed) == 100 and set(redeemed) == set(issued.codes)
    assert Counter(r.outcome for r in responses)[pb.OUTCOME_ALREADY_REDEEMED] == 900
    events = await outbox_events(redis, issued.campaign.id)
    assert len(events) == 100
    assert len({e["ref"] for e in events}) == 100
    assert {e["rid"] for e in events} == {r.redemption_id for r in responses if r.redemption_id}


async def test_concurrent_retries_with_one_key_redeem_once(gateway: RunningGateway, issue: Issue, redis: Redis) -> None:
    issued = await issue(1)
    request = redeem_request(issued.codes[0], "the-same-key")

    responses = await _storm(gateway, [(n % 5, request) for n in range(50)], terminals=5)

    assert all(r.outcome == pb.OUTCOME_REDEEMED for r in responses)
    assert len({r.redemption_id for r in responses}) == 1
    assert sum(not r.replayed for r in responses) == 1
    assert await redis.xlen(keys.outbox_key(issued.campaign.id, 0)) == 1


async def test_multi_use_code_never_exceeds_its_uses(gateway: RunningGateway, issue: Issue, redis: Redis) -> None:
    issued = await issue(1, uses_per_code=5)
    requests = [(n % 20, redeem_request(issued.codes[0], f"k{n}", terminal=f"t{n % 20}")) for n in range(200)]

    responses = await _storm(gateway, requests, terminals=20)

    winners = [r for r in responses if r.outcome == pb.OUTCOME_REDEEMED]
    assert len(winners) == 5
    assert sorted(r.use_number for r in winners) == [1, 2, 3, 4, 5]
    assert await redis.xlen(keys.outbox_key(issued.campaign.id, 0)) == 5
