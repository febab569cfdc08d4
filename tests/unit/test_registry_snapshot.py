"""The in-memory registry: who a key authenticates as, and how a snapshot takes changes."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from gateway.tenancy import api_keys
from gateway.tenancy.api_keys import ParsedKey
from gateway.tenancy.model import ApiKey, Brand, Client, RiskPolicyRow, Role, Status, Store, Terminal
from gateway.tenancy.snapshot import Registry, RegistryChanges

NOW = datetime(2026, 6, 1, tzinfo=UTC)
BRAND = Brand(7, "acme", "Acme", Status.ACTIVE)
OTHER_BRAND = Brand(8, "globex", "Globex", Status.ACTIVE)
STORE = Store(3, 7, "s-1", "Main street", 48.85, 2.35, "Europe/Paris", Status.ACTIVE, 300.0)
TERMINAL = Terminal(5, 7, 3, "till-1", Status.ACTIVE, None, None)


def _client(client_id: str, *, brand_id: int | None = 7, role: Role = Role.POS) -> Client:
    return Client(client_id, brand_id, role, None, None, "a till", NOW - timedelta(days=1), None)


def _key(
    client_id: str, *, expires_at: datetime | None = None, revoked_at: datetime | None = None
) -> tuple[ApiKey, ParsedKey]:
    parsed, _ = api_keys.generate("test")
    stored = api_keys.secret_hash(parsed.key_id, parsed.secret)
    return ApiKey(parsed.key_id, client_id, stored, NOW - timedelta(days=1), expires_at, revoked_at), parsed


@pytest.fixture
def registry() -> Registry:
    return Registry.empty().apply(
        RegistryChanges(
            version=4,
            brands=(BRAND, OTHER_BRAND),
            stores=(STORE,),
            terminals=(TERMINAL,),
            clients=(_client("cl_pos"), _client("cl_platform", brand_id=None, role=Role.PLATFORM)),
        )
    )


def _with(registry: Registry, *changes: ApiKey | Client | Brand) -> Registry:
    return registry.apply(
        RegistryChanges(
            version=registry.version + 1,
            keys=tuple(c for c in changes if isinstance(c, ApiKey)),
            clients=tuple(c for c in changes if isinstance(c, Client)),
            brands=tuple(c for c in changes if isinstance(c, Brand)),
        )
    )


def test_a_good_key_authenticates_as_its_client(registry: Registry) -> None:
    key, parsed = _key("cl_pos")
    client = _with(registry, key).authenticate(parsed, NOW)
    assert client is not None and client.id == "cl_pos" and client.role is Role.POS


def test_a_platform_client_has_no_brand_to_check(registry: Registry) -> None:
    key, parsed = _key("cl_platform")
    client = _with(registry, key).authenticate(parsed, NOW)
    assert client is not None and client.brand_id is None


def test_a_wrong_secret_is_refused(registry: Registry) -> None:
    key, parsed = _key("cl_pos")
    wrong = ParsedKey(parsed.env, parsed.key_id, "a" * 32)
    assert _with(registry, key).authenticate(wrong, NOW) is None


def test_an_unknown_key_id_is_refused(registry: Registry) -> None:
    key, _ = _key("cl_pos")
    _, unknown = _key("cl_pos")
    assert _with(registry, key).authenticate(unknown, NOW) is None


def test_a_revoked_key_is_refused(registry: Registry) -> None:
    key, parsed = _key("cl_pos", revoked_at=NOW + timedelta(hours=1))  # revocation does not wait for its timestamp
    assert _with(registry, key).authenticate(parsed, NOW) is None


def test_a_rotated_out_key_works_until_its_grace_ends(registry: Registry) -> None:
    key, parsed = _key("cl_pos", expires_at=NOW + timedelta(hours=1))
    current = _with(registry, key)
    assert current.authenticate(parsed, NOW) is not None
    assert current.authenticate(parsed, NOW + timedelta(minutes=59)) is not None
    assert current.authenticate(parsed, NOW + timedelta(hours=1)) is None
    assert current.authenticate(parsed, NOW + timedelta(days=1)) is None


def test_a_revoked_client_is_refused(registry: Registry) -> None:
    key, parsed = _key("cl_pos")
    revoked = dataclasses.replace(_client("cl_pos"), revoked_at=NOW)
    current = _with(registry, key, revoked)
    assert current.authenticate(parsed, NOW) is None
    assert current.active_client("cl_pos") is None


def test_a_disabled_brand_refuses_its_clients(registry: Registry) -> None:
    key, parsed = _key("cl_pos")
    current = _with(registry, key, dataclasses.replace(BRAND, status=Status.DISABLED))
    assert current.authenticate(parsed, NOW) is None
    assert current.active_client("cl_pos") is None
    assert current.active_client("cl_platform") is not None


def test_a_client_of_an_unknown_brand_is_refused(registry: Registry) -> None:
    key, parsed = _key("cl_orphan")
    assert _with(registry, key, _client("cl_orphan", brand_id=99)).authenticate(parsed, NOW) is None


def test_lookups_by_id_and_by_natural_key(registry: Registry) -> None:
    assert registry.version == 4
    assert registry.brand(7) == BRAND and registry.brand_by_slug("globex") == OTHER_BRAND
    assert registry.store(3) == STORE and registry.store_by_external(7, "s-1") == STORE
    assert registry.store_by_external(8, "s-1") is None  # another brand's external id space
    assert registry.terminal(5) == TERMINAL and registry.terminal_by_external(3, "till-1") == TERMINAL
    assert registry.brand(99) is None and registry.brand_by_slug("nope") is None
    assert registry.terminal_by_external(4, "till-1") is None


def test_apply_upserts_without_changing_the_old_snapshot(registry: Registry) -> None:
    renamed = dataclasses.replace(STORE, name="High street", external_id="s-2")
    newer = registry.apply(RegistryChanges(version=5, stores=(renamed,)))
    assert newer.version == 5 and newer.store(3) == renamed
    assert newer.store_by_external(7, "s-2") == renamed and newer.store_by_external(7, "s-1") is None
    assert registry.store(3) == STORE and registry.version == 4  # the old snapshot is untouched
    assert newer.brand(7) == BRAND  # rows not in the change are kept
    with pytest.raises(TypeError):
        newer.stores[4] = renamed  # type: ignore[index]


def test_a_full_load_replaces_the_snapshot(registry: Registry) -> None:
    replaced = registry.apply(RegistryChanges(version=2, full=True, brands=(BRAND,)))
    assert replaced.version == 2 and replaced.brand(8) is None and replaced.store(3) is None


def test_nothing_new_keeps_the_same_snapshot(registry: Registry) -> None:
    assert registry.apply(RegistryChanges(version=4)) is registry


def test_risk_policies_are_upserted_and_a_cleared_one_is_dropped(registry: Registry) -> None:
    brand_wide = RiskPolicyRow(7, 0, {"modes": {"lockout": "shadow"}})
    campaign = RiskPolicyRow(7, 12, {"modes": {"lockout": "off"}})
    first = registry.apply(RegistryChanges(version=5, risk_policies=(brand_wide, campaign)))
    assert dict(first.risk_policies) == {(7, 0): brand_wide.document, (7, 12): campaign.document}
    cleared = first.apply(RegistryChanges(version=6, risk_policies=(RiskPolicyRow(7, 12, {}),)))
    assert dict(cleared.risk_policies) == {(7, 0): brand_wide.document}
    assert (7, 12) in first.risk_policies  # the old snapshot is untouched
    with pytest.raises(TypeError):
        cleared.risk_policies[(7, 0)]["modes"] = {}  # type: ignore[index]
