"""redemption.v1.AdminService: protobuf → one registry administration call (gateway/tenancy/admin_store.py) →
protobuf, nothing more. admin_store validates, scopes by brand, writes and audits; this decides only for which
brand the caller acts:

    admin                          its own brand
    platform naming x-rgw-brand    that brand
    platform naming none           every brand (None) - but what is created for a brand needs one

Another brand's entity is NotFoundError inside admin_store, exactly like a missing one. Connections and the
announcement of each committed change are admin_access.py's. Keys are never logged. Risk policies are
admin_risk.py's; lockouts (in Redis, on the gateway's client) lockouts.py's - both always for one named brand.
Campaigns and store groups are admin_campaigns.py's (gateway/campaigns/admin.py), on the gateway's Redis.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from functools import partial

import asyncpg
import grpc
from google.rpc import code_pb2

from gateway.campaigns.issuance import IssuanceError, IssuanceIncomplete
from gateway.clock import Clock, SystemClock
from gateway.coderefs import KeyRing
from gateway.domain import Caller, PermissionDenied
from gateway.grpc_api import admin_messages as msg
from gateway.grpc_api.admin_access import RegistryAccess
from gateway.grpc_api.admin_campaigns import CampaignRpcs
from gateway.grpc_api.admin_inventory import InventoryRpcs
from gateway.grpc_api.admin_inventory_status import get_inventory_status
from gateway.grpc_api.auth import ALL_BRANDS, BRAND_METADATA, current_caller
from gateway.grpc_api.errors import fault_for, request_id_of, rpc_boundary, status_for, to_status
from gateway.grpc_api.stream_replies import send_limit
from gateway.inventory.crypto import SecretRing
from gateway.inventory.importing import ImportIncomplete, SecretImportError
from gateway.pb.redemption.v1 import admin_pb2 as pb
from gateway.pb.redemption.v1 import admin_pb2_grpc as pb_grpc
from gateway.redis_client import RedisClient
from gateway.settings import Settings
from gateway.tenancy import admin_risk, admin_store, lockouts
from gateway.tenancy.model import DEFAULT_RADIUS_M, Role
from gateway.validation import FieldViolation, InvalidRequest

BRAND_FIELD = f"metadata.{BRAND_METADATA}"
DOCUMENT_JSON = "document_json"
DEFAULT_AUDIT_LIMIT = 100
# A list reply (a page) is at most this big, and never above the server's send limit: the send limit is sized for
# the largest stream reply (stream_replies.py, ~450 KB), far more than a page of stores or audit entries needs.
MAX_PAGE_BYTES = 64 * 1024


def _actor(caller: Caller) -> str:
    return f"client:{caller.client_id}"


def _scope(caller: Caller) -> int | None:
    """The brand the caller administers; None: every brand (a platform client that named none)."""
    return None if caller.brand_id == ALL_BRANDS else caller.brand_id


def _brand_to_create_in(caller: Caller) -> int:
    """The brand a new store or terminal belongs to: a platform client must name it."""
    return _named_brand(caller, "the brand to create it in (id or slug)")


def _named_brand(caller: Caller, what: str = "the brand (id or slug)") -> int:
    """The one brand a call acts for: a platform client must name it."""
    if caller.brand_id == ALL_BRANDS:
        raise InvalidRequest([FieldViolation(BRAND_FIELD, f"is required: {what}")])
    return caller.brand_id


def _platform_only(caller: Caller, what: str) -> None:
    if caller.role != Role.PLATFORM:
        raise PermissionDenied(f"only a platform client may {what}")


def _client_scope(caller: Caller, role: str) -> int | None:
    """The brand of a new client. A platform client belongs to none (whatever brand the caller named) and only
    the platform may make one; for the others, a platform caller that named no brand passes None and admin_store
    refuses it as a bad `brand_id` - alongside every other bad field."""
    if role == Role.PLATFORM:
        _platform_only(caller, "create a platform client")
        return None
    return _scope(caller)


def _request_fields(exc: InvalidRequest) -> InvalidRequest:
    """admin_store's `brand_id` is, in this API, the x-rgw-brand metadata: name what the caller can change."""
    renamed = [FieldViolation(BRAND_FIELD, v.description) if v.field == "brand_id" else v for v in exc.violations]
    return InvalidRequest(renamed)


