"""The registry's administration on real Postgres: one transaction per change, validated, versioned, audited,
brand-isolated; incremental loads; the version announcement on real Redis."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from gateway.tenancy import admin_store as admin
from gateway.tenancy import api_keys
from gateway.tenancy.loader import load_registry
from gateway.tenancy.model import AlreadyExists, NotFoundError, Role
from gateway.validation import InvalidRequest
from tests.integration.registry_helpers import (
    ACTOR,
    Tenant,
    audit_count,
    registry_state,
    registry_version,
    two_tenants,
)

DAY = timedelta(days=1)


@pytest_asyncio.fixture(loop_scope="session")
async def tenants(db: asyncpg.Connection) -> tuple[Tenant, Tenant]:
    return await two_tenants(db)


# ---------------------------------------------------------------------------------------- versioned and audited


async def test_every_change_bumps_the_version_and_writes_one_audit_row(db: asyncpg.Connection) -> None:
    created: dict[str, Any] = {}

    async def brand() -> admin.Committed[Any]:
        result = await admin.create_brand(db, actor=ACTOR, slug="acme", name="Acme")
        created["brand"] = result.value.id
        return result

    async def store() -> admin.Committed[Any]:
        result = await admin.create_store(
            db, actor=ACTOR, brand_id=created["brand"], external_id="s1", name="S1", latitude=0, longitude=0,
            time_zone="UTC",
        )  # fmt: skip
        created["store"] = result.value.id
        return result

    async def terminal() -> admin.Committed[Any]:
        result = await admin.create_terminal(
            db, actor=ACTOR, brand_id=created["brand"], store_id=created["store"], external_id="t1"
        )
        created["terminal"] = result.value.id
        return result

    async def client() -> admin.Committed[Any]:
        result = await admin.create_client(
            db, actor=ACTOR, brand_id=created["brand"], role=Role.POS, label="till", terminal_id=created["terminal"],
            env="test",
        )  # fmt: skip
        created["client"] = result.value.client.id
        return result

    steps: list[tuple[str, str, str, Callable[[], Awaitable[admin.Committed[Any]]]]] = [
        ("brand.create", "brand", "", brand),
        ("store.create", "store", "", store),
        ("terminal.create", "terminal", "", terminal),
        ("client.create", "client", "", client),
        ("brand.set_status", "brand", "brand", lambda: admin.set_brand_status(
            db, actor=ACTOR, brand_id=created["brand"], status="disabled")),
        ("store.set_status", "store", "store", lambda: admin.set_store_status(
            db, actor=ACTOR, brand_id=created["brand"], store_id=created["store"], status="disabled")),
        ("terminal.set_status", "terminal", "terminal", lambda: admin.set_terminal_status(
            db, actor=ACTOR, brand_id=None, terminal_id=created["terminal"], status="disabled")),
        ("client.rotate_key", "client", "client", lambda: admin.rotate_client_key(
            db, actor=ACTOR, brand_id=created["brand"], client_id=created["client"], grace=DAY, env="test")),
        ("client.revoke", "client", "client", lambda: admin.revoke_client(
            db, actor=ACTOR, brand_id=created["brand"], client_id=created["client"])),
    ]  # fmt: skip
    for action, entity, existing, step in steps:
        version, audits = await registry_version(db), await audit_count(db)
        result = await step()
        assert result.version == version + 1 == await registry_version(db), action
        assert await audit_count(db) == audits + 1, action
        (entry,) = await admin.list_audit(db, brand_id=None, limit=1)
        assert (entry.action, entry.entity, entry.actor, entry.version) == (action, entity, ACTOR, result.version)
        assert entry.brand_id == created["brand"]
        assert entry.after is not None and (entry.before is None) == (not existing), action
        if existing:
            assert entry.entity_id == str(created[existing])
            assert entry.before != entry.after, action


async def test_the_audit_records_before_and_after(db: asyncpg.Connection, tenants: tuple[Tenant, Tenant]) -> None:
    acme, _ = tenants
    await admin.set_store_status(
        db, actor="cl_admin", brand_id=acme.brand.id, store_id=acme.store.id, status="disabled"
    )
    (entry,) = await admin.list_audit(db, brand_id=acme.brand.id, limit=1)
    assert entry.actor == "cl_admin" and entry.action == "store.set_status"
    assert entry.before is not None and entry.after is not None
    assert (entry.before["status"], entry.after["status"]) == ("active", "disabled")
    assert entry.after["time_zone"] == "Europe/Paris" and entry.after["external_id"] == "store-1"


async def test_audit_rows_never_hold_a_key_or_its_hash(db: asyncpg.Connection, tenants: tuple[Tenant, Tenant]) -> None:
    acme, _ = tenants
    created = await admin.create_client(db, actor=ACTOR, brand_id=acme.brand.id, role="pos", label="till", env="live")
    client_id = created.value.client.id
    rotated = await admin.rotate_client_key(
        db, actor=ACTOR, brand_id=acme.brand.id, client_id=client_id, grace=DAY, env="live"
    )
    await admin.revoke_client(db, actor=ACTOR, brand_id=acme.brand.id, client_id=client_id)
    audit_text = " ".join(
        await db.fetchval("SELECT array_agg(coalesce(before::text, '') || after::text) FROM audit_log")
    )
    hashes = [bytes(r["secret_hash"]) for r in await db.fetch("SELECT secret_hash FROM api_keys")]
    assert len(hashes) == 2
    for plaintext in (created.value.plaintext, rotated.value.plaintext):
        parsed = api_keys.parse(plaintext)
        assert parsed is not None and parsed.key_id in audit_text  # the key id is what identifies a key
        assert plaintext not in audit_text and parsed.secret not in audit_text
    for secret_hash in hashes:
        assert secret_hash.hex() not in audit_text and secret_hash.hex().upper() not in audit_text
    assert "secret" not in audit_text and "hash" not in audit_text
    assert created.value.plaintext not in repr(created) and rotated.value.plaintext not in repr(rotated)


# ------------------------------------------------------------------------------------------------- refused input

NAN = math.nan
BAD_INPUT: list[tuple[str, dict[str, Any], set[str]]] = [
    ("create_brand", {"slug": "Bad Slug", "name": ""}, {"slug", "name"}),
    ("create_brand", {"slug": "-leading-dash", "name": " " * 3}, {"slug", "name"}),
    ("create_brand", {"slug": "a" * 64, "name": "x" * 201}, {"slug", "name"}),
    ("create_brand", {"slug": "ok", "name": "new\nline"}, {"name"}),
    (
        "create_store",
        {"external_id": "has space", "name": "", "latitude": NAN, "longitude": 181.0, "time_zone": "Mars/Olympus"},
        {"external_id", "name", "latitude", "longitude", "time_zone"},
    ),
    (
        "create_store",
        {"external_id": "x" * 65, "name": "ok", "latitude": 91, "longitude": math.inf, "time_zone": "localtime"},
        {"external_id", "latitude", "longitude", "time_zone"},
    ),
    (
        "create_store",
        {"external_id": "ok", "name": "ok", "latitude": 0, "longitude": 0, "time_zone": "../../etc/passwd"},
        {"time_zone"},
    ),
    ("create_terminal", {"external_id": ""}, {"external_id"}),
    ("create_client", {"role": "root", "label": "", "env": "prod"}, {"role", "label", "env"}),
    ("create_client", {"role": "pos", "label": "ok", "env": "test", "brand_id": None}, {"brand_id"}),
    ("create_client", {"role": "platform", "label": "ok", "env": "test"}, {"brand_id"}),
    ("create_client", {"role": "admin", "label": "ok", "env": "test", "store": "own"}, {"store_id"}),
    ("create_client", {"role": "pos", "label": "", "env": "test", "terminal": "other"}, {"terminal_id", "label"}),
    ("create_client", {"role": "pos", "label": "ok", "env": "test", "store": "other"}, {"store_id"}),
    (
        "create_client",
        {"role": "internal", "label": "ok", "env": "test", "store": "other", "terminal": "own"},
        {"store_id"},
    ),
    ("set_store_status", {"status": "deleted"}, {"status"}),
]


async def _call_bad(db: asyncpg.Connection, acme: Tenant, globex: Tenant, op: str, args: dict[str, Any]) -> None:
    args = dict(args)
    own = {"own": acme, "other": globex}
    if op in {"create_store", "create_terminal", "create_client"}:
        args.setdefault("brand_id", acme.brand.id)
    if op == "create_terminal":
        args["store_id"] = acme.store.id
    if "store" in args:
        args["store_id"] = own[args.pop("store")].store.id
    if "terminal" in args:
        args["terminal_id"] = own[args.pop("terminal")].terminal.id
    if op == "set_store_status":
        args.update(brand_id=acme.brand.id, store_id=acme.store.id)
    await getattr(admin, op)(db, actor=ACTOR, **args)


@pytest.mark.parametrize(
    ("op", "args", "fields"), BAD_INPUT, ids=[f"{op}-{i}" for i, (op, _, _) in enumerate(BAD_INPUT)]
)
async def test_bad_input_names_every_bad_field_and_changes_nothing(
    db: asyncpg.Connection, tenants: tuple[Tenant, Tenant], op: str, args: dict[str, Any], fields: set[str]
) -> None:
    acme, globex = tenants
    before = await registry_state(db)
    with pytest.raises(InvalidRequest) as refused:
        await _call_bad(db, acme, globex, op, args)
    assert {v.field for v in refused.value.violations} == fields
    assert await registry_state(db) == before


async def test_a_refused_rotation_changes_nothing(db: asyncpg.Connection, tenants: tuple[Tenant, Tenant]) -> None:
    acme, _ = tenants
    created = await admin.create_client(db, actor=ACTOR, brand_id=acme.brand.id, role="pos", label="t", env="test")
    client_id = created.value.client.id
    before = await registry_state(db)
    for grace, env in ((-DAY, "test"), (DAY, "prod")):
        with pytest.raises(InvalidRequest):
            await admin.rotate_client_key(
                db, actor=ACTOR, brand_id=acme.brand.id, client_id=client_id, grace=grace, env=env
            )
    await admin.revoke_client(db, actor=ACTOR, brand_id=acme.brand.id, client_id=client_id)
    revoked = await registry_state(db)
    assert revoked != before
    with pytest.raises(InvalidRequest, match="client_id: is revoked"):
        await admin.rotate_client_key(
            db, actor=ACTOR, brand_id=acme.brand.id, client_id=client_id, grace=DAY, env="test"
        )
    assert await registry_state(db) == revoked


async def test_list_audit_refuses_a_bad_limit(db: asyncpg.Connection) -> None:
    for limit in (0, -1, admin.MAX_AUDIT_LIMIT + 1):
        with pytest.raises(InvalidRequest, match="limit"):
            await admin.list_audit(db, brand_id=None, limit=limit)


# ------------------------------------------------------------------------------------ duplicates, missing, brands


async def test_duplicates_are_already_exists_and_change_nothing(
    db: asyncpg.Connection, tenants: tuple[Tenant, Tenant]
) -> None:
    acme, globex = tenants
    before = await registry_state(db)
    with pytest.raises(AlreadyExists, match="acme"):
        await admin.create_brand(db, actor=ACTOR, slug="acme", name="Another")
    with pytest.raises(AlreadyExists, match="store-1"):
        await admin.create_store(
            db, actor=ACTOR, brand_id=acme.brand.id, external_id="store-1", name="Again", latitude=1, longitude=1,
            time_zone="UTC",
        )  # fmt: skip
    with pytest.raises(AlreadyExists, match="till-1"):
        await admin.create_terminal(
            db, actor=ACTOR, brand_id=acme.brand.id, store_id=acme.store.id, external_id="till-1"
        )
    assert await registry_state(db) == before
    # external ids are per brand (stores) and per store (terminals)
    assert globex.store.external_id == acme.store.external_id
    store_2 = await admin.create_store(
        db, actor=ACTOR, brand_id=acme.brand.id, external_id="store-2", name="Two", latitude=1, longitude=1,
        time_zone="America/New_York",
    )  # fmt: skip
    await admin.create_terminal(
        db, actor=ACTOR, brand_id=acme.brand.id, store_id=store_2.value.id, external_id="till-1"
    )


async def _not_found(call: Awaitable[object]) -> str:
    with pytest.raises(NotFoundError) as refused:
        await call
    return str(refused.value)


async def test_another_brands_entities_look_exactly_like_missing_ones(
    db: asyncpg.Connection, tenants: tuple[Tenant, Tenant]
) -> None:
    acme, globex = tenants
    mine = acme.brand.id
    theirs = await admin.create_client(db, actor=ACTOR, brand_id=globex.brand.id, role="pos", label="t", env="test")
    before = await registry_state(db)
    pairs: list[tuple[Callable[[Any], Awaitable[object]], object, object]] = [
        (lambda sid: admin.set_store_status(db, actor=ACTOR, brand_id=mine, store_id=sid, status="disabled"),
         globex.store.id, 999_999),
        (lambda sid: admin.create_terminal(db, actor=ACTOR, brand_id=mine, store_id=sid, external_id="t9"),
         globex.store.id, 999_999),
        (lambda tid: admin.set_terminal_status(db, actor=ACTOR, brand_id=mine, terminal_id=tid, status="disabled"),
         globex.terminal.id, 999_999),
        (lambda cid: admin.revoke_client(db, actor=ACTOR, brand_id=mine, client_id=cid),
         theirs.value.client.id, "cl_aaaaaaaaaa"),
        (lambda cid: admin.rotate_client_key(db, actor=ACTOR, brand_id=mine, client_id=cid, grace=DAY, env="test"),
         theirs.value.client.id, "cl_aaaaaaaaaa"),
    ]  # fmt: skip
    for call, other_brands, missing in pairs:
        assert await _not_found(call(other_brands)) == await _not_found(call(missing))
    assert await _not_found(admin.set_brand_status(db, actor=ACTOR, brand_id=424242, status="active"))
    assert await _not_found(
        admin.create_store(
            db, actor=ACTOR, brand_id=424242, external_id="s", name="S", latitude=0, longitude=0, time_zone="UTC"
        )
    )
    assert await registry_state(db) == before


async def test_listings_are_scoped_to_the_brand(db: asyncpg.Connection, tenants: tuple[Tenant, Tenant]) -> None:
    acme, globex = tenants
    await admin.create_client(db, actor=ACTOR, brand_id=acme.brand.id, role="admin", label="a", env="test")
    await admin.create_client(db, actor=ACTOR, brand_id=globex.brand.id, role="pos", label="g", env="test")
    await admin.create_client(db, actor=ACTOR, brand_id=None, role="platform", label="p", env="test")
    assert [s.id for s in await admin.list_stores(db, brand_id=acme.brand.id)] == [acme.store.id]
    assert len(await admin.list_stores(db, brand_id=None)) == 2
    assert [t.id for t in await admin.list_terminals(db, brand_id=acme.brand.id)] == [acme.terminal.id]
    assert await admin.list_terminals(db, brand_id=acme.brand.id, store_id=globex.store.id) == []
    assert [c.label for c in await admin.list_clients(db, brand_id=globex.brand.id)] == ["g"]
    assert sorted(c.label for c in await admin.list_clients(db, brand_id=None)) == ["a", "g", "p"]
    assert [b.slug for b in await admin.list_brands(db, brand_id=acme.brand.id)] == ["acme"]
    assert [b.slug for b in await admin.list_brands(db)] == ["default", "acme", "globex"]
    audit = await admin.list_audit(db, brand_id=acme.brand.id)
    assert audit and all(e.brand_id == acme.brand.id for e in audit)
    assert [e.id for e in audit] == sorted((e.id for e in audit), reverse=True)
    platform = (await admin.list_audit(db, brand_id=None, limit=1))[0]
    assert platform.brand_id is None and platform.after is not None and platform.after["role"] == "platform"


# -------------------------------------------------------------------------------------------------------- clients


async def test_client_bindings(db: asyncpg.Connection, tenants: tuple[Tenant, Tenant]) -> None:
    acme, _ = tenants
    till = await admin.create_client(
        db, actor=ACTOR, brand_id=acme.brand.id, role="pos", label="t", terminal_id=acme.terminal.id, env="test"
    )
    assert (till.value.client.store_id, till.value.client.terminal_id) == (acme.store.id, acme.terminal.id)
    store = await admin.create_client(
        db, actor=ACTOR, brand_id=acme.brand.id, role="internal", label="s", store_id=acme.store.id, env="test"
    )
    assert (store.value.client.store_id, store.value.client.terminal_id) == (acme.store.id, None)
    platform = await admin.create_client(db, actor=ACTOR, brand_id=None, role="platform", label="p", env="live")
    assert platform.value.client.brand_id is None and platform.value.plaintext.startswith("rgw_live_")
    assert platform.value.client.id.startswith("cl_") and len(platform.value.client.id) == 13


async def test_revoking_a_client_refuses_all_its_keys(db: asyncpg.Connection, tenants: tuple[Tenant, Tenant]) -> None:
    acme, _ = tenants
    created = await admin.create_client(db, actor=ACTOR, brand_id=acme.brand.id, role="pos", label="t", env="test")
    client_id = created.value.client.id
    rotated = await admin.rotate_client_key(db, actor=ACTOR, brand_id=None, client_id=client_id, grace=DAY, env="test")
    now = await db.fetchval("SELECT now()")
    keys_ = [api_keys.parse(k) for k in (created.value.plaintext, rotated.value.plaintext)]
    registry = await load_registry(db)
    assert all(registry.authenticate(k, now) is not None for k in keys_ if k is not None)
    revoked = await admin.revoke_client(db, actor=ACTOR, brand_id=acme.brand.id, client_id=client_id)
    assert revoked.value.revoked_at is not None
    registry = await load_registry(db)
    assert all(registry.authenticate(k, now) is None for k in keys_ if k is not None)
    assert all(key.revoked_at is not None for key in registry.keys.values())


async def test_a_rotated_out_key_works_during_its_grace_and_not_after(
    db: asyncpg.Connection, tenants: tuple[Tenant, Tenant]
) -> None:
    acme, _ = tenants
    created = await admin.create_client(db, actor=ACTOR, brand_id=acme.brand.id, role="pos", label="t", env="test")
    old = api_keys.parse(created.value.plaintext)
    rotated = await admin.rotate_client_key(
        db, actor=ACTOR, brand_id=acme.brand.id, client_id=created.value.client.id, grace=timedelta(hours=2), env="test"
    )
    new = api_keys.parse(rotated.value.plaintext)
    assert old is not None and new is not None and old.key_id != new.key_id
    ends = rotated.value.previous_keys_expire_at
    assert ends is not None
    registry = await load_registry(db)
    assert registry.keys[old.key_id].expires_at == ends and registry.keys[new.key_id].expires_at is None
    for now, old_valid in ((ends - timedelta(hours=2), True), (ends - timedelta(seconds=1), True), (ends, False),
                           (ends + DAY, False)):  # fmt: skip
        assert (registry.authenticate(old, now) is not None) is old_valid, now
        assert registry.authenticate(new, now) is not None
    # a second rotation never lengthens the first one's grace
    again = await admin.rotate_client_key(
        db, actor=ACTOR, brand_id=acme.brand.id, client_id=created.value.client.id, grace=DAY * 30, env="test"
    )
    registry = await load_registry(db)
    assert registry.keys[old.key_id].expires_at == ends
    assert registry.keys[new.key_id].expires_at == again.value.previous_keys_expire_at
