"""Redis goes away under a running gateway: calls fail fast with UNAVAILABLE + RetryInfo (never INTERNAL) and
health checking reports NOT_SERVING until Redis is back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from gateway import codes
from gateway.clock import ManualClock
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from tests.integration.conftest import Tenants
from tests.integration.grpc_helpers import gateway_on_own_redis, health_status, initialise, redeem_request, until_health


@pytest.mark.slow
async def test_redis_down_gives_unavailable_with_retry_info(
    tmp_path: Path, migrated: str, clock: ManualClock, tenants: Tenants
) -> None:
    async with gateway_on_own_redis(tmp_path / "redis", migrated, clock, tenants.keys["internal"]) as (
        server,
        channel,
    ):
        server.kill()
        await until_health(channel, health_pb2.HealthCheckResponse.NOT_SERVING)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.RedemptionServiceStub(channel).Redeem(redeem_request(codes.generate(codes.Route(1, 0)), "k"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        status = rpc_status.from_call(info.value)
        assert status is not None and any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
        server.restart()  # without AOF: back, but empty - it must not be redeemed against until rebuilt
        stub = pb_grpc.RedemptionServiceStub(channel)
        details = ""
        for _ in range(100):  # once health checking has seen the restarted Redis, the refusal says why
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Redeem(redeem_request(codes.generate(codes.Route(1, 0)), "k"))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            details = str(info.value.details())
            if "not initialised" in details:
                break
            await asyncio.sleep(0.05)
        assert "not initialised" in details
        assert await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        await initialise(server.url)
        await until_health(channel, health_pb2.HealthCheckResponse.SERVING)
        reply = await stub.Redeem(redeem_request(codes.generate(codes.Route(1, 0)), "k"))
        assert reply.outcome == pb.OUTCOME_NOT_FOUND  # initialised (and empty): a normal decline again
