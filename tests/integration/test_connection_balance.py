"""Connection balance over replicas: an internal caller with deploy/grpc-service-config.json spreads its calls over
every gateway it resolves (round_robin), while a plain channel (pick_first) sends them all to one; and the maximum
connection age makes a client open a new connection, which is what lets POS connections reach new replicas."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2

from gateway.client_channel import DEFAULT_SERVICE_CONFIG, internal_channel
from gateway.clock import ManualClock
from gateway.grpc_api.client_auth import bearer_interceptors
from gateway.grpc_api.server import Gateway
from gateway.grpc_api.servicer import RedemptionServicer
from gateway.pb.redemption.v1 import inventory_pb2
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from gateway.service import RedemptionService
from gateway.settings import Settings
from tests.conftest import gateway_environ
from tests.integration.conftest import Issue, Tenants
from tests.integration.grpc_helpers import redeem_request

CALLS = 20


class _PeerRecordingServicer(RedemptionServicer):
    """The real servicer, noting the client connection (its peer address) of every Redeem it answers."""

    def __init__(self, service: RedemptionService, *, stream_max_items: int, peers: list[str]) -> None:
        super().__init__(service, stream_max_items=stream_max_items)
        self._peers = peers

    async def Redeem(self, request: pb.RedeemRequest, context: grpc.aio.ServicerContext) -> pb.RedeemResponse:
        self._peers.append(context.peer())
        return await super().Redeem(request, context)


@dataclass
class Replica:
    gateway: Gateway
    port: int
    peers: list[str] = field(default_factory=list)


Register = Callable[[grpc.aio.Server, RedemptionService, Settings], None]


def _recording(peers: list[str]) -> Register:
    def register(server: grpc.aio.Server, service: RedemptionService, settings: Settings) -> None:
        servicer = _PeerRecordingServicer(service, stream_max_items=settings.stream_max_items, peers=peers)
        pb_grpc.add_RedemptionServiceServicer_to_server(servicer, server)

    return register


async def start_replica(redis_url: str, database_url: str, clock: ManualClock, **extra: str) -> Replica:
    """One gateway - the real server stack, server_options(settings) included - sharing the session's Redis and
    Postgres with the others, as the pods of a Deployment do."""
    settings = Settings.from_env(gateway_environ(redis_url, database_url, **extra))
    peers: list[str] = []
    gateway = Gateway(settings=settings, keyring=settings.keyring(), clock=clock, register=_recording(peers))
    port = await gateway.start()
    return Replica(gateway, port, peers)


@pytest_asyncio.fixture(loop_scope="session")
async def replicas(
    redis_url: str, migrated: str, clock: ManualClock, tenants: Tenants
) -> AsyncIterator[tuple[Replica, Replica]]:
    """Two gateways on two ports (`tenants`: the API keys and the registry they authenticate against)."""
    first = await start_replica(redis_url, migrated, clock)
    try:
        second = await start_replica(redis_url, migrated, clock)
    except BaseException:
        await first.gateway.stop()
        raise
    yield first, second
    await asyncio.gather(first.gateway.stop(), second.gateway.stop())


async def redeem_all(channel: grpc.aio.Channel, codes: list[str]) -> None:
    stub = pb_grpc.RedemptionServiceStub(channel)
    for i, code in enumerate(codes):
        reply = await stub.Redeem(redeem_request(code, f"balance-{i}"), timeout=10)
        assert reply.outcome == pb.OUTCOME_REDEEMED


def served(replicas: tuple[Replica, Replica]) -> list[int]:
    return [len(replica.peers) for replica in replicas]


async def test_the_service_config_spreads_calls_over_every_replica(
    replicas: tuple[Replica, Replica], tenants: Tenants, issue: Issue
) -> None:
    target = "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)
    codes = (await issue(CALLS)).codes
    channel = internal_channel(target, interceptors=bearer_interceptors(tenants.keys["internal"]))
    try:
        # round_robin connects to every address at once; calls made before the second connection is up would
        # all go to the first, which says nothing about the policy.
        await asyncio.wait_for(channel.channel_ready(), 10)
        await asyncio.sleep(0.2)
        await redeem_all(channel, codes)
    finally:
        await channel.close()
    assert sum(served(replicas)) == CALLS
    assert min(served(replicas)) >= CALLS // 4, f"calls per replica: {served(replicas)}"


async def test_without_the_service_config_one_replica_gets_every_call(
    replicas: tuple[Replica, Replica], tenants: Tenants, issue: Issue
) -> None:
    target = "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)
    codes = (await issue(CALLS)).codes
    # gRPC's default policy, pick_first: one connection, to the first address that answers.
    channel = grpc.aio.insecure_channel(target, interceptors=bearer_interceptors(tenants.keys["internal"]))
    try:
        await asyncio.wait_for(channel.channel_ready(), 10)
        await asyncio.sleep(0.2)
        await redeem_all(channel, codes)
    finally:
        await channel.close()
    assert sorted(served(replicas)) == [0, CALLS]


@pytest.mark.parametrize(("age", "connections"), [("1", 2), ("0", 1)])
async def test_an_aged_connection_is_replaced_by_a_new_one(
    redis_url: str, migrated: str, clock: ManualClock, tenants: Tenants, issue: Issue, age: str, connections: int
) -> None:
    replica = await start_replica(
        redis_url, migrated, clock,
        RGW_GRPC_MAX_CONNECTION_AGE_SECONDS=age, RGW_GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS="1",
    )  # fmt: skip
    codes = (await issue(2)).codes
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{replica.port}", interceptors=bearer_interceptors(tenants.keys["internal"])
    )
    try:
        await redeem_all(channel, codes[:1])
        # Past the age (1 s, gRPC adds up to 10 % jitter) and the grace (1 s): the first connection got GOAWAY.
        await asyncio.sleep(2.5)
        await redeem_all(channel, codes[1:])
    finally:
        await channel.close()
        await replica.gateway.stop()
    assert len(replica.peers) == 2
    assert len(set(replica.peers)) == connections, replica.peers


def test_the_service_config_names_only_methods_that_exist() -> None:
    """gRPC ignores a methodConfig entry naming no real method, so a typo would silently turn a retry off."""
    services = {
        service.full_name: service
        for module in (pb, inventory_pb2, health_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
    }
    config = json.loads(DEFAULT_SERVICE_CONFIG.read_text(encoding="utf-8"))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    named = Counter[str]()
    for method_config in config["methodConfig"]:
        assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
        for name in method_config["name"]:
            method = services[name["service"]].methods_by_name[name["method"]]
            assert not method.client_streaming and not method.server_streaming, method.full_name
            named[method.full_name] += 1
    assert "redemption.v1.RedemptionService.Redeem" in named
    assert not [m for m in named if ".AdminService." in m]
    assert max(named.values()) == 1
