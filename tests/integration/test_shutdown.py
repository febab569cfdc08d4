"""`rgw serve` as a real process: load shedding at the concurrency limit, and graceful shutdown on SIGTERM
(health flips to NOT_SERVING, in-flight calls finish, the process exits 0)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.coderefs import KeyRing
from gateway.dev.servers import RedisServer, free_port
from gateway.durability import mark_initialised
from gateway.grpc_api.client_auth import authenticated_channel
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from gateway.redis_client import connect_server as connect
from tests.conftest import gateway_environ
from tests.integration.conftest import Tenants, issue_into
from tests.integration.grpc_helpers import redeem_request

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _watch(channel: grpc.aio.Channel, seen: list[int]) -> None:
    async for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="")):
        seen.append(reply.status)


async def _until(predicate: object, what: str) -> None:
    for _ in range(200):
        if callable(predicate) and predicate():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:  # type: ignore[misc]
    with RedisServer.start(data_dir=tmp_path / "redis", appendonly=False) as server:
        yield server
        server.resume()


@pytest.mark.slow
async def test_sigterm_drains_in_flight_calls_and_sheds_excess(
    own_redis: RedisServer, migrated: str, db: asyncpg.Connection, keyring: KeyRing, tmp_path: Path, tenants: Tenants
) -> None:
    client = connect(own_redis.url, pool_size=2, timeout_s=5)
    await mark_initialised(client, "test")
    issued = await issue_into(
        db, client, keyring, tmp_path, count=3, valid_from_ms=time.time_ns() // 1_000_000 - 60_000
    )
    await client.aclose()
    port = free_port()
    env = gateway_environ(
        own_redis.url, migrated, RGW_GRPC_ADDR=f"127.0.0.1:{port}", RGW_MAX_CONCURRENT_RPCS="3",
        RGW_SHUTDOWN_GRACE_SECONDS="20", RGW_REDIS_TIMEOUT_SECONDS="20", RGW_HEALTH_INTERVAL_SECONDS="60",
    )  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], env={**os.environ, **env})
    channel = authenticated_channel(f"127.0.0.1:{port}", tenants.keys["internal"])
    try:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = pb_grpc.RedemptionServiceStub(channel)
        seen: list[int] = []
        watcher = asyncio.create_task(_watch(channel, seen))
        await _until(lambda: SERVING in seen, "health SERVING")

        own_redis.pause()  # Redis hangs: the next calls stay in flight
        in_flight = [asyncio.ensure_future(stub.Redeem(redeem_request(c, f"k{i}"))) for i, c in enumerate(issued[:2])]
        await asyncio.sleep(0.5)
        with pytest.raises(grpc.aio.AioRpcError) as shed:
            await stub.Redeem(redeem_request(issued[2], "k-excess"), timeout=10)
        assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        proc.send_signal(signal.SIGTERM)
        await _until(lambda: NOT_SERVING in seen, "health NOT_SERVING")
        watcher.cancel()
        own_redis.resume()
        results = await asyncio.wait_for(asyncio.gather(*in_flight), 20)
        assert [r.outcome for r in results] == [pb.OUTCOME_REDEEMED] * 2
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        await channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
