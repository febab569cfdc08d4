"""Order-path (Dispense / Hold / Confirm / Release) test helpers: SKUs in Postgres, stock put straight into Redis
per gateway/inventory/layout.py (sealed by crypto.SecretRing with the order path's associated data), a gateway
that decrypts with the same ring, and readers of the outbox."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from redis.asyncio import Redis

from gateway.clock import ManualClock
from gateway.grpc_api.client_auth import authenticated_channel
from gateway.grpc_api.server import Gateway
from gateway.inventory import layout
from gateway.inventory.crypto import SecretRing
from gateway.inventory.service import secret_aad
from gateway.pb.redemption.v1 import inventory_pb2 as pb
from gateway.pb.redemption.v1 import inventory_pb2_grpc as pb_grpc
from gateway.settings import Settings
from tests.conftest import T0_MS, gateway_environ

if TYPE_CHECKING:  # the conftest imports this module for its `inv` fixture
    from tests.integration.conftest import Tenants

DAY_MS = 86_400_000
FAR = T0_MS + 365 * DAY_MS


def secret_ring() -> SecretRing:
    return SecretRing({"s1": bytes(range(32))}, "s1", bytes(range(200, 232)))


@dataclass
class Stock:
    """One SKU and the secrets put into its shards: secret id -> plaintext."""

    brand_id: int
    sku_id: int
    code: str
    shards: int
    ring: SecretRing
    plain: dict[int, str] = field(default_factory=dict)
    next_id: int = 1

    async def add(
        self, redis: Redis, count: int = 1, *, supplier: str = "sup-a", cost: int = 100, expires_ms: int = FAR,
        reuse: int = 1, shard: int = 0,
    ) -> list[int]:  # fmt: skip
        """`count` secrets into one shard (every index), as the loader would; returns their ids."""
        ids = []
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(count):
                sid, self.next_id = self.next_id, self.next_id + 1
                plain = f"SECRET-{self.code}-{sid:06d}"
                sealed = self.ring.encrypt(plain, secret_aad(self.brand_id, self.sku_id, sid))
                nonce, ct = base64.b64encode(sealed.nonce).decode(), base64.b64encode(sealed.ciphertext).decode()
                record = (supplier, cost, "CNY", expires_ms, reuse, 0, sealed.key_id, nonce, ct)
                pipe.hset(layout.secrets_key(self.sku_id, shard), str(sid), "|".join(map(str, record)))
                pipe.zadd(layout.by_expiry_key(self.sku_id, shard), {str(sid): expires_ms})
                pipe.zadd(layout.by_cost_key(self.sku_id, shard), {str(sid): cost})
                pipe.zadd(layout.by_supplier_key(self.sku_id, shard, supplier), {str(sid): expires_ms})
                self.plain[sid] = plain
                ids.append(sid)
            await pipe.execute()
        return ids


async def create_sku(
    db: asyncpg.Connection, redis: Redis, ring: SecretRing, code: str, *, brand_id: int = 1, reuse: int = 1,
    max_per_order: int = 100, shards: int = 1,
) -> Stock:  # fmt: skip
    """A SKU row and its shards' meta in Redis (no secrets yet)."""
    sku_id = await db.fetchval(
        "INSERT INTO skus (brand_id, code, name, reuse, shards, max_per_order) VALUES ($1, $2, $2, $3, $4, $5)"
        " RETURNING id",
        brand_id, code, reuse, shards, max_per_order,
    )  # fmt: skip
    for shard in range(shards):
        await redis.hset(
            layout.meta_key(sku_id, shard), mapping={"brand": brand_id, "reuse": reuse, "max": max_per_order}
        )
    return Stock(brand_id, int(sku_id), code, shards, ring)


@dataclass
class InventoryGateway:
    """A running gateway with InventoryService, and a stub authenticated as brand 1's internal client."""

    gateway: Gateway
    target: str
    channel: grpc.aio.Channel
    stub: pb_grpc.InventoryServiceStub
    tenants: Tenants
    ring: SecretRing

    def stub_as(self, name: str, **extra: str) -> tuple[grpc.aio.Channel, pb_grpc.InventoryServiceStub]:
        """A new channel (close it) and stub authenticated as the tenants' client `name`."""
        metadata = [(key.replace("_", "-"), value) for key, value in extra.items()]
        channel = authenticated_channel(self.target, self.tenants.keys[name], extra=metadata)
        return channel, pb_grpc.InventoryServiceStub(channel)


@contextlib.asynccontextmanager
async def inventory_gateway(
    redis_url: str, database_url: str, clock: ManualClock, tenants: Tenants
) -> AsyncIterator[InventoryGateway]:
    """The real server stack on a free port, on the test clock, decrypting with secret_ring()."""
    ring = secret_ring()
    settings = Settings.from_env(gateway_environ(redis_url, database_url))
    gw = Gateway(settings=settings, keyring=settings.keyring(), clock=clock, secret_keys=ring)
    port = await gw.start()
    target = f"127.0.0.1:{port}"
    channel = authenticated_channel(target, tenants.keys["internal"])
    try:
        yield InventoryGateway(gw, target, channel, pb_grpc.InventoryServiceStub(channel), tenants, ring)
    finally:
        await channel.close()
        await gw.stop()


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason a failed call carried."""
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def dispense(order: str, sku: str, quantity: int = 1, **extra: object) -> pb.DispenseRequest:
    return pb.DispenseRequest(order_id=order, sku=sku, quantity=quantity, **extra)  # type: ignore[arg-type]


def hold(order: str, sku: str, quantity: int = 1, *, ttl_s: int = 0, **extra: object) -> pb.HoldRequest:
    request = pb.HoldRequest(order_id=order, sku=sku, quantity=quantity, **extra)  # type: ignore[arg-type]
    if ttl_s:
        request.ttl.FromSeconds(ttl_s)
    return request


def taken(response: pb.DispenseResponse | pb.ConfirmResponse) -> list[tuple[int, int]]:
    """(secret id, use number) of each secret in a response."""
    return [(s.secret_id, s.use_number) for s in response.secrets]


async def outbox_events(redis: Redis, stock: Stock, shard: int = 0) -> list[dict[str, str]]:
    """The shard's outbox events, as layout.EVENT dicts."""
    entries: Any = await redis.xrange(layout.outbox_key(stock.sku_id, shard))
    return [dict(zip(layout.EVENT, fields[layout.EVENT_FORMAT].split("|"), strict=True)) for _, fields in entries]


def event_secrets(event: dict[str, str]) -> list[tuple[int, int]]:
    """(secret id, use number) of an event's secrets."""
    if not event["secrets"]:
        return []
    return [(int(p.split(";")[0]), int(p.split(";")[1])) for p in event["secrets"].split(",")]


async def available(redis: Redis, stock: Stock, shard: int = 0) -> set[int]:
    """Secret ids in the earliest-expiry index (expired ones included)."""
    members: Any = await redis.zrange(layout.by_expiry_key(stock.sku_id, shard), 0, -1)
    return {int(m) for m in members}
