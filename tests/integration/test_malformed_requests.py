"""Regressions from the hostile-client report (issue 7): undecodable bytes, oversized stream replies, look-alikes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from redis.asyncio import Redis

from gateway import keys
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from tests.integration.conftest import Issue, RunningGateway
from tests.integration.grpc_helpers import field_violations, redeem_request, redis_snapshot

SERVICE = "/redemption.v1.RedemptionService"
T = TypeVar("T")
UNDECODABLE = [bytes.fromhex("0a01ff"), bytes.fromhex("0a0561626364"), bytes.fromhex("d2")]


def error_reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


@pytest.mark.parametrize("method", [f"{SERVICE}/Redeem", f"{SERVICE}/Validate", f"{SERVICE}/GetCode",
                                    "/grpc.health.v1.Health/Check"])  # fmt: skip
async def test_undecodable_bytes_are_invalid_argument_for_every_unary_rpc(
    gateway: RunningGateway, issue: Issue, redis: Redis, method: str
) -> None:
    await issue(2)
    before = await redis_snapshot(redis)
    call = gateway.channel.unary_unary(method)
    for body in UNDECODABLE:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(body, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, body.hex()
        assert error_reason(info.value) == "MALFORMED_REQUEST" and "parse" in (info.value.details() or "")
    assert await redis_snapshot(redis) == before


async def test_a_garbage_flood_logs_a_few_lines_and_no_traceback(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    call = gateway.channel.unary_unary(f"{SERVICE}/Redeem")
    await asyncio.sleep(1.05)  # earlier tests' lines belong to an interval of their own, reported by now
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        for _ in range(200):
            with pytest.raises(grpc.aio.AioRpcError):
                await call(UNDECODABLE[0], timeout=5)
        await asyncio.sleep(1.1)  # the count of the suppressed lines is reported when the interval ends
    lines = [r.getMessage() for r in caplog.records if r.name.startswith(("rgw", "grpc"))]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    logged = [m for m in lines if m.startswith("refused an undecodable redemption.v1.RedeemRequest")]
    counted = [int(m.split()[0]) for m in lines if "more like this suppressed" in m]
    assert len(logged) + sum(counted) == 200 and len(logged) + len(counted) <= 8


async def _frames(*frames: T) -> AsyncIterator[T]:
    """A stream's messages (serialized bytes for a raw call, messages for a stub)."""
    for frame in frames:
        yield frame


async def test_an_undecodable_stream_message_ends_the_stream_after_the_answered_ones(
    gateway: RunningGateway, issue: Issue, redis: Redis
) -> None:
    issued = await issue(2)
    good = pb.RedeemStreamRequest(batch_id="b0", items=[redeem_request(issued.codes[0], "k0")])
    after = pb.RedeemStreamRequest(batch_id="b2", items=[redeem_request(issued.codes[1], "k1")])
    call = gateway.channel.stream_stream(f"{SERVICE}/RedeemStream")
    replies: list[bytes] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for reply in call(_frames(good.SerializeToString(), b"\xd2", after.SerializeToString()), timeout=10):
            replies.append(reply)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(info.value) == "MALFORMED_REQUEST"
    assert [pb.RedeemStreamResponse.FromString(r).batch_id for r in replies] == ["b0"]
    assert await redis.xlen(keys.outbox_key(issued.campaign.id, 0)) == 1  # the message after it was never decided


def all_bad_item() -> pb.RedeemRequest:
    """Small (about 40 bytes) yet every one of its eight fields is bad: eight field violations in the reply."""
    return pb.RedeemRequest(
        code="\x00", idempotency_key="", store_id="", terminal_id="!", customer_device_id="\t",
        location=pb.Location(latitude=float("nan"), longitude=float("inf"), accuracy_m=-1),
    )  # fmt: skip


@pytest.mark.parametrize(("batch_id", "bad_items"), [("b1", 60), ("B" * 128, 63)])
async def test_a_stream_reply_always_fits_so_a_decided_item_is_always_answered(
    gateway: RunningGateway, issue: Issue, redis: Redis, batch_id: str, bad_items: int
) -> None:
    """The report: 1 valid item and 60 all-bad ones were redeemed and then failed with RESOURCE_EXHAUSTED
    ('Sent message larger than max'), forever on every retry."""
    issued = await issue(1)
    message = pb.RedeemStreamRequest(
        batch_id=batch_id, items=[redeem_request(issued.codes[0], "k"), *[all_bad_item()] * bad_items]
    )
    assert message.ByteSize() <= 16_384  # accepted: within the receive limit
    replies = [r async for r in gateway.stub.RedeemStream(_frames(message), timeout=10)]
    (reply,) = replies
    assert reply.batch_id == batch_id and reply.results[0].response.outcome == pb.OUTCOME_REDEEMED
    assert reply.ByteSize() > 16_384  # larger than a request may be: the send limit makes room for it
    assert all(len(r.error.field_violations) == 8 for r in reply.results[1:])
    assert await redis.xlen(keys.outbox_key(issued.campaign.id, 0)) == 1


async def test_an_over_long_batch_id_is_refused_before_any_item_is_decided(
    gateway: RunningGateway, issue: Issue, redis: Redis
) -> None:
    issued = await issue(1)
    message = pb.RedeemStreamRequest(batch_id="B" * 129, items=[redeem_request(issued.codes[0], "k")])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _ = [r async for r in gateway.stub.RedeemStream(_frames(message), timeout=10)]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "batch_id" in field_violations(info.value)
    assert await redis.xlen(keys.outbox_key(issued.campaign.id, 0)) == 0


@pytest.mark.parametrize("disguise", ["\u017f", "\t"])
async def test_look_alikes_and_tabs_in_a_code_are_invalid(gateway: RunningGateway, issue: Issue, disguise: str) -> None:
    """ "\u017f".upper() == "S": before the fix a code with its S written that way was redeemed."""
    issued = await issue(40)
    code = next(c for c in issued.codes if "S" in c)
    disguised = code.replace("S", disguise, 1) if disguise != "\t" else code[:5] + disguise + code[5:]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.stub.Redeem(redeem_request(disguised, "k"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "code" in field_violations(info.value)
    assert (await gateway.stub.Redeem(redeem_request(code, "k2"))).outcome == pb.OUTCOME_REDEEMED
