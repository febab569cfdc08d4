"""The registry fails closed: not loaded → UNAVAILABLE; a newer version known but not loadable for longer than
the bound → UNAVAILABLE; loaded again → served again."""

from __future__ import annotations

import grpc
import pytest
from redis.asyncio import Redis

from gateway.clock import ManualClock
from gateway.dev.servers import free_port
from gateway.domain import RegistryNotReady
from gateway.grpc_api.client_auth import authenticated_channel
from gateway.grpc_api.server import Gateway
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from gateway.settings import Settings
from gateway.tenancy.watcher import RegistryWatcher
from tests.conftest import gateway_environ
from tests.integration.conftest import Tenants

pytestmark = pytest.mark.single_and_cluster


async def test_a_gateway_without_its_registry_answers_unavailable(
    redis_url: str, clock: ManualClock, tenants: Tenants
) -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    settings = Settings.from_env(gateway_environ(redis_url, nowhere))
    gateway = Gateway(settings=settings, keyring=settings.keyring(), clock=clock)
    port = await gateway.start()
    try:
        async with authenticated_channel(f"127.0.0.1:{port}", tenants.keys["pos"]) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                request = pb.ValidateRequest(code="232PXT26F26XDX2WJ", store_id="s", terminal_id="t")
                await pb_grpc.RedemptionServiceStub(channel).Validate(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # never "accept" without a registry
        assert "registry" in (info.value.details() or "")
    finally:
        await gateway.stop()


async def test_a_known_newer_version_that_cannot_be_loaded_fails_closed_after_the_bound(
    migrated: str, redis: Redis, tenants: Tenants
) -> None:
    now = [100.0]
    watcher = RegistryWatcher(database_url=migrated, redis=redis, poll_s=60, max_stale_s=5, clock=lambda: now[0])
    await watcher.refresh()
    held = watcher.version
    watcher._database_url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # Postgres is gone

    await watcher.saw_version(held + 1)  # announced, but it cannot be loaded
    now[0] += 5
    assert watcher.registry().version == held  # within the bound: the version held still serves
    now[0] += 0.1
    with pytest.raises(RegistryNotReady):
        watcher.registry()

    watcher._database_url = migrated  # Postgres is back
    await watcher.saw_version(held + 1)
    assert watcher.registry().version >= held
    await watcher.stop()
