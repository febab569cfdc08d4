"""A registry change reaches every gateway process within the bound (2 s): real `rgw serve` processes, the change
announced by pub/sub - or only by the version key the processes poll, the backstop for a lost message."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from gateway import keys
from gateway.dev.servers import free_port
from gateway.grpc_api.client_auth import authenticated_channel
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from gateway.tenancy import admin_store, notify
from tests.conftest import gateway_environ

pytestmark = pytest.mark.single_and_cluster

BOUND_S = 2.0


async def _status(channel: grpc.aio.Channel) -> grpc.StatusCode:
    request = pb.ValidateRequest(code="232PXT26F26XDX2WJ", store_id="s", terminal_id="t")
    try:
        await pb_grpc.RedemptionServiceStub(channel).Validate(request, timeout=2)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def _until(channels: list[grpc.aio.Channel], status: grpc.StatusCode, within: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within:
        if all([await _status(c) == status for c in channels]):
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"not every process answered {status.name} within {within}s")


@pytest.fixture
async def two_gateways(redis_url: str, migrated: str, redis: Redis) -> AsyncIterator[list[str]]:
    """Two `rgw serve` processes (as two pods, or two workers of one) on their own ports."""
    ports = [free_port(), free_port()]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve"],
            env={**os.environ, **gateway_environ(redis_url, migrated, RGW_GRPC_ADDR=f"127.0.0.1:{port}")},
        )
        for port in ports
    ]
    try:
        yield [f"127.0.0.1:{port}" for port in ports]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


@pytest.mark.parametrize("announce", ["publish", "version key only"])
async def test_a_revocation_reaches_every_process_within_the_bound(
    two_gateways: list[str], db: asyncpg.Connection, redis: Redis, announce: str
) -> None:
    made = await admin_store.create_client(db, actor="tests", brand_id=1, role="pos", label="till", env="test")
    await notify.publish(redis, made.version)
    channels = [authenticated_channel(target, made.value.plaintext) for target in two_gateways]
    try:
        await _until(channels, grpc.StatusCode.OK, within=30)  # started, and the key is known everywhere
        revoked = await admin_store.revoke_client(db, actor="tests", brand_id=1, client_id=made.value.client.id)
        if announce == "publish":
            await notify.publish(redis, revoked.version)
        else:  # a lost PUBLISH: only the polled version key says there is something new
            await redis.set(keys.REGISTRY_VERSION, revoked.version)
        took = await _until(channels, grpc.StatusCode.UNAUTHENTICATED, within=BOUND_S)
        print(f"revocation seen by both processes after {took:.3f}s ({announce})")
    finally:
        await asyncio.gather(*(c.close() for c in channels))
