"""Who is calling, on every call: an API key (`authorization: Bearer rgw_…` metadata) or the client certificate of
an mTLS connection, checked against the in-process registry (no round trip), then whether the client's role may
call this method, and for which brand it acts. The servicer receives the result as plain data (`current_caller`).

Health checking and reflection stay open: probes and tools need no key.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Protocol

import grpc

from gateway.domain import Caller, PermissionDenied, RegistryNotReady, Unauthenticated
from gateway.gateway_metrics import AUTH_FAILURES
from gateway.grpc_api.errors import fault_for, request_id_of, status_for
from gateway.grpc_api.interceptors import WrappingInterceptor
from gateway.tenancy import api_keys
from gateway.tenancy.model import Client, Role, Status
from gateway.tenancy.snapshot import Registry
from gateway.validation import FieldViolation, InvalidRequest

_REDEMPTION = "/redemption.v1.RedemptionService/"
_ADMIN = "/redemption.v1.AdminService/"
_INVENTORY = "/redemption.v1.InventoryService/"
OPEN_METHODS = frozenset({
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
})  # fmt: skip
_TILL = frozenset({Role.POS, Role.INTERNAL, Role.PLATFORM})
# Deny by default: a method missing here is PERMISSION_DENIED for every role.
ROLES_BY_METHOD: dict[str, frozenset[Role]] = {
    _REDEMPTION + "Redeem": _TILL,
    _REDEMPTION + "Validate": _TILL,
    _REDEMPTION + "GetCode": _TILL,
    _REDEMPTION + "RedeemStream": frozenset({Role.INTERNAL, Role.PLATFORM}),
    _REDEMPTION + "Reverse": _TILL,
    # order systems: their own brand (internal) or the brand named in x-rgw-brand (platform)
    **{
        _INVENTORY + name: frozenset({Role.INTERNAL, Role.PLATFORM})
        for name in ("Dispense", "DispenseStream", "Hold", "Confirm", "Release")
    },
}
ADMIN_ROLES = frozenset({Role.ADMIN, Role.PLATFORM})
BRAND_METADATA = "x-rgw-brand"
ALL_BRANDS = 0  # Caller.brand_id of a platform client on AdminService that named no brand
_MAX_CREDENTIAL_CHARS = 256

_CALLER: ContextVar[Caller] = ContextVar("rgw_caller")
_REFUSALS = (Unauthenticated, PermissionDenied, InvalidRequest, RegistryNotReady)


def current_caller() -> Caller:
    """The authenticated caller of the call being handled (set by AuthInterceptor before the handler runs)."""
    return _CALLER.get()


def current_caller_or_none() -> Caller | None:
    """The authenticated caller, or None before (or without) authentication - for the access log."""
    return _CALLER.get(None)


def roles_for(method: str) -> frozenset[Role]:
    """The roles that may call `method`."""
    if method.startswith(_ADMIN):
        return ADMIN_ROLES
    return ROLES_BY_METHOD.get(method, frozenset())


class RegistrySource(Protocol):
    """Where the current registry comes from (gateway/tenancy/watcher.py); raises RegistryNotReady."""

    def registry(self) -> Registry: ...


PeerIdentity = Callable[[grpc.aio.ServicerContext], "str | None"]


def _bearer(metadata: Sequence[tuple[str, Any]]) -> str | None:
    for key, value in metadata:
        if key == "authorization":
            return value if isinstance(value, str) else ""
    return None


def _metadata_value(metadata: Sequence[tuple[str, Any]], name: str) -> str:
    for key, value in metadata:
        if key == name and isinstance(value, str):
            return value
    return ""


class Authenticator:
    """Turns a call's credentials into a Caller, or raises Unauthenticated / PermissionDenied / InvalidRequest."""

    def __init__(self, source: RegistrySource, *, now: Callable[[], datetime] | None = None) -> None:
        self._source = source
        self._now = now or (lambda: datetime.now(UTC))
        self._recent = _Recent()

    def caller(self, method: str, metadata: Sequence[tuple[str, Any]], peer_client_id: str | None) -> Caller:
        """Who may make this call, for which brand (brand 0: a platform client administering every brand)."""
        registry = self._source.registry()
        admin = method.startswith(_ADMIN)
        header = _bearer(metadata)
        seen = (_digest(header), _metadata_value(metadata, BRAND_METADATA), peer_client_id, admin)
        now = self._now()
        caller = self._recent.get(registry, seen, now)
        if caller is None:
            client = self._client(registry, header, peer_client_id)
            caller = self._as_caller(registry, client, metadata, brand_required=not admin)
            self._recent.put(registry, seen, caller, _valid_until(registry, header, now))
        if caller.role not in roles_for(method):
            raise PermissionDenied(f"the {caller.role} role may not call {method.rsplit('/', 1)[-1]}")
        return caller

    def _client(self, registry: Registry, header: str | None, peer_client_id: str | None) -> Client:
        by_key = self._by_key(registry, header) if header is not None else None
        by_cert = registry.active_client(peer_client_id) if peer_client_id else None
        if peer_client_id and by_cert is None:
            raise Unauthenticated("revoked or unknown certificate")
        if by_key is not None and by_cert is not None and by_key.id != by_cert.id:
            raise Unauthenticated("mismatched key and certificate")
        client = by_cert or by_key
        if client is None:
            raise Unauthenticated("missing")
        return client

    def _by_key(self, registry: Registry, header: str) -> Client:
        scheme, _, token = header[:_MAX_CREDENTIAL_CHARS].partition(" ")
        parsed = api_keys.parse(token.strip()) if scheme.lower() == "bearer" else None
        if parsed is None:
            raise Unauthenticated("malformed")
        client = registry.authenticate(parsed, self._now())
        if client is None:
            raise Unauthenticated("invalid")
        return client

    def _as_caller(
        self, registry: Registry, client: Client, metadata: Sequence[tuple[str, Any]], *, brand_required: bool
    ) -> Caller:
        brand_id = client.brand_id
        if brand_id is None:
            named = _metadata_value(metadata, BRAND_METADATA)
            brand_id = self._acting_brand(registry, named) if named or brand_required else ALL_BRANDS
        store = registry.store(client.store_id) if client.store_id is not None else None
        terminal = registry.terminal(client.terminal_id) if client.terminal_id is not None else None
        if any(bound is not None and bound.status != Status.ACTIVE for bound in (store, terminal)):
            raise PermissionDenied("the store or terminal this API key is bound to is disabled")
        return Caller(
            client_id=client.id,
            brand_id=brand_id,
            role=str(client.role),
            store_id=store.external_id if store is not None else "",
            terminal_id=terminal.external_id if terminal is not None else "",
        )

    @staticmethod
    def _acting_brand(registry: Registry, named: str) -> int:
        """A platform client names the brand it acts for in `x-rgw-brand` metadata (id or slug)."""
        named = named[:64]
        brand = registry.brand(int(named)) if named.isdigit() else registry.brand_by_slug(named)
        if brand is None:
            field = f"metadata.{BRAND_METADATA}"
            reason = "names no brand" if named else "is required for a platform client: the brand it acts for"
            raise InvalidRequest([FieldViolation(field, reason)])
        return brand.id


