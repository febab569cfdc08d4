"""AdminService's inventory RPCs (CreateSku, ListSkus, ImportSecrets): protobuf -> one gateway/inventory call ->
protobuf. The servicer (admin_servicer.py) decides for which brand the caller acts and delegates here; another
brand's SKU is NOT_FOUND, exactly like a missing one. A secret is never logged nor echoed: a refused record is
named by its position and reason only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC
from functools import partial

import asyncpg

from gateway.grpc_api import admin_campaign_messages as cmsg
from gateway.grpc_api import admin_messages as msg
from gateway.grpc_api.admin_access import RegistryAccess
from gateway.inventory import importing, model
from gateway.inventory.crypto import SecretRing
from gateway.pb.redemption.v1 import admin_pb2 as pb
from gateway.redis_client import RedisClient
from gateway.validation import FieldViolation, InvalidRequest

MAX_LISTED_REFUSED = 1000


def sku_message(sku: model.Sku) -> pb.Sku:
    return pb.Sku(id=sku.id, brand_id=sku.brand_id, code=sku.code, name=sku.name, reuse=sku.reuse, shards=sku.shards,
                  max_per_order=sku.max_per_order, low_stock=sku.low_stock)  # fmt: skip


def _record(position: int, record: pb.SecretRecord) -> importing.Record:
    expires = record.expires_at.ToDatetime(tzinfo=UTC) if record.HasField("expires_at") else None
    return importing.Record(position, record.sku, record.supplier, record.secret, record.cost, record.currency,
                            expires)  # fmt: skip


class InventoryRpcs:
    """The inventory admin RPCs, for a brand the servicer has decided."""

    def __init__(
        self, registry: RegistryAccess, redis: RedisClient, *, ring: SecretRing | None, reply_budget: int
    ) -> None:
        self._registry = registry
        self._redis = redis
        self._ring = ring
        self._budget = reply_budget

    async def create_sku(self, request: pb.CreateSkuRequest, *, brand_id: int) -> pb.CreateSkuResponse:
        s = request.sku
        made = await self._registry.read(partial(
            _create, redis=self._redis, brand_id=brand_id, code=s.code, name=s.name, reuse=s.reuse or 1,
            shards=s.shards or 1, max_per_order=s.max_per_order or 100, low_stock=s.low_stock,
        ))  # fmt: skip
        return pb.CreateSkuResponse(sku=sku_message(made))

    async def list_skus(self, request: pb.ListSkusRequest, *, brand_id: int | None) -> pb.ListSkusResponse:
        size, after = msg.page_size(request), cmsg.after_id(request.page_token)
        found = await self._registry.read(partial(model.list_skus, brand_id=brand_id, after_id=after, limit=size + 1))
        sent = msg.fitting([sku_message(s) for s in found[:size]], self._budget)
        token = f"{found[len(sent) - 1].id:020d}" if len(sent) < len(found) else ""
        return pb.ListSkusResponse(skus=sent, next_page_token=token)

    async def import_secrets(
        self, requests: AsyncIterator[pb.ImportSecretsRequest], *, actor: str, brand_id: int
    ) -> pb.ImportSecretsResponse:
        """The options first, then records (at most importing.MAX_RECORDS). SecretImportError / ImportIncomplete
        pass through for the servicer to map (FAILED_PRECONDITION / UNAVAILABLE)."""
        if self._ring is None:
            raise importing.SecretImportError("card-secret keys are not configured (RGW_SECRET_KEYS)")
        ring = self._ring
        options: pb.ImportOptions | None = None
        records: list[importing.Record] = []
        async for request in requests:
            kind = request.WhichOneof("item")
            if options is None:
                if kind != "options":
                    raise InvalidRequest([FieldViolation("options", "the first message must carry the options")])
                options = request.options
            elif kind != "record":
                raise InvalidRequest([FieldViolation("options", "only the first message carries options")])
            elif len(records) >= importing.MAX_RECORDS:
                raise InvalidRequest([FieldViolation("record", f"at most {importing.MAX_RECORDS} records")])
            else:
                records.append(_record(len(records) + 1, request.record))
        if options is None:
            raise InvalidRequest([FieldViolation("options", "is required (the first message)")])
        all_or_nothing = options.all_or_nothing
        result = await self._registry.read(partial(
            importing.import_records, redis=self._redis, ring=ring, brand_id=brand_id, records=records,
            all_or_nothing=all_or_nothing, actor=actor,
        ))  # fmt: skip
        refused = [pb.RefusedRecord(position=r.position, reason=r.reason, field=r.field)
                   for r in result.refused[:MAX_LISTED_REFUSED]]  # fmt: skip
        return pb.ImportSecretsResponse(batch_id=str(result.batch_id or ""), imported=result.imported,
                                        refused=refused, refused_count=len(result.refused))  # fmt: skip


async def _create(conn: asyncpg.Connection, **fields: object) -> model.Sku:
    return await model.create_sku(conn, **fields)  # type: ignore[arg-type]
