"""RedeemStream: many redemptions per message, every per-code guarantee of Redeem kept."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import code_pb2
from redis.asyncio import Redis

from gateway import keys
from gateway.grpc_api.client_auth import authenticated_channel
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from tests.integration.conftest import Issue, RunningGateway
from tests.integration.grpc_helpers import field_violations, redeem_request


async def _messages(batches: list[list[pb.RedeemRequest]]) -> AsyncIterator[pb.RedeemStreamRequest]:
    for n, items in enumerate(batches):
        yield pb.RedeemStreamRequest(batch_id=f"b{n}", items=items)


async def stream(
    stub: pb_grpc.RedemptionServiceStub, batches: list[list[pb.RedeemRequest]]
) -> list[pb.RedeemStreamResponse]:
    return [reply async for reply in stub.RedeemStream(_messages(batches), timeout=60)]


async def test_batch_items_are_answered_in_order(gateway: RunningGateway, issue: Issue, redis: Redis) -> None:
    issued = await issue(3)
    a, b, c = issued.codes
    bad = a[:-1] + ("2" if a[-1] != "2" else "3")
    items = [redeem_request(a, "k1"), redeem_request(bad, "k2"), redeem_request(b, "k3"), redeem_request(a, "k4")]

    (reply,) = await stream(gateway.stub, [items])

    assert reply.batch_id == "b0" and len(reply.results) == 4
    first, malformed, second, again = reply.results
    assert first.response.outcome == pb.OUTCOME_REDEEMED and second.response.outcome == pb.OUTCOME_REDEEMED
    assert malformed.WhichOneof("result") == "error" and malformed.error.code == code_pb2.INVALID_ARGUMENT
    assert [v.field for v in malformed.error.field_violations] == ["code"] and bad not in malformed.error.message
    assert again.response.outcome == pb.OUTCOME_ALREADY_REDEEMED  # same code later in the same message
    assert await redis.xlen(keys.outbox_key(issued.campaign.id, 0)) == 2
    assert (await gateway.stub.Redeem(redeem_request(c, "x"))).outcome == pb.OUTCOME_REDEEMED


async def test_retries_replay_and_key_reuse_fails_only_that_item(gateway: RunningGateway, issue: Issue) -> None:
    issued = await issue(2)
    first = await stream(gateway.stub, [[redeem_request(issued.codes[0], "k")]])
    changed = redeem_request(issued.codes[0], "k", customer_device_id="other")
    replies = await stream(
        gateway.stub, [[redeem_request(issued.codes[0], "k"), changed, redeem_request(issued.codes[1], "k")]]
    )

    replay, conflict, fresh = replies[0].results
    assert replay.response.replayed and replay.response.redemption_id == first[0].results[0].response.redemption_id
    assert conflict.error.code == code_pb2.INVALID_ARGUMENT and conflict.error.reason == "IDEMPOTENCY_KEY_REUSED"
    assert fresh.response.outcome == pb.OUTCOME_REDEEMED


async def test_one_code_in_many_messages_and_streams_is_redeemed_once(
    gateway: RunningGateway, issue: Issue, redis: Redis
) -> None:
    issued = await issue(1)
    code = issued.codes[0]
    plans = [[[redeem_request(code, f"s{s}-m{m}-i{i}", terminal=f"t{s}") for i in range(10)] for m in range(5)]
             for s in range(20)]  # fmt: skip
    channels = [authenticated_channel(gateway.target, gateway.tenants.keys["internal"]) for _ in range(4)]
    try:
        stubs = [pb_grpc.RedemptionServiceStub(ch) for ch in channels]
        replies = await asyncio.gather(*(stream(stubs[n % 4], plan) for n, plan in enumerate(plans)))
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))

    outcomes = Counter(r.response.outcome for streamed in replies for message in streamed for r in message.results)
    assert outcomes == {pb.OUTCOME_REDEEMED: 1, pb.OUTCOME_ALREADY_REDEEMED: 999}
    assert await redis.xlen(keys.outbox_key(issued.campaign.id, 0)) == 1


async def test_codes_across_shards_each_redeemed_exactly_once(
    gateway: RunningGateway, issue: Issue, redis: Redis
) -> None:
    issued = await issue(100, shards=3)
    plans = [[[redeem_request(code, f"k{caller}", terminal=f"t{caller}") for code in issued.codes[i : i + 25]]
              for i in range(0, 100, 25)] for caller in range(10)]  # fmt: skip
    replies = await asyncio.gather(*(stream(gateway.stub, plan) for plan in plans))

    redeemed = [
        r.response
        for streamed in replies
        for m in streamed
        for r in m.results
        if r.response.outcome == pb.OUTCOME_REDEEMED
    ]
    assert len(redeemed) == 100 and len({r.redemption_id for r in redeemed}) == 100
    assert sum([await redis.xlen(keys.outbox_key(issued.campaign.id, s)) for s in range(3)]) == 100


async def test_too_many_items_ends_the_stream_with_invalid_argument(gateway: RunningGateway, issue: Issue) -> None:
    issued = await issue(1)
    items = [redeem_request(issued.codes[0], f"k{n}") for n in range(65)]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream(gateway.stub, [items])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items" in field_violations(info.value)
    assert (await gateway.stub.Redeem(redeem_request(issued.codes[0], "after"))).outcome == pb.OUTCOME_REDEEMED