_FOREVER = datetime.max.replace(tzinfo=UTC)
# (digest of the authorization header, x-rgw-brand, certificate client id, an AdminService call)
Seen = tuple[bytes, str, "str | None", bool]
_RECENT_MAX = 10_000


def _digest(header: str | None) -> bytes:
    """What the cache keeps of a credential: a keyed-free digest, never the key itself."""
    return b"" if header is None else hashlib.blake2b(header.encode(), digest_size=16).digest()


def _valid_until(registry: Registry, header: str | None, now: datetime) -> datetime:
    """How long a verified key may be trusted without checking again: until it expires (a rotated-out key)."""
    if header is None:
        return _FOREVER
    parsed = api_keys.parse(header[:_MAX_CREDENTIAL_CHARS].partition(" ")[2].strip())
    key = registry.keys.get(parsed.key_id) if parsed is not None else None
    return key.expires_at if key is not None and key.expires_at is not None else _FOREVER


class _Recent:
    """Callers verified against the current registry snapshot: the same credentials on the next call cost a dict
    lookup instead of parsing, hashing and resolving them again (~10 µs). Any registry change is a new snapshot,
    which empties the cache, so a revocation is never served from it; a key's expiry is checked on every hit.
    Failures are never cached. Keyed by a digest of the credentials, never the key."""

    def __init__(self) -> None:
        self._registry: Registry | None = None
        self._callers: dict[Seen, tuple[Caller, datetime]] = {}

    def get(self, registry: Registry, seen: Seen, now: datetime) -> Caller | None:
        if registry is not self._registry:
            self._registry, self._callers = registry, {}
            return None
        hit = self._callers.get(seen)
        return hit[0] if hit is not None and now < hit[1] else None

    def put(
        self, registry: Registry, seen: tuple[bytes, str, str | None, bool], caller: Caller, until: datetime
    ) -> None:
        if registry is self._registry:
            if len(self._callers) >= _RECENT_MAX:
                self._callers.clear()
            self._callers[seen] = (caller, until)


_FAILURE_KINDS: tuple[tuple[type[Exception], Callable[[], None]], ...] = tuple(
    (kind, AUTH_FAILURES.labels(name).inc)
    for kind, name in (
        (Unauthenticated, "unauthenticated"),
        (PermissionDenied, "permission_denied"),
        (InvalidRequest, "invalid_brand"),
        (RegistryNotReady, "registry_not_ready"),
    )
)


async def _refuse(exc: Exception, context: grpc.aio.ServicerContext) -> None:
    for kind, count in _FAILURE_KINDS:
        if isinstance(exc, kind):
            count()
            break
    await context.abort_with_status(status_for(fault_for(exc, request_id_of(context))))


class AuthInterceptor(WrappingInterceptor):
    """Authenticates and authorises every call but health and reflection, before the handler runs."""

    def __init__(self, authenticator: Authenticator, peer_identity: PeerIdentity | None = None) -> None:
        super().__init__()
        self._authenticator = authenticator
        self._peer_identity = peer_identity

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if method in OPEN_METHODS:
            return handler
        return self._wrap(handler, method)

    def _authenticate(self, method: str, context: grpc.aio.ServicerContext) -> Caller:
        peer = self._peer_identity(context) if self._peer_identity is not None else None
        return self._authenticator.caller(method, context.invocation_metadata() or (), peer)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        kind = _KINDS[(handler.request_streaming, handler.response_streaming)]
        behaviour = getattr(handler, kind)
        if handler.response_streaming and inspect.isasyncgenfunction(behaviour):
            return handler._replace(**{kind: self._streaming(behaviour, method)})
        return handler._replace(**{kind: self._single(behaviour, method)})

    def _single(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def authenticated(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                caller = self._authenticate(method, context)
            except _REFUSALS as exc:
                await _refuse(exc, context)
            _CALLER.set(caller)
            return await behaviour(request, context)

        return authenticated

    def _streaming(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def authenticated(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                caller = self._authenticate(method, context)
            except _REFUSALS as exc:
                await _refuse(exc, context)
            _CALLER.set(caller)
            async for response in behaviour(request, context):
                yield response

        return authenticated


_KINDS = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}
