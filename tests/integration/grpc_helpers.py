"""Small helpers for calling the gateway over a real channel in tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from redis.asyncio import Redis

from gateway import keys
from gateway.clock import Clock
from gateway.dev.servers import RedisServer
from gateway.durability import mark_initialised
from gateway.grpc_api.client_auth import authenticated_channel
from gateway.grpc_api.server import Gateway
from gateway.ledger.events import decode_event, is_reversal_entry
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.redis_client import connect
from gateway.settings import Settings


def redeem_request(
    code: str, key: str, *, store: str = "store-1", terminal: str = "till-1", **extra: object
) -> pb.RedeemRequest:
    return pb.RedeemRequest(code=code, idempotency_key=key, store_id=store, terminal_id=terminal, **extra)  # type: ignore[arg-type]


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The BadRequest field violations a failed call carried."""
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    found: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
    return found


RISK_KEYS = "rgw:{r"
# Kept current by each gateway's background upkeep (it lists every brand's risk-event stream every second), not by
# the requests a snapshot is taken around.
DIRECTORY = "rgw:outboxes"


async def redis_snapshot(redis: Redis, *, with_risk: bool = False) -> dict[str, object]:
    """Every key's logical content (DUMP is not stable: a hash may be re-ordered by rehashing on reads). The risk
    engine's counters (risk/keys.py) only with `with_risk`: every attempt counts there by design (its own tests
    assert what), while the codes' state must not change. Never the outbox directory (see DIRECTORY). The
    campaigns' decision counters (keys.stats_key) are in: a decided Redeem counts there, so a test that expects
    declines compares them with `decision_counts` and the rest with `without_decision_counts`."""
    state: dict[str, object] = {}
    for raw in await redis.keys("*"):
        key = str(raw)
        if key == DIRECTORY or (key.startswith(RISK_KEYS) and not with_risk):
            continue
        kind = await redis.type(key)
        if kind == "hash":
            state[key] = await redis.hgetall(key)
        elif kind == "stream":
            state[key] = await redis.xrange(key)
        else:
            state[key] = await redis.dump(key)
    return state


STATS = ":stats:"  # gateway/keys.py stats_key


def decision_counts(snapshot: Mapping[str, object]) -> Counter[str]:
    """The decision counters of a snapshot, summed over campaign shards and minutes: reason -> count."""
    total: Counter[str] = Counter()
    for key, fields in snapshot.items():
        if STATS in key:
            total.update({reason: int(n) for reason, n in cast(dict[str, str], fields).items()})
    return total


def without_decision_counts(snapshot: Mapping[str, object]) -> dict[str, object]:
    """A snapshot without the decision counters."""
    return {key: value for key, value in snapshot.items() if STATS not in key}


async def outbox_events(redis: Redis, campaign_id: int, shard: int = 0) -> list[dict[str, str]]:
    """The events in a campaign shard's outbox, oldest first, decoded."""
    entries: Any = await redis.xrange(keys.outbox_key(campaign_id, shard))
    return [decode_event(fields) for _, fields in entries if not is_reversal_entry(fields)]


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    """What the standard health service says of `service` ("" : the whole server)."""
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return int(reply.status)


async def until_health(channel: grpc.aio.Channel, status: int, service: str = "") -> None:
    """Wait (up to ~10 s) until `service` reports `status`."""
    for _ in range(200):
        if await health_status(channel, service) == status:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"health of {service!r} never became {status}")


async def initialise(redis_url: str) -> None:
    """Mark a Redis as built from Postgres (an empty one is the right state for an empty database)."""
    client = connect(redis_url, pool_size=1, timeout_s=2)
    await mark_initialised(client, "test")
    await client.aclose()


@contextlib.asynccontextmanager
async def gateway_on_own_redis(
    data_dir: Path, database_url: str, clock: Clock, api_key: str
) -> AsyncIterator[tuple[RedisServer, grpc.aio.Channel]]:
    """A gateway on a Redis of its own that the test may kill (health checked every 0.1 s, Redis timeout 0.5 s),
    and a channel to it as `api_key`'s client."""
    from tests.conftest import gateway_environ

    server = RedisServer.start(data_dir=data_dir, appendonly=False)
    try:
        await initialise(server.url)
        env = gateway_environ(
            server.url, database_url, RGW_HEALTH_INTERVAL_SECONDS="0.1", RGW_REDIS_TIMEOUT_SECONDS="0.5"
        )
        settings = Settings.from_env(env)
        gateway = Gateway(settings=settings, keyring=settings.keyring(), clock=clock)
        port = await gateway.start()
        channel = authenticated_channel(f"127.0.0.1:{port}", api_key)
        try:
            yield server, channel
        finally:
            await channel.close()
            await gateway.stop()
    finally:
        server.stop()