def _document_fields(exc: InvalidRequest) -> InvalidRequest:
    """admin_risk's `document.<path>` is, in this API, inside `document_json`."""
    prefix = admin_risk.DOCUMENT_FIELD
    renamed = [
        FieldViolation(DOCUMENT_JSON + v.field.removeprefix(prefix), v.description)
        if v.field.startswith(prefix) else v
        for v in exc.violations
    ]  # fmt: skip
    return InvalidRequest(renamed)


class AdminServicer(pb_grpc.AdminServiceServicer):
    """The gRPC face of the registry's administration."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: RedisClient,
        *,
        key_env: str,
        rotation_grace: timedelta,
        reply_limit: int,
        risk_redis: RedisClient | None = None,
        keyring: KeyRing,
        clock: Clock | None = None,
        secret_ring: SecretRing | None = None,
    ) -> None:
        self._registry = RegistryAccess(pool, redis)
        self._stock_redis = redis
        self._clock = clock or SystemClock()
        self._redis = risk_redis or redis  # where the risk engine's lockouts live (RGW_RISK_REDIS_URL)
        self._key_env = key_env
        self._rotation_grace = rotation_grace
        self._budget = reply_limit - 64  # room for the reply's own fields beside its list
        self._campaigns = CampaignRpcs(self._registry, pool, redis, keyring=keyring, clock=clock or SystemClock(),
                                       reply_budget=self._budget)  # fmt: skip
        self._inventory = InventoryRpcs(self._registry, redis, ring=secret_ring, reply_budget=self._budget)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        pool: asyncpg.Pool,
        redis: RedisClient,
        risk_redis: RedisClient | None = None,
        *,
        keyring: KeyRing | None = None,
        clock: Clock | None = None,
    ) -> AdminServicer:
        """The servicer of a gateway: new keys in RGW_KEY_ENV, list pages within MAX_PAGE_BYTES, codes of
        new campaigns and batches under `keyring` (default: the settings'), campaign statistics on `clock`
        (default: the wall clock)."""
        grace = timedelta(seconds=settings.key_rotation_grace_seconds)
        limit = min(MAX_PAGE_BYTES, send_limit(settings.max_message_bytes, settings.stream_max_items))
        ring = settings.secret_ring() if settings.secret_keys else None
        return cls(pool, redis, key_env=settings.key_env, rotation_grace=grace, reply_limit=limit,
                   risk_redis=risk_redis, keyring=keyring or settings.keyring(), clock=clock,
                   secret_ring=ring)  # fmt: skip

    async def close(self) -> None:
        """Stop announcing committed changes in the background."""
        await self._registry.close()

    # ------------------------------------------------------------------------------------------------ brands

    @rpc_boundary
    async def CreateBrand(
        self, request: pb.CreateBrandRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateBrandResponse:
        caller = current_caller()
        _platform_only(caller, "create a brand")
        made = await self._registry.commit(
            partial(admin_store.create_brand, actor=_actor(caller), slug=request.slug, name=request.name)
        )
        return pb.CreateBrandResponse(brand=msg.brand(made))

    @rpc_boundary
    async def ListBrands(
        self, request: pb.ListBrandsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListBrandsResponse:
        brands = await self._registry.read(partial(admin_store.list_brands, brand_id=_scope(current_caller())))
        sent, token = msg.page(brands, request, msg.id_key, msg.brand, self._budget)
        return pb.ListBrandsResponse(brands=sent, next_page_token=token)

    @rpc_boundary
    async def SetBrandStatus(
        self, request: pb.SetBrandStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetBrandStatusResponse:
        caller = current_caller()
        _platform_only(caller, "enable or disable a brand")
        changed = await self._registry.commit(partial(
            admin_store.set_brand_status, actor=_actor(caller), brand_id=request.brand_id,
            status=msg.status_name(request.status),
        ))  # fmt: skip
        return pb.SetBrandStatusResponse(brand=msg.brand(changed))

    # ------------------------------------------------------------------------------------------------ stores

    @rpc_boundary
    async def CreateStore(
        self, request: pb.CreateStoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateStoreResponse:
        caller = current_caller()
        made = await self._registry.commit(partial(
            admin_store.create_store, actor=_actor(caller), brand_id=_brand_to_create_in(caller),
            external_id=request.external_id, name=request.name, latitude=request.latitude,
            longitude=request.longitude, time_zone=request.time_zone,
            radius_m=request.radius_m or DEFAULT_RADIUS_M,
        ))  # fmt: skip
        return pb.CreateStoreResponse(store=msg.store(made))

    @rpc_boundary
    async def ListStores(
        self, request: pb.ListStoresRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListStoresResponse:
        stores = await self._registry.read(partial(admin_store.list_stores, brand_id=_scope(current_caller())))
        sent, token = msg.page(stores, request, msg.id_key, msg.store, self._budget)
        return pb.ListStoresResponse(stores=sent, next_page_token=token)

    @rpc_boundary
    async def SetStoreStatus(
        self, request: pb.SetStoreStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetStoreStatusResponse:
        caller = current_caller()
        changed = await self._registry.commit(partial(
            admin_store.set_store_status, actor=_actor(caller), brand_id=_scope(caller), store_id=request.store_id,
            status=msg.status_name(request.status),
        ))  # fmt: skip
        return pb.SetStoreStatusResponse(store=msg.store(changed))

    @rpc_boundary
    async def UpdateStore(
        self, request: pb.UpdateStoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateStoreResponse:
        caller = current_caller()
        fields = ("name", "latitude", "longitude", "time_zone", "radius_m")
        changed = await self._registry.commit(partial(
            admin_store.update_store, actor=_actor(caller), brand_id=_scope(caller), store_id=request.store_id,
            **{name: msg.optional(request, name) for name in fields},
        ))  # fmt: skip
        return pb.UpdateStoreResponse(store=msg.store(changed))

    # --------------------------------------------------------------------------------------------- terminals

    @rpc_boundary
    async def CreateTerminal(
        self, request: pb.CreateTerminalRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateTerminalResponse:
        caller = current_caller()
        made = await self._registry.commit(partial(
            admin_store.create_terminal, actor=_actor(caller), brand_id=_brand_to_create_in(caller),
            store_id=request.store_id, external_id=request.external_id,
        ))  # fmt: skip
        return pb.CreateTerminalResponse(terminal=msg.terminal(made))

    @rpc_boundary
    async def ListTerminals(
        self, request: pb.ListTerminalsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTerminalsResponse:
        terminals = await self._registry.read(partial(
            admin_store.list_terminals, brand_id=_scope(current_caller()), store_id=request.store_id or None
        ))  # fmt: skip
        sent, token = msg.page(terminals, request, msg.id_key, msg.terminal, self._budget)
        return pb.ListTerminalsResponse(terminals=sent, next_page_token=token)

    @rpc_boundary
    async def SetTerminalStatus(
        self, request: pb.SetTerminalStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetTerminalStatusResponse:
        caller = current_caller()
        changed = await self._registry.commit(partial(
            admin_store.set_terminal_status, actor=_actor(caller), brand_id=_scope(caller),
            terminal_id=request.terminal_id, status=msg.status_name(request.status),
        ))  # fmt: skip
        return pb.SetTerminalStatusResponse(terminal=msg.terminal(changed))

    # ----------------------------------------------------------------------------------------------- clients

    @rpc_boundary
    async def CreateClient(
        self, request: pb.CreateClientRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateClientResponse:
        caller = current_caller()
        role = msg.role_name(request.role)
        create = partial(
            admin_store.create_client, actor=_actor(caller), brand_id=_client_scope(caller, role), role=role,
            label=request.label, store_id=request.store_id or None, terminal_id=request.terminal_id or None,
            env=self._key_env,
        )  # fmt: skip
        try:
            issued = await self._registry.commit(create)
        except InvalidRequest as exc:
            raise _request_fields(exc) from None
        return pb.CreateClientResponse(api_key=issued.plaintext, key_id=issued.key_id, client=msg.client(issued.client))

    @rpc_boundary
    async def ListClients(
        self, request: pb.ListClientsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListClientsResponse:
        clients = await self._registry.read(partial(admin_store.list_clients, brand_id=_scope(current_caller())))
        sent, token = msg.page(clients, request, msg.client_key, msg.client, self._budget)
        return pb.ListClientsResponse(clients=sent, next_page_token=token)

    @rpc_boundary
    async def RevokeClient(
        self, request: pb.RevokeClientRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeClientResponse:
        caller = current_caller()
        revoked = await self._registry.commit(partial(
            admin_store.revoke_client, actor=_actor(caller), brand_id=_scope(caller), client_id=request.client_id
        ))  # fmt: skip
        return pb.RevokeClientResponse(client=msg.client(revoked))

    @rpc_boundary
    async def RotateClientKey(
        self, request: pb.RotateClientKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RotateClientKeyResponse:
        caller = current_caller()
        grace = request.grace.ToTimedelta() if request.HasField("grace") else self._rotation_grace
        issued = await self._registry.commit(partial(
            admin_store.rotate_client_key, actor=_actor(caller), brand_id=_scope(caller),
            client_id=request.client_id, grace=grace, env=self._key_env,
        ))  # fmt: skip
        return pb.RotateClientKeyResponse(
            api_key=issued.plaintext, key_id=issued.key_id, client=msg.client(issued.client),
            previous_keys_expire_at=msg.timestamp(issued.previous_keys_expire_at),
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------------- audit

    @rpc_boundary
    async def ListAuditLog(
        self, request: pb.ListAuditLogRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAuditLogResponse:
        limit = request.limit or DEFAULT_AUDIT_LIMIT
        entries = await self._registry.read(
            partial(admin_store.list_audit, brand_id=_scope(current_caller()), limit=limit)
        )
        sent = msg.fitting([msg.audit_entry(entry) for entry in entries], self._budget)
        return pb.ListAuditLogResponse(entries=sent, truncated=len(sent) < len(entries))

    # -------------------------------------------------------------------------------------------------- risk

    @rpc_boundary
    async def SetRiskPolicy(
        self, request: pb.SetRiskPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetRiskPolicyResponse:
        caller = current_caller()
        set_policy = partial(
            admin_risk.set_risk_policy, actor=_actor(caller), brand_id=_named_brand(caller),
            campaign_id=request.campaign_id, document=msg.document(request.document_json, DOCUMENT_JSON),
        )  # fmt: skip
        try:
            stored = await self._registry.commit_versioned(set_policy)
        except InvalidRequest as exc:
            raise _document_fields(exc) from None
        return pb.SetRiskPolicyResponse(
            document_json=msg.document_json(stored.value.document), registry_version=stored.version
        )

    @rpc_boundary
    async def GetRiskPolicy(
        self, request: pb.GetRiskPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRiskPolicyResponse:
        brand_id = _named_brand(current_caller())
        levels = await self._registry.read(
            partial(admin_risk.get_risk_policy, brand_id=brand_id, campaign_id=request.campaign_id)
        )
        return pb.GetRiskPolicyResponse(
            document_json=msg.document_json(levels.stored.document),
            effective_json=msg.document_json(admin_risk.effective_document(levels)),
        )

    @rpc_boundary
    async def ListLockouts(
        self, request: pb.ListLockoutsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListLockoutsResponse:
        found = await lockouts.list_lockouts(self._redis, brand_id=_named_brand(current_caller()))
        sent = msg.fitting([msg.lockout(entry) for entry in found.entries], self._budget)
        return pb.ListLockoutsResponse(lockouts=sent, truncated=found.truncated or len(sent) < len(found.entries))

    @rpc_boundary
    async def LiftLockout(
        self, request: pb.LiftLockoutRequest, context: grpc.aio.ServicerContext
    ) -> pb.LiftLockoutResponse:
        caller = current_caller()
        lifted = await self._registry.read(partial(
            lockouts.lift_audited, redis=self._redis, actor=_actor(caller), brand_id=_named_brand(caller),
            scope=request.scope, subject=request.subject,
        ))  # fmt: skip
        return pb.LiftLockoutResponse(lifted=lifted)

    # --------------------------------------------------------------------------------------------- campaigns

    @rpc_boundary
    async def CreateCampaign(
        self, request: pb.CreateCampaignRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateCampaignResponse:
        caller = current_caller()
        return await self._campaigns.create(request, actor=_actor(caller), brand_id=_brand_to_create_in(caller))

    @rpc_boundary
    async def UpdateCampaign(
        self, request: pb.UpdateCampaignRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateCampaignResponse:
        caller = current_caller()
        return await self._campaigns.update(request, actor=_actor(caller), brand_id=_scope(caller))

    @rpc_boundary
    async def SetCampaignStatus(
        self, request: pb.SetCampaignStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetCampaignStatusResponse:
        caller = current_caller()
        return await self._campaigns.set_status(request, actor=_actor(caller), brand_id=_scope(caller))

    @rpc_boundary
    async def ListCampaigns(
        self, request: pb.ListCampaignsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCampaignsResponse:
        return await self._campaigns.list_page(request, brand_id=_scope(current_caller()))

    @rpc_boundary
    async def GetCampaignStats(
        self, request: pb.GetCampaignStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCampaignStatsResponse:
        return await self._campaigns.stats(request, brand_id=_scope(current_caller()))

    @rpc_boundary
    async def SetStoreGroup(
        self, request: pb.SetStoreGroupRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetStoreGroupResponse:
        caller = current_caller()
        return await self._campaigns.set_store_group(request, actor=_actor(caller), brand_id=_named_brand(caller))

    async def GenerateCodes(
        self, request: pb.GenerateCodesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateCodesResponse]:
        """A server stream: the boundary is here, not rpc_boundary (which wraps unary calls). Issued but not all
        loaded is UNAVAILABLE (`rgw codes resume` finishes it); a batch still loading or a key not configured is
        FAILED_PRECONDITION."""
        try:
            caller = current_caller()
            async for reply in self._campaigns.generate(request, actor=_actor(caller), brand_id=_scope(caller)):
                yield reply
        except grpc.aio.AbortError:
            raise
        except IssuanceIncomplete as exc:
            await context.abort_with_status(to_status(code_pb2.UNAVAILABLE, str(exc)))
        except IssuanceError as exc:
            await context.abort_with_status(to_status(code_pb2.FAILED_PRECONDITION, str(exc)))
        except Exception as exc:
            await context.abort_with_status(status_for(fault_for(exc, request_id_of(context))))

    # ------------------------------------------------------------------------------------------------ inventory

    @rpc_boundary
    async def CreateSku(self, request: pb.CreateSkuRequest, context: grpc.aio.ServicerContext) -> pb.CreateSkuResponse:
        return await self._inventory.create_sku(request, brand_id=_named_brand(current_caller()))

    @rpc_boundary
    async def ListSkus(self, request: pb.ListSkusRequest, context: grpc.aio.ServicerContext) -> pb.ListSkusResponse:
        return await self._inventory.list_skus(request, brand_id=_scope(current_caller()))

    async def ImportSecrets(
        self, request_iterator: AsyncIterator[pb.ImportSecretsRequest], context: grpc.aio.ServicerContext
    ) -> pb.ImportSecretsResponse:
        """A client stream: the boundary is here. Imported but not all loaded is UNAVAILABLE (`rgw inventory
        resume` finishes it); an import the keys do not allow is FAILED_PRECONDITION."""
        try:
            caller = current_caller()
            return await self._inventory.import_secrets(
                request_iterator, actor=_actor(caller), brand_id=_named_brand(caller)
            )
        except grpc.aio.AbortError:
            raise
        except ImportIncomplete as exc:
            await context.abort_with_status(to_status(code_pb2.UNAVAILABLE, str(exc)))
        except SecretImportError as exc:
            await context.abort_with_status(to_status(code_pb2.FAILED_PRECONDITION, str(exc)))
        except Exception as exc:
            await context.abort_with_status(status_for(fault_for(exc, request_id_of(context))))
        raise AssertionError("unreachable: abort_with_status raises")

    @rpc_boundary
    async def GetInventoryStatus(
        self, request: pb.GetInventoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetInventoryStatusResponse:
        return await get_inventory_status(
            request, registry=self._registry, redis=self._stock_redis, clock=self._clock,
            brand_id=_scope(current_caller()),
        )  # fmt: skip


def register_admin_service(server: grpc.aio.Server, servicer: AdminServicer) -> None:
    """Serve AdminService on `server`."""
    pb_grpc.add_AdminServiceServicer_to_server(servicer, server)
