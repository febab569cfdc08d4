"""AdminService's campaign RPCs: protobuf -> one gateway/campaigns/admin.py call -> protobuf. The servicer
(admin_servicer.py) decides for which brand the caller acts and delegates here; admin.py validates, scopes by
brand (another brand's campaign is NOT_FOUND, exactly like a missing one), writes, audits and publishes.

GenerateCodes streams what the issuance generator (gateway/campaigns/issuance.py generate_stream) yields:
CodesChunk messages of at most CHUNK_CODES codes, then one GenerationDone once Redis holds every code. The batch
is one Postgres transaction that commits only after the last chunk was handed to the stream: a call cancelled
before that issues nothing. A code is never logged."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from functools import partial

import asyncpg
from redis import exceptions as redis_errors

from gateway.campaigns import admin, issuance, stats
from gateway.campaigns.issuance import BatchDone
from gateway.clock import Clock
from gateway.coderefs import KeyRing
from gateway.domain import RegistryNotReady, StoreUnavailable
from gateway.grpc_api import admin_campaign_messages as cmsg
from gateway.grpc_api import admin_messages as msg
from gateway.grpc_api.admin_access import RegistryAccess
from gateway.pb.redemption.v1 import admin_pb2 as pb
from gateway.redis_client import RedisClient
from gateway.validation import FieldViolation, InvalidRequest

CHUNK_CODES = 1000
_REDIS_DOWN = (redis_errors.RedisError, OSError, TimeoutError)
_CONNECT_TIMEOUT_S = 5.0
_DB_UNREACHABLE = (OSError, TimeoutError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError)


class CampaignRpcs:
    """The campaign RPCs, for a brand the servicer has decided (None: every brand, a platform caller's)."""

    def __init__(
        self,
        registry: RegistryAccess,
        pool: asyncpg.Pool,
        redis: RedisClient,
        *,
        keyring: KeyRing,
        clock: Clock,
        reply_budget: int,
    ) -> None:
        self._registry = registry
        self._pool = pool
        self._redis = redis
        self._keyring = keyring
        self._clock = clock
        self._budget = reply_budget

    async def create(
        self, request: pb.CreateCampaignRequest, *, actor: str, brand_id: int
    ) -> pb.CreateCampaignResponse:
        fields = cmsg.create_fields(request.campaign)
        create = partial(
            admin.create_campaign, redis=self._redis, actor=actor, brand_id=brand_id, key_id=self._keyring.active_id,
            fields=fields,
        )  # fmt: skip
        try:
            made = await self._registry.commit(create)
        except InvalidRequest as exc:
            raise cmsg.in_campaign(exc) from None
        return pb.CreateCampaignResponse(campaign=cmsg.campaign(made))

    async def update(
        self, request: pb.UpdateCampaignRequest, *, actor: str, brand_id: int | None
    ) -> pb.UpdateCampaignResponse:
        changes = cmsg.update_fields(request.campaign, list(request.update_mask.paths))
        update = partial(
            admin.update_campaign, redis=self._redis, actor=actor, brand_id=brand_id,
            campaign_id=request.campaign.id, changes=changes,
        )  # fmt: skip
        try:
            changed = await self._registry.commit(update)
        except InvalidRequest as exc:
            raise cmsg.in_campaign(exc) from None
        return pb.UpdateCampaignResponse(campaign=cmsg.campaign(changed))

    async def set_status(
        self, request: pb.SetCampaignStatusRequest, *, actor: str, brand_id: int | None
    ) -> pb.SetCampaignStatusResponse:
        changed = await self._registry.commit(partial(
            admin.set_status, redis=self._redis, actor=actor, brand_id=brand_id, campaign_id=request.campaign_id,
            status=cmsg.status_name(request.status),
        ))  # fmt: skip
        return pb.SetCampaignStatusResponse(campaign=cmsg.campaign(changed))

    async def list_page(self, request: pb.ListCampaignsRequest, *, brand_id: int | None) -> pb.ListCampaignsResponse:
        size, after = msg.page_size(request), cmsg.after_id(request.page_token)
        found = await self._registry.read(
            partial(admin.list_campaigns, brand_id=brand_id, after_id=after, limit=size + 1)
        )
        sent = msg.fitting([cmsg.campaign(c) for c in found[:size]], self._budget)
        token = cmsg.page_key(found[len(sent) - 1]) if len(sent) < len(found) else ""  # "": the last page
        return pb.ListCampaignsResponse(campaigns=sent, next_page_token=token)

    async def stats(self, request: pb.GetCampaignStatsRequest, *, brand_id: int | None) -> pb.GetCampaignStatsResponse:
        campaign = await self._registry.read(
            partial(admin.get_campaign, campaign_id=request.campaign_id, brand_id=brand_id)
        )
        try:
            figures = await stats.campaign_stats(self._redis, campaign, now_ms=self._clock.now_ms())
        except _REDIS_DOWN as exc:
            raise StoreUnavailable(f"Redis is unavailable ({type(exc).__name__})") from None
        return cmsg.stats(figures, campaign)

    async def set_store_group(
        self, request: pb.SetStoreGroupRequest, *, actor: str, brand_id: int
    ) -> pb.SetStoreGroupResponse:
        group = await self._registry.commit(partial(
            admin.set_store_group, redis=self._redis, actor=actor, brand_id=brand_id, name=request.name,
            stores=list(request.stores),
        ))  # fmt: skip
        return pb.SetStoreGroupResponse(name=group.name, stores=group.stores, campaign_ids=group.campaign_ids)

    async def generate(
        self, request: pb.GenerateCodesRequest, *, actor: str, brand_id: int | None
    ) -> AsyncIterator[pb.GenerateCodesResponse]:
        """The codes, CHUNK_CODES at a time, then GenerationDone. Issuance's own refusals pass through
        (IssuanceError: a batch of the campaign still loading, a key not configured; IssuanceIncomplete: issued,
        not all loaded) for the servicer to map."""
        if not 1 <= request.count <= issuance.MAX_CODES:
            raise InvalidRequest([FieldViolation("count", f"must be from 1 to {issuance.MAX_CODES}")])
        face_value = request.face_value if request.HasField("face_value") else None
        try:
            conn = await self._pool.acquire(timeout=_CONNECT_TIMEOUT_S)
        except _DB_UNREACHABLE as exc:
            raise RegistryNotReady(f"the database is unreachable: {type(exc).__name__}") from None
        try:
            campaign = await admin.get_campaign(conn, request.campaign_id, brand_id)
            try:
                issuance.check_face_value(campaign, face_value)
            except ValueError as exc:
                raise InvalidRequest([FieldViolation("face_value", str(exc))]) from None
            stream = issuance.generate_stream(
                conn, self._redis, self._keyring, campaign, request.count, face_value=face_value, chunk=CHUNK_CODES,
                actor=actor,
            )  # fmt: skip
            async with contextlib.aclosing(stream):
                async for item in stream:
                    if isinstance(item, list):
                        yield pb.GenerateCodesResponse(codes=pb.CodesChunk(codes=item))
                    elif isinstance(item, BatchDone):
                        yield pb.GenerateCodesResponse(done=pb.GenerationDone(batch_id=str(item.batch_id),
                                                                             count=item.codes))  # fmt: skip
        finally:
            await self._pool.release(conn)
