"""Fixtures for tests against real servers: issued codes and an in-process gateway on a real port."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from gateway import issuance
from gateway.campaigns.model import Campaign, get_campaign
from gateway.campaigns.publish import publish_from_postgres
from gateway.clock import ManualClock
from gateway.coderefs import KeyRing
from gateway.grpc_api.client_auth import authenticated_channel
from gateway.grpc_api.server import Gateway
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from gateway.settings import Settings
from gateway.tenancy import admin_risk, admin_store, notify
from gateway.tenancy.model import Store, Terminal
from tests.conftest import T0_MS, gateway_environ
from tests.integration.inventory_order_helpers import InventoryGateway, inventory_gateway

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
    rules: Mapping[str, object] | None = None,
) -> Issued:
    """Create a campaign and issue codes for it, the way `rgw campaign create` + `rgw codes generate` do; `rules`
    are more columns of the campaign (migration 0007: budget_count, face_value, redemption_hours, ...)."""
    campaign = await issuance.create_campaign(
        db, redis, keyring,
        name=out.stem, valid_from=at(valid_from_ms), valid_until=at(valid_until_ms),
        uses_per_code=uses_per_code, shards=shards,
    )  # fmt: skip
    if rules:
        campaign = await set_rules(db, redis, campaign.id, rules)
    await issuance.issue_codes(db, redis, keyring, campaign, count=count, out=out)
    return Issued(campaign, out.read_text().split())


async def set_rules(db: asyncpg.Connection, redis: Redis, campaign_id: int, rules: Mapping[str, object]) -> Campaign:
    """Change a campaign's columns in Postgres and publish it, as an operator's update does."""
    values = [json.dumps(v) if name == "redemption_hours" else v for name, v in rules.items()]
    assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(rules, start=2))
    await db.execute(f"UPDATE campaigns SET {assignments} WHERE id = $1", campaign_id, *values)
    campaign = await get_campaign(db, campaign_id)
    await publish_from_postgres(db, redis, campaign)
    return campaign


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

    async def make(count: int, **rules: Any) -> Issued:
        nonlocal counter
        counter += 1
        return await issue_campaign(db, redis, keyring, tmp_path / f"codes-{counter}.txt", count=count, **rules)

    return make


@dataclass
class Tenants:
    """The registry the tests call as: the default brand (1, which `issue` issues for) and another brand, each
    with clients of every role; `keys` and `clients` are by name (see the fixture)."""

    keys: dict[str, str]
    clients: dict[str, str]
    other_brand: int
    store: Store
    terminal: Terminal


async def _client(db: asyncpg.Connection, brand_id: int | None, role: str, **binding: int) -> tuple[str, str]:
    made = await admin_store.create_client(
        db, actor="tests", brand_id=brand_id, role=role, label=f"test {role}", env="test", **binding
    )
    return made.value.client.id, made.value.plaintext


@pytest_asyncio.fixture(loop_scope="session")
async def tenants(db: asyncpg.Connection, redis: Redis) -> Tenants:
    """pos, internal, admin and platform clients of brand 1; other_pos / other_internal of brand `other`;
    store_pos / terminal_pos bound to store `store-1` / its terminal `till-1`."""
    other = (await admin_store.create_brand(db, actor="tests", slug="other", name="Other brand")).value
    store = (await admin_store.create_store(
        db, actor="tests", brand_id=1, external_id="store-1", name="Store one", latitude=31.23, longitude=121.47,
        time_zone="Asia/Shanghai",
    )).value  # fmt: skip
    terminal = (
        await admin_store.create_terminal(db, actor="tests", brand_id=1, store_id=store.id, external_id="till-1")
    ).value
    made = {
        **{role: await _client(db, 1, role) for role in ("pos", "internal", "admin")},
        "platform": await _client(db, None, "platform"),
        "other_pos": await _client(db, other.id, "pos"),
        "other_internal": await _client(db, other.id, "internal"),
        "store_pos": await _client(db, 1, "pos", store_id=store.id),
        "terminal_pos": await _client(db, 1, "pos", terminal_id=terminal.id),
    }
    await admin_risk.set_risk_policy(db, actor="tests", brand_id=1, campaign_id=0, document=HAMMER_POLICY)
    version = await db.fetchval("SELECT version FROM registry_version")
    await notify.publish(redis, version)
    return Tenants({n: key for n, (_, key) in made.items()}, {n: cid for n, (cid, _) in made.items()}, other.id,
                   store, terminal)  # fmt: skip


# Brand 1's risk policy in the suites that are not about risk: they hammer one code from a few terminals and send
# thousands of unknown codes on purpose (races, streams, fuzzing), which the default limits and lockouts would
# (rightly) stop. Every other rule keeps its default; the risk suites set their own policies.
HAMMER_POLICY: dict[str, object] = {
    "limits": {"terminal": None, "store": None, "client": None, "code": None, "device": None},
    "lockout": {"terminal": None, "store": None, "client": None},
}


@dataclass
class RunningGateway:
    gateway: Gateway
    target: str
    channel: grpc.aio.Channel
    stub: pb_grpc.RedemptionServiceStub
    tenants: Tenants

    def channel_as(self, name: str, **extra: str) -> grpc.aio.Channel:
        """A new channel authenticated as the tenants' client `name` (close it after use)."""
        metadata = [(key.replace("_", "-"), value) for key, value in extra.items()]
        return authenticated_channel(self.target, self.tenants.keys[name], extra=metadata)


@pytest_asyncio.fixture(loop_scope="session")
async def gateway(
    redis_url: str, migrated: str, clock: ManualClock, redis: Redis, tenants: Tenants
) -> AsyncIterator[RunningGateway]:
    """The real server stack on 127.0.0.1:<free port>, on the test clock, with a channel authenticated as brand
    1's internal client (Redeem, Validate, GetCode and RedeemStream)."""
    settings = Settings.from_env(gateway_environ(redis_url, migrated))
    gw = Gateway(settings=settings, keyring=settings.keyring(), clock=clock)
    port = await gw.start()
    target = f"127.0.0.1:{port}"
    channel = authenticated_channel(target, tenants.keys["internal"])
    yield RunningGateway(gw, target, channel, pb_grpc.RedemptionServiceStub(channel), tenants)
    await channel.close()
    await gw.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def inv(
    redis_url: str, migrated: str, clock: ManualClock, redis: Redis, tenants: Tenants
) -> AsyncIterator[InventoryGateway]:
    """The real server stack with InventoryService, on the test clock, decrypting with the order helpers' ring."""
    async with inventory_gateway(redis_url, migrated, clock, tenants) as running:
        yield running
