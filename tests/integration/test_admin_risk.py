"""Risk administration through AdminService on the real server stack, real Postgres and Redis: policies (stored
normalised, refused whole, scoped by brand, reaching the gateway's registry), store geofence radii, lockouts
(listed, lifted) and the audit log; and migration 0005."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import json_format
from redis.asyncio import Redis

from gateway.pb.redemption.v1 import admin_pb2 as pb
from gateway.tenancy import admin_store
from gateway.tenancy.admin_risk import effective_document, get_risk_policy
from gateway.tenancy.loader import load_registry
from risk import keys
from risk.model import Scope
from tests.conftest import gateway_environ
from tests.integration.conftest import RunningGateway
from tests.integration.grpc_helpers import field_violations
from tests.integration.registry_helpers import registry_state
from tests.integration.test_admin_cli import lines, ok, rgw
from tests.integration.test_admin_service import admin_as, failure, within

NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT
BRAND_POLICY = {"modes": {"store_geofence": "shadow"}, "limits": {"terminal": {"limit": 60, "window_s": 60}}}
CAMPAIGN_POLICY = {"modes": {"store_geofence": "enforce"}}


async def make_campaign(db: asyncpg.Connection, brand_id: int) -> int:
    """A campaign row of the brand (its codes and Redis rules do not matter here)."""
    now = datetime.now(UTC)
    campaign_id: int = await db.fetchval(
        """INSERT INTO campaigns (name, valid_from, valid_until, uses_per_code, key_id, brand_id)
           VALUES ('risk test', $1, $2, 1, 'k2', $3) RETURNING id""",
        now, now + timedelta(days=1), brand_id,
    )  # fmt: skip
    return campaign_id


# ------------------------------------------------------------------------------------------------------ migration


async def test_migration_0005_adds_the_radius_the_policies_and_the_event_record(db: asyncpg.Connection) -> None:
    radius = await db.fetchval("SELECT column_default FROM information_schema.columns WHERE table_name = 'stores'"
                               " AND column_name = 'radius_m'")  # fmt: skip
    assert radius == "300"
    events = await db.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'risk_events' ORDER BY ordinal_position"
    )
    names = [r["column_name"] for r in events]
    assert names[:3] == ["brand_id", "stream_id", "at"] and "code_ref" not in names and "code" not in names
    indexes = {r["indexname"] for r in await db.fetch("SELECT indexname FROM pg_indexes WHERE tablename LIKE 'risk_%'")}
    assert {"risk_events_brand_at", "risk_events_rule_reason_at", "risk_policies_row_version"} <= indexes
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO stores (brand_id, external_id, name, latitude, longitude, time_zone, radius_m,"
                         " row_version) VALUES (1, 's', 'S', 0, 0, 'UTC', 0, 1)")  # fmt: skip
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO risk_policies (brand_id, document, row_version) VALUES (1, '[]', 1)")


# ------------------------------------------------------------------------------------------------------- policies


async def test_a_policy_round_trip_stores_it_normalised_and_audited(
    gateway: RunningGateway, db: asyncpg.Connection
) -> None:
    campaign_id = await make_campaign(db, 1)
    async with admin_as(gateway, "admin") as stub:
        brand = await stub.SetRiskPolicy(pb.SetRiskPolicyRequest(document_json=json.dumps(BRAND_POLICY)))
        campaign = await stub.SetRiskPolicy(
            pb.SetRiskPolicyRequest(campaign_id=campaign_id, document_json=json.dumps(CAMPAIGN_POLICY))
        )
        shown = await stub.GetRiskPolicy(pb.GetRiskPolicyRequest(campaign_id=campaign_id))
        brand_shown = await stub.GetRiskPolicy(pb.GetRiskPolicyRequest())
        cleared = await stub.SetRiskPolicy(pb.SetRiskPolicyRequest(campaign_id=campaign_id, document_json="{}"))
        after_clearing = await stub.GetRiskPolicy(pb.GetRiskPolicyRequest(campaign_id=campaign_id))
        audit = await stub.ListAuditLog(pb.ListAuditLogRequest(limit=3))

    assert json.loads(brand.document_json) == BRAND_POLICY
    assert campaign.registry_version == brand.registry_version + 1
    assert cleared.registry_version == await db.fetchval("SELECT version FROM registry_version")
    assert json.loads(shown.document_json) == CAMPAIGN_POLICY
    effective = json.loads(shown.effective_json)
    assert effective["modes"]["store_geofence"] == "enforce"  # the campaign's over the brand's
    assert effective["limits"]["terminal"] == {"limit": 60, "window_s": 60}  # the brand's over the defaults
    assert effective["lockout"]["terminal"]["threshold"] == 10  # the defaults
    assert json.loads(brand_shown.effective_json)["modes"]["store_geofence"] == "shadow"
    assert json.loads(after_clearing.document_json) == {}
    assert json.loads(after_clearing.effective_json)["modes"]["store_geofence"] == "shadow"  # back to the brand's

    entries = [json_format.MessageToDict(e) for e in audit.entries]
    assert [(e["action"], e["entity"], e["entityId"]) for e in entries] == [
        ("risk_policy.set", "risk_policy", f"1/{campaign_id}"), ("risk_policy.set", "risk_policy", f"1/{campaign_id}"),
        ("risk_policy.set", "risk_policy", "1/0"),
    ]  # fmt: skip
    assert entries[0]["before"]["document"] == CAMPAIGN_POLICY and entries[0]["after"]["document"] == {}
    assert "before" not in entries[1] and entries[1]["after"]["document"] == CAMPAIGN_POLICY
    assert entries[0]["actor"] == f"client:{gateway.tenants.clients['admin']}"


async def test_the_effective_policy_is_what_the_policy_book_resolves(db: asyncpg.Connection) -> None:
    from risk.policy import PolicyBook, parse_document

    campaign_id = await make_campaign(db, 1)
    await db.execute("INSERT INTO risk_policies (brand_id, campaign_id, document, row_version) VALUES"
                     " (1, 0, $1, 1), (1, $2, $3, 1)", json.dumps(BRAND_POLICY), campaign_id,
                     json.dumps(CAMPAIGN_POLICY))  # fmt: skip
    levels = await get_risk_policy(db, brand_id=1, campaign_id=campaign_id)
    rendered = effective_document(levels)
    # The rendering is itself a valid document, and as the only level it resolves to the same policy.
    again = PolicyBook.from_documents({(9, 0): parse_document(rendered)}).effective(9, 0)
    original = PolicyBook.from_documents(levels.levels).effective(1, campaign_id)
    assert again == original


async def test_an_invalid_document_names_every_violation_and_stores_nothing(
    gateway: RunningGateway, db: asyncpg.Connection, redis: Redis
) -> None:
    before, announced = await registry_state(db), await redis.get("rgw:registry:version")
    bad = {"modes": {"store_geofence": "sometimes"}, "limits": {"terminal": {"limit": -1, "window_s": 60}}, "x": 1}
    whole = {"document_json"}
    cases: list[tuple[str, set[str]]] = [
        (
            json.dumps(bad),
            {"document_json.x", "document_json.modes.store_geofence", "document_json.limits.terminal.limit"},
        ),
        ("not json", whole),
        ("[1, 2]", whole),
        ('{"modes": NaN}', whole),
        ("[" * 10_000, whole),  # deeper than the JSON parser goes, within the message limit
    ]
    async with admin_as(gateway, "admin") as stub:
        for text, expected in cases:
            error = await failure(stub.SetRiskPolicy(pb.SetRiskPolicyRequest(document_json=text)))
            assert error.code() == INVALID, text
            assert set(field_violations(error)) == expected, (text[:20], field_violations(error))
    assert await registry_state(db) == before
    assert await redis.get("rgw:registry:version") == announced


async def test_another_brands_campaign_is_not_found_like_a_missing_one(
    gateway: RunningGateway, db: asyncpg.Connection
) -> None:
    theirs = await make_campaign(db, gateway.tenants.other_brand)
    before = await registry_state(db)
    messages = set()
    async with admin_as(gateway, "admin") as stub:
        for campaign_id in (theirs, theirs + 1000, -1):
            for call in (
                stub.SetRiskPolicy(pb.SetRiskPolicyRequest(campaign_id=campaign_id, document_json="{}")),
                stub.GetRiskPolicy(pb.GetRiskPolicyRequest(campaign_id=campaign_id)),
            ):
                error = await failure(call)
                assert error.code() == NOT_FOUND
                messages.add(error.details())
    assert len(messages) == 1
    assert await registry_state(db) == before
    async with admin_as(gateway, "platform", x_rgw_brand="other") as stub:  # their own platform view: found
        await stub.SetRiskPolicy(pb.SetRiskPolicyRequest(campaign_id=theirs, document_json="{}"))


async def test_a_platform_client_must_name_the_brand(gateway: RunningGateway) -> None:
    async with admin_as(gateway, "platform") as stub:
        for call in (
            stub.SetRiskPolicy(pb.SetRiskPolicyRequest(document_json="{}")),
            stub.GetRiskPolicy(pb.GetRiskPolicyRequest()),
            stub.ListLockouts(pb.ListLockoutsRequest()),
            stub.LiftLockout(pb.LiftLockoutRequest(scope="store", subject="store-1")),
        ):
            error = await failure(call)
            assert error.code() == INVALID and set(field_violations(error)) == {"metadata.x-rgw-brand"}


async def test_a_policy_change_reaches_the_running_gateway_within_the_bound(gateway: RunningGateway) -> None:
    watcher = gateway.gateway.registry
    async with admin_as(gateway, "admin") as stub:
        stored = await stub.SetRiskPolicy(pb.SetRiskPolicyRequest(document_json=json.dumps(BRAND_POLICY)))

        async def applied() -> bool:
            return watcher.registry().risk_policies.get((1, 0)) == BRAND_POLICY

        await within(applied, "the policy")
        assert watcher.version >= stored.registry_version
        await stub.SetRiskPolicy(pb.SetRiskPolicyRequest(document_json="{}"))

        async def cleared() -> bool:
            return (1, 0) not in watcher.registry().risk_policies

        await within(cleared, "the cleared policy")


# ------------------------------------------------------------------------------------------------- store radius


async def test_a_store_radius_round_trips_and_reaches_the_gateway(
    gateway: RunningGateway, db: asyncpg.Connection
) -> None:
    async with admin_as(gateway, "admin") as stub:
        default = await stub.CreateStore(
            pb.CreateStoreRequest(
                external_id="s-default", name="Default radius", latitude=1, longitude=2, time_zone="UTC"
            )
        )
        wide = await stub.CreateStore(
            pb.CreateStoreRequest(
                external_id="s-wide", name="Wide", latitude=1, longitude=2, time_zone="UTC", radius_m=1500.5
            )
        )
        updated = await stub.UpdateStore(pb.UpdateStoreRequest(store_id=wide.store.id, radius_m=75))
        renamed = await stub.UpdateStore(pb.UpdateStoreRequest(store_id=wide.store.id, name="Renamed"))
        listed = await stub.ListStores(pb.ListStoresRequest())
        bad = await failure(stub.UpdateStore(pb.UpdateStoreRequest(store_id=wide.store.id, radius_m=100_001, name="")))
        zero = await failure(stub.UpdateStore(pb.UpdateStoreRequest(store_id=wide.store.id, radius_m=0)))
        negative = await failure(
            stub.CreateStore(
                pb.CreateStoreRequest(
                    external_id="s-neg", name="Negative", latitude=1, longitude=2, time_zone="UTC", radius_m=-5
                )
            )
        )
        audit = await stub.ListAuditLog(pb.ListAuditLogRequest(limit=1))
    assert (default.store.radius_m, wide.store.radius_m, updated.store.radius_m) == (300, 1500.5, 75)
    assert (renamed.store.radius_m, renamed.store.name, renamed.store.latitude) == (75, "Renamed", 1)
    assert {s.external_id: s.radius_m for s in listed.stores}["s-wide"] == 75
    assert set(field_violations(bad)) == {"radius_m", "name"} and set(field_violations(zero)) == {"radius_m"}
    assert set(field_violations(negative)) == {"radius_m"}
    entry = json_format.MessageToDict(audit.entries[0])
    assert entry["action"] == "store.update" and (entry["before"]["name"], entry["after"]["name"]) == (
        "Wide",
        "Renamed",
    )
    watcher = gateway.gateway.registry

    async def applied() -> bool:
        store = watcher.registry().store(wide.store.id)
        return store is not None and store.radius_m == 75 and store.name == "Renamed"

    await within(applied, "the radius")


async def test_another_brands_store_cannot_be_updated(gateway: RunningGateway, db: asyncpg.Connection) -> None:
    async with admin_as(gateway, "platform", x_rgw_brand="other") as stub:
        theirs = await stub.CreateStore(
            pb.CreateStoreRequest(external_id="theirs", name="Theirs", latitude=1, longitude=2, time_zone="UTC")
        )
    before = await registry_state(db)
    async with admin_as(gateway, "admin") as stub:
        error = await failure(stub.UpdateStore(pb.UpdateStoreRequest(store_id=theirs.store.id, radius_m=10)))
    assert error.code() == NOT_FOUND and await registry_state(db) == before


# ------------------------------------------------------------------------------------------------------ lockouts


async def lock(redis: Redis, brand_id: int, scope: Scope, subject: str, ttl_ms: int = 60_000) -> None:
    """A lockout as the risk engine leaves it: the lock (PX = cool-down) and the failures that led to it."""
    await redis.set(keys.lock_key(brand_id, scope, subject), "1", px=ttl_ms)
    await redis.zadd(keys.failures_key(brand_id, scope, subject), {"f1": 1, "f2": 2})


async def test_lockouts_are_listed_per_brand_and_lifted_with_their_failures(
    gateway: RunningGateway, db: asyncpg.Connection, redis: Redis
) -> None:
    other = gateway.tenants.other_brand
    await lock(redis, 1, Scope.TERMINAL, "store-1/till-1", 30_000)
    await lock(redis, 1, Scope.CLIENT, "cl_abcdefghij")
    await lock(redis, 1, Scope.STORE, "odd:id")
    await lock(redis, other, Scope.TERMINAL, "store-1/till-1")
    async with admin_as(gateway, "admin") as stub:
        listed = await stub.ListLockouts(pb.ListLockoutsRequest())
        lifted = await stub.LiftLockout(pb.LiftLockoutRequest(scope="terminal", subject="store-1/till-1"))
        again = await stub.LiftLockout(pb.LiftLockoutRequest(scope="terminal", subject="store-1/till-1"))
        after = await stub.ListLockouts(pb.ListLockoutsRequest())
        bad = await failure(stub.LiftLockout(pb.LiftLockoutRequest(scope="brand", subject="")))
        audit = await stub.ListAuditLog(pb.ListAuditLogRequest(limit=2))

    assert [(lo.scope, lo.subject) for lo in listed.lockouts] == [
        ("client", "cl_abcdefghij"), ("store", "odd:id"), ("terminal", "store-1/till-1"),
    ] and not listed.truncated  # fmt: skip
    assert 25 < listed.lockouts[2].seconds_left <= 30
    assert (lifted.lifted, again.lifted) == (True, False)
    assert [(lo.scope, lo.subject) for lo in after.lockouts] == [("client", "cl_abcdefghij"), ("store", "odd:id")]
    assert not await redis.exists(
        keys.lock_key(1, Scope.TERMINAL, "store-1/till-1"), keys.failures_key(1, Scope.TERMINAL, "store-1/till-1")
    )
    assert await redis.exists(keys.lock_key(other, Scope.TERMINAL, "store-1/till-1"))  # the other brand's stays
    assert bad.code() == INVALID and set(field_violations(bad)) == {"scope", "subject"}
    entries = [json_format.MessageToDict(e) for e in audit.entries]
    assert [(e["action"], e["entityId"], e["before"]["locked"]) for e in entries] == [
        ("lockout.lift", "terminal:store-1/till-1", False), ("lockout.lift", "terminal:store-1/till-1", True),
    ]  # fmt: skip
    assert int(entries[0]["version"]) == await db.fetchval("SELECT version FROM registry_version")


async def test_a_lock_without_an_end_is_listed_with_zero_seconds(gateway: RunningGateway, redis: Redis) -> None:
    await redis.set(keys.lock_key(1, Scope.STORE, "forever"), "1")
    async with admin_as(gateway, "admin") as stub:
        listed = await stub.ListLockouts(pb.ListLockoutsRequest())
    assert [(lo.subject, lo.seconds_left) for lo in listed.lockouts] == [("forever", 0)]


async def test_a_listing_stops_at_a_thousand(gateway: RunningGateway, redis: Redis) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(1005):
            pipe.set(keys.lock_key(1, Scope.CLIENT, f"cl_{n:010d}"), "1", px=60_000)
        await pipe.execute()
    async with admin_as(gateway, "admin") as stub:
        listed = await stub.ListLockouts(pb.ListLockoutsRequest())
    assert len(listed.lockouts) == 1000 and listed.truncated


# ----------------------------------------------------------------------------------------------------------- rgw


async def test_rgw_risk_policy_set_and_show(
    redis_url: str, migrated: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    env = gateway_environ(redis_url, migrated)
    campaign_id = await make_campaign(db, 1)
    brand_file, campaign_file = tmp_path / "brand.json", tmp_path / "campaign.json"
    brand_file.write_text(json.dumps(BRAND_POLICY))
    campaign_file.write_text(json.dumps(CAMPAIGN_POLICY))
    stored = ok(env, "risk", "policy", "set", "--brand", "default", "--file", str(brand_file))
    ok(env, "risk", "policy", "set", "--brand", "1", "--campaign", str(campaign_id), "--file", str(campaign_file))
    shown = json.loads(ok(env, "risk", "policy", "show", "--brand", "default", "--campaign", str(campaign_id)).stdout)

    assert lines(stored) == [{"brand_id": 1, "campaign_id": 0, "document": BRAND_POLICY}]
    assert "registry version" in stored.stderr
    assert shown["document"] == CAMPAIGN_POLICY and shown["effective"]["modes"]["store_geofence"] == "enforce"
    assert shown["effective"]["limits"]["terminal"] == {"limit": 60, "window_s": 60}
    actions = await db.fetch("SELECT actor, action FROM audit_log ORDER BY id")
    assert [r["action"] for r in actions] == ["risk_policy.set", "risk_policy.set"]
    assert actions[0]["actor"].startswith("cli:")


async def test_rgw_refuses_a_bad_policy_and_another_brands_campaign(
    redis_url: str, migrated: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    env = gateway_environ(redis_url, migrated)
    other = (await admin_store.create_brand(db, actor="tests", slug="globex", name="Globex")).value
    theirs = await make_campaign(db, other.id)
    bad, broken = tmp_path / "bad.json", tmp_path / "broken.json"
    bad.write_text(json.dumps({"modes": {"lockout": "maybe"}}))
    broken.write_text("{")
    before = await registry_state(db)
    refused = rgw(env, "risk", "policy", "set", "--brand", "default", "--file", str(bad))
    unreadable = rgw(env, "risk", "policy", "set", "--brand", "default", "--file", str(broken))
    missing = rgw(env, "risk", "policy", "set", "--brand", "default", "--campaign", str(theirs), "--file", str(bad))
    not_theirs = rgw(env, "risk", "policy", "show", "--brand", "default", "--campaign", str(theirs))
    assert refused.returncode == 1 and "document.modes.lockout" in refused.stderr
    assert unreadable.returncode == 1 and "--file (document)" in unreadable.stderr
    assert missing.returncode == 1 and "modes.lockout" in missing.stderr  # validated before anything is looked up
    assert not_theirs.returncode == 1 and "no such campaign" in not_theirs.stderr
    assert await registry_state(db) == before


async def test_rgw_risk_lockouts_and_unlock(
    redis_url: str, migrated: str, db: asyncpg.Connection, redis: Redis
) -> None:
    env = gateway_environ(redis_url, migrated)
    await lock(redis, 1, Scope.TERMINAL, "store-1/till-1")
    await lock(redis, 1, Scope.STORE, "store-1")
    listed = lines(ok(env, "risk", "lockouts", "--brand", "default"))
    lifted = json.loads(ok(env, "risk", "unlock", "--brand", "default", "--scope", "terminal",
                           "--subject", "store-1/till-1").stdout)  # fmt: skip
    again = json.loads(ok(env, "risk", "unlock", "--brand", "1", "--scope", "terminal",
                          "--subject", "store-1/till-1").stdout)  # fmt: skip
    bad_scope = rgw(env, "risk", "unlock", "--brand", "1", "--scope", "brand", "--subject", "x")
    left = lines(ok(env, "risk", "lockouts", "--brand", "default"))

    assert [(lo["scope"], lo["subject"]) for lo in listed] == [("store", "store-1"), ("terminal", "store-1/till-1")]
    assert all(0 < lo["seconds_left"] <= 60 for lo in listed)
    assert (lifted["lifted"], again["lifted"]) == (True, False)
    assert bad_scope.returncode == 2  # argparse: not a scope that can be locked out
    assert [lo["subject"] for lo in left] == ["store-1"]
    audit = await db.fetch("SELECT action, entity_id FROM audit_log ORDER BY id")
    assert [tuple(r) for r in audit] == [("lockout.lift", "terminal:store-1/till-1")] * 2


async def test_rgw_store_radius(redis_url: str, migrated: str, db: asyncpg.Connection) -> None:
    env = gateway_environ(redis_url, migrated)
    made = json.loads(
        ok(
            env,
            "store",
            "create",
            "--brand",
            "default",
            "--external-id",
            "s-9",
            "--name",
            "Nine",
            "--lat",
            "48.85",
            "--lon",
            "2.35",
            "--time-zone",
            "Europe/Paris",
            "--radius-m",
            "120",
        ).stdout
    )
    default = json.loads(
        ok(
            env,
            "store",
            "create",
            "--brand",
            "default",
            "--external-id",
            "s-10",
            "--name",
            "Ten",
            "--lat",
            "48.85",
            "--lon",
            "2.35",
            "--time-zone",
            "Europe/Paris",
        ).stdout
    )
    updated = json.loads(
        ok(env, "store", "update", str(made["id"]), "--brand", "default", "--radius-m", "450", "--lat", "45").stdout
    )
    refused = rgw(env, "store", "update", str(made["id"]), "--radius-m", "0")  # fmt: skip
    assert (made["radius_m"], default["radius_m"], updated["radius_m"]) == (120, 300, 450)
    assert (updated["latitude"], updated["longitude"], updated["name"]) == (45, 2.35, "Nine")
    assert refused.returncode == 1 and "--radius-m (radius_m)" in refused.stderr
    assert (await load_registry(db)).store(made["id"]).radius_m == 450  # type: ignore[union-attr]
