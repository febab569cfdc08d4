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
from gateway.dev.servers import RedisServer
from gateway.durability import mark_initialised
from gateway.grpc_api.client_auth import authenticated_channel
from gateway.grpc_api.server import Gateway
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from gateway.redis_store import connect
from gateway.settings import Settings
from tests.conftest import gateway_environ
from tests.integration.conftest import Tenants
from tests.integration.grpc_helpers import health_status, redeem_request, until_health


@pytest.mark.slow
async def test_redis_down_gives_unavailable_with_retry_info(
    tmp_path: Path, migrated: str, clock: ManualClock, tenants: Tenants
) -> None:
    server = RedisServer.start(data_dir=tmp_path / "redis", appendonly=False)
    client = connect(server.url, pool_size=1, timeout_s=2)
    await mark_initialised(client, "test")
    await client.aclose()
    env = gateway_environ(server.url, migrated, RGW_HEALTH_INTERVAL_SECONDS="0.1", RGW_REDIS_TIMEOUT_SECONDS="0.5")
    settings = Settings.from_env(env)
    gateway = Gateway(settings=settings, keyring=settings.keyring(), clock=clock)
    port = await gateway.start()
    channel = authenticated_channel(f"127.0.0.1:{port}", tenants.keys["internal"])
    try:
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
        client = connect(server.url, pool_size=1, timeout_s=2)
        await mark_initialised(client, "test")
        await client.aclose()
        await until_health(channel, health_pb2.HealthCheckResponse.SERVING)
        reply = await stub.Redeem(redeem_request(codes.generate(codes.Route(1, 0)), "k"))
        assert reply.outcome == pb.OUTCOME_NOT_FOUND  # initialised (and empty): a normal decline again
    finally:
        await channel.close()
        await gateway.stop()
        server.stop()
