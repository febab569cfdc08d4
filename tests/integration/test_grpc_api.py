"""End to end through a real grpc.aio channel to the real server stack, Redis and Postgres."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from redis.asyncio import Redis

from gateway import codes
from gateway.clock import ManualClock
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from tests.conftest import T0_MS
from tests.integration.conftest import DAY_MS, Issue, RunningGateway
from tests.integration.grpc_helpers import field_violations, redeem_request, redis_snapshot


async def test_redeem_then_already_redeemed(gateway: RunningGateway, issue: Issue) -> None:
    issued = await issue(1)
    code = issued.codes[0]
    first = await gateway.stub.Redeem(redeem_request(code, "a"))
    second = await gateway.stub.Redeem(redeem_request(code, "b"))
    assert first.outcome == pb.OUTCOME_REDEEMED and first.reason == "REDEEMED"
    assert first.campaign_id == issued.campaign.id and first.uses_left == 0 and first.use_number == 1
    assert first.redeemed_at.ToMilliseconds() == T0_MS and not first.replayed
    assert len(first.redemption_id) == 36
    assert second.outcome == pb.OUTCOME_ALREADY_REDEEMED and second.reason == "NO_USES_LEFT"
    assert second.redemption_id == ""


async def test_retry_with_same_key_replays_the_first_answer(gateway: RunningGateway, issue: Issue) -> None:
    issued = await issue(1)
    request = redeem_request(issued.codes[0], "retry-1", location=pb.Location(latitude=31.2, longitude=121.5))
    first = await gateway.stub.Redeem(request)
    again = await gateway.stub.Redeem(request)
    assert again.replayed and not first.replayed
    assert again.redemption_id == first.redemption_id and again.outcome == pb.OUTCOME_REDEEMED
    assert again.redeemed_at == first.redeemed_at and again.use_number == first.use_number


async def test_same_key_with_changed_request_is_refused(gateway: RunningGateway, issue: Issue, redis: Redis) -> None:
    issued = await issue(1)
    await gateway.stub.Redeem(redeem_request(issued.codes[0], "k", customer_device_id="phone-1"))
    before = await redis_snapshot(redis)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.stub.Redeem(redeem_request(issued.codes[0], "k", customer_device_id="phone-2"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "idempotency_key" in field_violations(info.value)
    assert await redis_snapshot(redis) == before


async def test_unknown_code_is_a_decline_not_an_error(gateway: RunningGateway, issue: Issue) -> None:
    issued = await issue(1)
    stranger = codes.generate(codes.Route(issued.campaign.id, 0))
    response = await gateway.stub.Redeem(redeem_request(stranger, "x"))
    assert response.outcome == pb.OUTCOME_NOT_FOUND and response.reason == "CODE_NOT_FOUND"


async def test_expiry_and_not_yet_valid_follow_the_clock(
    gateway: RunningGateway, issue: Issue, clock: ManualClock
) -> None:
    issued = await issue(2, valid_from_ms=T0_MS + DAY_MS, valid_until_ms=T0_MS + 2 * DAY_MS)
    early = await gateway.stub.Redeem(redeem_request(issued.codes[0], "a"))
    clock.advance(2 * DAY_MS)
    late = await gateway.stub.Redeem(redeem_request(issued.codes[1], "b"))
    assert (early.outcome, early.reason) == (pb.OUTCOME_NOT_YET_VALID, "CODE_NOT_YET_VALID")
    assert (late.outcome, late.reason) == (pb.OUTCOME_EXPIRED, "CODE_EXPIRED")


async def test_validate_says_what_redeem_would_do_and_changes_nothing(gateway: RunningGateway, issue: Issue) -> None:
    issued = await issue(1, uses_per_code=2)
    query = pb.ValidateRequest(code=issued.codes[0], store_id="s", terminal_id="t")
    before = await gateway.stub.Validate(query)
    again = await gateway.stub.Validate(query)
    assert before.outcome == again.outcome == pb.OUTCOME_REDEEMABLE and before.uses_left == 2
    await gateway.stub.Redeem(redeem_request(issued.codes[0], "1"))
    await gateway.stub.Redeem(redeem_request(issued.codes[0], "2"))
    after = await gateway.stub.Validate(query)
    assert after.outcome == pb.OUTCOME_ALREADY_REDEEMED and after.uses_left == 0


async def test_get_code_reports_state(gateway: RunningGateway, issue: Issue) -> None:
    issued = await issue(1, uses_per_code=2)
    code = issued.codes[0]
    fresh = await gateway.stub.GetCode(pb.GetCodeRequest(code=code))
    assert fresh.status == pb.CODE_STATUS_ACTIVE and (fresh.uses_total, fresh.uses_left) == (2, 2)
    assert not fresh.HasField("last_redeemed_at") and len(fresh.code_ref_prefix) == 12
    assert fresh.valid_from.ToMilliseconds() == T0_MS - DAY_MS
    await gateway.stub.Redeem(redeem_request(code, "1"))
    await gateway.stub.Redeem(redeem_request(code, "2"))
    used = await gateway.stub.GetCode(pb.GetCodeRequest(code=code.lower()))
    assert used.status == pb.CODE_STATUS_FULLY_REDEEMED and used.uses_left == 0
    assert used.last_redeemed_at.ToMilliseconds() == T0_MS
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.stub.GetCode(pb.GetCodeRequest(code=codes.generate(codes.Route(issued.campaign.id, 0))))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"code": ""}, "code"),
        ({"code": "X" * 10_000}, "code"),
        ({"location": pb.Location(latitude=91, longitude=0)}, "location.latitude"),
        ({"bad_check": True}, "code"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"store_id": ""}, "store_id"),
    ],
)
async def test_invalid_input_is_invalid_argument_and_changes_nothing(
    gateway: RunningGateway, issue: Issue, redis: Redis, change: dict[str, object], field: str
) -> None:
    issued = await issue(1)
    code = issued.codes[0]
    fields: dict[str, object] = {"code": code, "idempotency_key": "k", "store_id": "s", "terminal_id": "t"}
    if change.pop("bad_check", False):
        fields["code"] = code[:-1] + ("2" if code[-1] != "2" else "3")
    fields.update(change)
    before = await redis_snapshot(redis, with_risk=True)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.stub.Redeem(pb.RedeemRequest(**fields))  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(info.value)
    # nothing at all, risk counters included (brand 1 counts no failures here; test_risk_lockout.py counts a
    # guessed check character as a failed attempt)
    assert await redis_snapshot(redis, with_risk=True) == before
    assert (await gateway.stub.Redeem(redeem_request(code, "ok"))).outcome == pb.OUTCOME_REDEEMED


async def test_oversized_message_is_refused_by_the_transport(gateway: RunningGateway) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.stub.Redeem(redeem_request("A", "k", customer_device_id="x" * 20_000))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_health_and_reflection(gateway: RunningGateway) -> None:
    health = health_pb2_grpc.HealthStub(gateway.channel)
    for service in ("", "redemption.v1.RedemptionService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(gateway.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = [s.name async for r in responses for s in r.list_services_response.service]
    assert "redemption.v1.RedemptionService" in names and "grpc.health.v1.Health" in names
