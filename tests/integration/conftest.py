"""Fixtures for tests against real servers: issued codes and an in-process gateway on a real port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from gateway import issuance
from gateway.clock import ManualClock
from gateway.coderefs import KeyRing
from gateway.grpc_api.server import Gateway
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from gateway.settings import Settings
from tests.conftest import T0_MS, gateway_environ

DAY_MS = 86_400_000


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


@dataclass
class Issued:
    campaign: issuance.Campaign
    codes: list[str]


Issue = Callable[..., Awaitable[Issued]]


async def issue_campaign(
    db: asyncpg.Connection,
    redis: Redis,
    keyring: KeyRing,
    out: Path,
    *,
    count: int,
    uses_per_code: int = 1,
    shards: int = 1,
    valid_from_ms: int = T0_MS - DAY_MS,
    valid_until_ms: int = T0_MS + DAY_MS,
) -> Issued:
    """Create a campaign and issue codes for it, the way `rgw campaign create` + `rgw codes generate` do."""
    campaign = await issuance.create_campaign(
        db, redis, keyring,
        name=out.stem, valid_from=at(valid_from_ms), valid_until=at(valid_until_ms),
        uses_per_code=uses_per_code, shards=shards,
    )  # fmt: skip
    await issuance.issue_codes(db, redis, keyring, campaign, count=count, out=out)
    return Issued(campaign, out.read_text().split())


async def issue_into(
    db: asyncpg.Connection, redis: Redis, keyring: KeyRing, tmp_path: Path, *, count: int, valid_from_ms: int
) -> list[str]:
    """Codes valid for a year from `valid_from_ms`, in the given Redis (for tests that run their own)."""
    out = tmp_path / f"codes-{valid_from_ms}.txt"
    year = 365 * DAY_MS
    issued = await issue_campaign(
        db, redis, keyring, out, count=count, valid_from_ms=valid_from_ms, valid_until_ms=valid_from_ms + year
    )
    return issued.codes


@pytest.fixture
def issue(db: asyncpg.Connection, redis: Redis, keyring: KeyRing, tmp_path: Path) -> Issue:
    """A factory: `await issue(count, uses_per_code=…, …)` gives a fresh campaign and its codes."""
    counter = 0

    async def make(count: int, **rules: int) -> Issued:
        nonlocal counter
        counter += 1
        return await issue_campaign(db, redis, keyring, tmp_path / f"codes-{counter}.txt", count=count, **rules)

    return make


@dataclass
class RunningGateway:
    gateway: Gateway
    target: str
    channel: grpc.aio.Channel
    stub: pb_grpc.RedemptionServiceStub


@pytest_asyncio.fixture(loop_scope="session")
async def gateway(redis_url: str, migrated: str, clock: ManualClock, redis: Redis) -> AsyncIterator[RunningGateway]:
    """The real server stack on 127.0.0.1:<free port>, on the test clock, with a client channel."""
    settings = Settings.from_env(gateway_environ(redis_url, migrated))
    gw = Gateway(settings=settings, keyring=settings.keyring(), clock=clock)
    port = await gw.start()
    target = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(target)
    yield RunningGateway(gw, target, channel, pb_grpc.RedemptionServiceStub(channel))
    await channel.close()
    await gw.stop()
