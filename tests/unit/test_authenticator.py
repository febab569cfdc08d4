"""Authenticator against an in-memory registry: verified callers are cached per snapshot, never past a key's
expiry, and never across a registry change (a revocation)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from gateway.domain import PermissionDenied, Unauthenticated
from gateway.grpc_api.auth import Authenticator
from gateway.tenancy import api_keys
from gateway.tenancy.model import ApiKey, Brand, Client, Role, Status
from gateway.tenancy.snapshot import Registry, RegistryChanges

T0 = datetime(2026, 6, 1, tzinfo=UTC)
REDEEM = "/redemption.v1.RedemptionService/Redeem"
STREAM = "/redemption.v1.RedemptionService/RedeemStream"


class Source:
    def __init__(self, registry: Registry) -> None:
        self.current = registry

    def registry(self) -> Registry:
        return self.current


def registry(*, expires_at: datetime | None = None, revoked: bool = False) -> tuple[Registry, str]:
    parsed, plaintext = api_keys.generate("test")
    client = Client("cl_aaaaaaaaaa", 1, Role.POS, None, None, "till", T0, T0 if revoked else None)
    key = ApiKey(parsed.key_id, client.id, api_keys.secret_hash(parsed.key_id, parsed.secret), T0, expires_at, None)
    brand = Brand(1, "default", "Default brand", Status.ACTIVE)
    changes = RegistryChanges(version=2, full=True, brands=(brand,), clients=(client,), keys=(key,))
    return Registry.empty().apply(changes), plaintext


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def test_a_cached_caller_is_refused_once_its_key_expires() -> None:
    snapshot, key = registry(expires_at=T0 + timedelta(seconds=10))
    now = [T0]
    auth = Authenticator(Source(snapshot), now=lambda: now[0])
    assert auth.caller(REDEEM, bearer(key), None).client_id == "cl_aaaaaaaaaa"
    assert auth.caller(REDEEM, bearer(key), None).client_id == "cl_aaaaaaaaaa"  # from the cache
    now[0] = T0 + timedelta(seconds=10)
    with pytest.raises(Unauthenticated):
        auth.caller(REDEEM, bearer(key), None)


def test_a_registry_change_empties_the_cache() -> None:
    snapshot, key = registry()
    source = Source(snapshot)
    auth = Authenticator(source, now=lambda: T0)
    auth.caller(REDEEM, bearer(key), None)
    client = snapshot.clients["cl_aaaaaaaaaa"]
    source.current = snapshot.apply(RegistryChanges(version=3, clients=(dataclasses.replace(client, revoked_at=T0),)))
    with pytest.raises(Unauthenticated):
        auth.caller(REDEEM, bearer(key), None)


def test_roles_are_checked_on_every_call_cached_or_not() -> None:
    snapshot, key = registry()
    auth = Authenticator(Source(snapshot), now=lambda: T0)
    auth.caller(REDEEM, bearer(key), None)
    with pytest.raises(PermissionDenied):
        auth.caller(STREAM, bearer(key), None)


def test_another_key_is_not_served_from_the_cache() -> None:
    snapshot, key = registry()
    auth = Authenticator(Source(snapshot), now=lambda: T0)
    auth.caller(REDEEM, bearer(key), None)
    with pytest.raises(Unauthenticated):
        auth.caller(REDEEM, bearer(key[:-1] + ("a" if key[-1] != "a" else "b")), None)
