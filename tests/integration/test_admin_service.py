"""AdminService through the real server stack and real Postgres: who may administer what, brand isolation, bad
input, the audit log, and changes that reach the gateway's registry within the bound."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, json_format, timestamp_pb2
from google.protobuf.message import Message
from redis.asyncio import Redis

from gateway import issuance
from gateway.coderefs import KeyRing
from gateway.grpc_api.client_auth import authenticated_channel
from gateway.pb.redemption.v1 import admin_pb2 as pb
from gateway.pb.redemption.v1 import admin_pb2_grpc as pb_grpc
from gateway.pb.redemption.v1 import redemption_pb2 as rpb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as rpb_grpc
from gateway.tenancy import admin_store
from gateway.tenancy.model import Store, Terminal
from tests.conftest import T0_MS
from tests.integration.conftest import DAY_MS, Issue, RunningGateway, at
from tests.integration.grpc_helpers import field_violations
from tests.integration.registry_helpers import registry_state

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
DISABLED = pb.ENTITY_STATUS_DISABLED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT
ACTIVE = pb.ENTITY_STATUS_ACTIVE
BOUND_S = 2.0  # a change reaches every gateway process within this


@asynccontextmanager
async def admin_as(gateway: RunningGateway, name: str, **extra: str) -> AsyncIterator[pb_grpc.AdminServiceStub]:
    """An AdminService stub authenticated as the tenants' client `name`."""
    async with gateway.channel_as(name, **extra) as channel:
        yield pb_grpc.AdminServiceStub(channel)


async def outcome(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        if isinstance(call, grpc.aio.UnaryStreamCall):  # a server stream: read it to its end
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return OK


async def failure(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def within(predicate: Callable[[], Awaitable[bool]], what: str, bound_s: float = BOUND_S) -> None:
    started = time.monotonic()
    while time.monotonic() - started < bound_s:
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what} not within {bound_s}s")


async def validate_status(target: str, key: str, code: str) -> grpc.StatusCode:
    """What a Validate call with `key` ends with."""
    async with authenticated_channel(target, key) as channel:
        request = rpb.ValidateRequest(code=code, store_id="store-1", terminal_id="till-1")
        return await outcome(rpb_grpc.RedemptionServiceStub(channel).Validate(request, timeout=5))


@dataclass
class Other:
    """Brand `other`'s store, terminal and client: what brand 1's admin must not see."""

    store: Store
    terminal: Terminal
    client_id: str


async def make_other(db: asyncpg.Connection, brand_id: int) -> Other:
    store = (await admin_store.create_store(
        db, actor="tests", brand_id=brand_id, external_id="theirs", name="Their store", latitude=1.0, longitude=2.0,
        time_zone="Europe/Paris",
    )).value  # fmt: skip
    terminal = await admin_store.create_terminal(
        db, actor="tests", brand_id=brand_id, store_id=store.id, external_id="their-till"
    )
    client = await admin_store.create_client(
        db, actor="tests", brand_id=brand_id, role="pos", label="their pos", env="test"
    )
    return Other(store, terminal.value, client.value.client.id)


async def spare_client(db: asyncpg.Connection) -> str:
    """A client of brand 1 that a test may revoke or rotate."""
    made = await admin_store.create_client(db, actor="tests", brand_id=1, role="pos", label="spare", env="test")
    return made.value.client.id


# ------------------------------------------------------------------------------------------- who may call what


def every_rpc(
    store: Store, terminal: Terminal, client_id: str, tag: str, campaign_id: int
) -> list[tuple[str, Message | list[Message]]]:
    """One valid request for each AdminService method, unique per `tag` (`campaign_id`: one of brand 1's)."""
    day = pb.Campaign(name=f"campaign {tag}", valid_from=timestamp_pb2.Timestamp(seconds=T0_MS // 1000),
                      valid_until=timestamp_pb2.Timestamp(seconds=T0_MS // 1000 + 86_400))  # fmt: skip
    return [
        ("CreateBrand", pb.CreateBrandRequest(slug=f"brand-{tag}", name="A brand")),
        ("ListBrands", pb.ListBrandsRequest()),
        ("SetBrandStatus", pb.SetBrandStatusRequest(brand_id=1, status=ACTIVE)),
        ("CreateStore", pb.CreateStoreRequest(
            external_id=f"store-{tag}", name="A store", latitude=48.85, longitude=2.35, time_zone="Europe/Paris"
        )),
        ("ListStores", pb.ListStoresRequest()),
        ("SetStoreStatus", pb.SetStoreStatusRequest(store_id=store.id, status=ACTIVE)),
        ("CreateTerminal", pb.CreateTerminalRequest(store_id=store.id, external_id=f"till-{tag}")),
        ("ListTerminals", pb.ListTerminalsRequest()),
        ("SetTerminalStatus", pb.SetTerminalStatusRequest(terminal_id=terminal.id, status=ACTIVE)),
        ("CreateClient", pb.CreateClientRequest(role=pb.ROLE_POS, label=f"pos {tag}")),
        ("ListClients", pb.ListClientsRequest()),
        ("RotateClientKey", pb.RotateClientKeyRequest(client_id=client_id)),
        ("RevokeClient", pb.RevokeClientRequest(client_id=client_id)),
        ("ListAuditLog", pb.ListAuditLogRequest(limit=5)),
        ("UpdateStore", pb.UpdateStoreRequest(store_id=store.id, radius_m=250)),
        ("SetRiskPolicy", pb.SetRiskPolicyRequest(document_json="{}")),
        ("GetRiskPolicy", pb.GetRiskPolicyRequest()),
        ("ListLockouts", pb.ListLockoutsRequest()),
        ("LiftLockout", pb.LiftLockoutRequest(scope="terminal", subject="store-1/till-1")),
        ("CreateCampaign", pb.CreateCampaignRequest(campaign=day)),
        ("UpdateCampaign", pb.UpdateCampaignRequest(campaign=pb.Campaign(id=campaign_id, name=f"renamed {tag}"),
                                                    update_mask=field_mask_pb2.FieldMask(paths=["name"]))),
        ("SetCampaignStatus", pb.SetCampaignStatusRequest(campaign_id=campaign_id, status=pb.CAMPAIGN_STATUS_ACTIVE)),
        ("ListCampaigns", pb.ListCampaignsRequest()),
        ("GetCampaignStats", pb.GetCampaignStatsRequest(campaign_id=campaign_id)),
        ("GenerateCodes", pb.GenerateCodesRequest(campaign_id=campaign_id, count=1)),
        ("SetStoreGroup", pb.SetStoreGroupRequest(name=f"group-{tag}", stores=["store-1"])),
        ("CreateSku", pb.CreateSkuRequest(sku=pb.Sku(code=f"sku-{tag}", name="A month card"))),
        ("ListSkus", pb.ListSkusRequest()),
        ("ImportSecrets", [pb.ImportSecretsRequest(options=pb.ImportOptions(all_or_nothing=True))]),
        ("GetInventoryStatus", pb.GetInventoryStatusRequest()),
    ]  # fmt: skip


PLATFORM_ONLY = {"CreateBrand", "SetBrandStatus"}
EXPECTED = {
    "pos": lambda method: DENIED,
    "internal": lambda method: DENIED,
    "admin": lambda method: DENIED if method in PLATFORM_ONLY else OK,
    "platform": lambda method: OK,
}


@pytest.mark.parametrize("role", EXPECTED)
async def test_role_by_admin_rpc_matrix(
    gateway: RunningGateway, db: asyncpg.Connection, redis: Redis, keyring: KeyRing, role: str
) -> None:
    tenants = gateway.tenants
    campaign = await issuance.create_campaign(db, redis, keyring, name="matrix", valid_from=at(T0_MS),
                                              valid_until=at(T0_MS + DAY_MS))  # fmt: skip
    calls = every_rpc(tenants.store, tenants.terminal, await spare_client(db), role, campaign.id)
    assert {method for method, _ in calls} == set(pb.DESCRIPTOR.services_by_name["AdminService"].methods_by_name)
    extra = {"x_rgw_brand": "1"} if role == "platform" else {}
    before = await registry_state(db)
    async with admin_as(gateway, role, **extra) as stub:
        for method, request in calls:
            assert await outcome(getattr(stub, method)(request, timeout=5)) == EXPECTED[role](method), method
    if role in ("pos", "internal"):
        assert await registry_state(db) == before


async def test_a_platform_client_without_a_brand_administers_every_brand(
    gateway: RunningGateway, db: asyncpg.Connection
) -> None:
    other = await make_other(db, gateway.tenants.other_brand)
    async with admin_as(gateway, "platform") as stub:
        made = await stub.CreateBrand(pb.CreateBrandRequest(slug="third", name="Third brand"))
        brands = await stub.ListBrands(pb.ListBrandsRequest())
        stores = await stub.ListStores(pb.ListStoresRequest())
        disabled = await stub.SetStoreStatus(pb.SetStoreStatusRequest(store_id=other.store.id, status=DISABLED))
        platform = await stub.CreateClient(pb.CreateClientRequest(role=pb.ROLE_PLATFORM, label="ops"))
    assert made.brand.slug == "third" and made.brand.status == ACTIVE
    assert {b.slug for b in brands.brands} == {"default", "other", "third"}
    assert {s.brand_id for s in stores.stores} == {1, gateway.tenants.other_brand}
    assert disabled.store.status == pb.ENTITY_STATUS_DISABLED
    assert platform.client.brand_id == 0 and platform.client.role == pb.ROLE_PLATFORM
    async with admin_as(gateway, "platform", x_rgw_brand="other") as stub:
        theirs = await stub.ListStores(pb.ListStoresRequest())
    assert [s.id for s in theirs.stores] == [other.store.id]


async def test_only_the_platform_creates_platform_clients_and_changes_brands(
    gateway: RunningGateway, db: asyncpg.Connection
) -> None:
    before = await registry_state(db)
    async with admin_as(gateway, "admin") as stub:
        for call in (
            stub.CreateClient(pb.CreateClientRequest(role=pb.ROLE_PLATFORM, label="sneaky")),
            stub.CreateBrand(pb.CreateBrandRequest(slug="mine", name="Mine")),
            stub.SetBrandStatus(pb.SetBrandStatusRequest(brand_id=gateway.tenants.other_brand, status=DISABLED)),
        ):
            assert await outcome(call) == DENIED
        brands = await stub.ListBrands(pb.ListBrandsRequest())
        admin_made = await stub.CreateClient(pb.CreateClientRequest(role=pb.ROLE_ADMIN, label="second admin"))
    assert [b.id for b in brands.brands] == [1]
    assert admin_made.client.brand_id == 1 and admin_made.client.role == pb.ROLE_ADMIN
    assert (await registry_state(db))[0] == before[0]


# ------------------------------------------------------------------------------------------------ brand isolation


def _trailers(error: grpc.aio.AioRpcError) -> list[tuple[str, str | bytes]]:
    """The trailing metadata but the call's own request id (every call has a new one)."""
    return [(k, v) for k, v in error.trailing_metadata() or () if k != "x-request-id"]


async def test_another_brands_entities_answer_exactly_like_missing_ones(
    gateway: RunningGateway, db: asyncpg.Connection
) -> None:
    other = await make_other(db, gateway.tenants.other_brand)
    before = await registry_state(db)
    pairs = [  # (another brand's, a missing one): must fail identically
        (pb.SetStoreStatusRequest(store_id=other.store.id, status=DISABLED),
         pb.SetStoreStatusRequest(store_id=9999, status=DISABLED)),
        (pb.SetTerminalStatusRequest(terminal_id=other.terminal.id, status=DISABLED),
         pb.SetTerminalStatusRequest(terminal_id=9999, status=DISABLED)),
        (pb.CreateTerminalRequest(store_id=other.store.id, external_id="x"),
         pb.CreateTerminalRequest(store_id=9999, external_id="x")),
        (pb.RevokeClientRequest(client_id=other.client_id), pb.RevokeClientRequest(client_id="cl_aaaaaaaaaa")),
        (pb.RotateClientKeyRequest(client_id=other.client_id), pb.RotateClientKeyRequest(client_id="cl_aaaaaaaaaa")),
    ]  # fmt: skip
    async with admin_as(gateway, "admin") as stub:
        for theirs, missing in pairs:
            method = getattr(stub, type(theirs).__name__.removesuffix("Request"))
            a, b = await failure(method(theirs)), await failure(method(missing))
            assert (a.code(), a.details(), _trailers(a)) == (b.code(), b.details(), _trailers(b))
            assert a.code() == NOT_FOUND
        bound = await failure(
            stub.CreateClient(pb.CreateClientRequest(role=pb.ROLE_POS, label="x", store_id=other.store.id))
        )
        unbound = await failure(stub.CreateClient(pb.CreateClientRequest(role=pb.ROLE_POS, label="x", store_id=9999)))
        assert bound.code() == unbound.code() == INVALID
        assert field_violations(bound) == field_violations(unbound) and "store_id" in field_violations(bound)
        assert await registry_state(db) == before


async def test_an_admin_lists_only_its_own_brand(gateway: RunningGateway, db: asyncpg.Connection) -> None:
    other = await make_other(db, gateway.tenants.other_brand)
    async with admin_as(gateway, "admin") as stub:
        lists = await asyncio.gather(
            stub.ListBrands(pb.ListBrandsRequest()), stub.ListStores(pb.ListStoresRequest()),
            stub.ListTerminals(pb.ListTerminalsRequest()), stub.ListClients(pb.ListClientsRequest()),
            stub.ListAuditLog(pb.ListAuditLogRequest(limit=1000)),
            stub.ListTerminals(pb.ListTerminalsRequest(store_id=other.store.id)),
        )  # fmt: skip
    brands, stores, terminals, clients, audit, their_terminals = lists
    assert [b.id for b in brands.brands] == [1]
    assert [s.id for s in stores.stores] == [gateway.tenants.store.id]
    assert [t.id for t in terminals.terminals] == [gateway.tenants.terminal.id]
    assert {c.brand_id for c in clients.clients} == {1} and other.client_id not in {c.id for c in clients.clients}
    assert audit.entries and {e.brand_id for e in audit.entries} == {1}
    assert list(their_terminals.terminals) == []


# ------------------------------------------------------------------------------------------------------ bad input


async def test_bad_input_names_every_bad_field_and_changes_nothing(
    gateway: RunningGateway, db: asyncpg.Connection, redis: Redis
) -> None:
    other = await make_other(db, gateway.tenants.other_brand)
    before, announced = await registry_state(db), await redis.get("rgw:registry:version")
    store_id = gateway.tenants.store.id
    brand = {"x_rgw_brand": "nope"}
    cases: list[tuple[str, dict[str, str], Message, set[str]]] = [
        ("admin", {}, pb.CreateStoreRequest(
            external_id="bad id!", name="", latitude=91, longitude=0, time_zone="Mars/Olympus_Mons"),
         {"external_id", "name", "latitude", "time_zone"}),
        ("admin", {}, pb.CreateStoreRequest(
            external_id="ok", name="ok", latitude=float("nan"), longitude=-181, time_zone="../etc/passwd"),
         {"latitude", "longitude", "time_zone"}),
        ("admin", {}, pb.CreateTerminalRequest(store_id=store_id, external_id=""), {"external_id"}),
        ("admin", {}, pb.CreateClientRequest(role=pb.ROLE_POS, label=" ", store_id=other.store.id),
         {"label", "store_id"}),
        ("admin", {}, pb.CreateClientRequest(role=pb.ROLE_ADMIN, label="x", store_id=store_id), {"store_id"}),
        ("admin", {}, pb.CreateClientRequest(label="no role"), {"role"}),
        ("admin", {}, pb.SetStoreStatusRequest(store_id=store_id), {"status"}),
        ("admin", {}, pb.ListStoresRequest(page_size=-1), {"page_size"}),
        ("admin", {}, pb.ListAuditLogRequest(limit=1001), {"limit"}),
        ("admin", {}, pb.RotateClientKeyRequest(
            client_id=gateway.tenants.clients["pos"], grace=duration_pb2.Duration(seconds=-1)), {"grace"}),
        ("platform", {}, pb.CreateBrandRequest(slug="Not A Slug", name=""), {"slug", "name"}),
        ("platform", {}, pb.CreateStoreRequest(external_id="s", name="n", time_zone="UTC"),
         {"metadata.x-rgw-brand"}),
        ("platform", {}, pb.CreateTerminalRequest(store_id=store_id, external_id="t"), {"metadata.x-rgw-brand"}),
        ("platform", {}, pb.CreateClientRequest(role=pb.ROLE_POS, label=""), {"metadata.x-rgw-brand", "label"}),
        ("platform", brand, pb.ListStoresRequest(), {"metadata.x-rgw-brand"}),
    ]  # fmt: skip
    for name, extra, request, fields in cases:
        method = type(request).__name__.removesuffix("Request")
        async with admin_as(gateway, name, **extra) as stub:
            error = await failure(getattr(stub, method)(request, timeout=5))
        assert error.code() == INVALID, (method, error.details())
        assert set(field_violations(error)) == fields, (method, field_violations(error))
    assert await registry_state(db) == before
    assert await redis.get("rgw:registry:version") == announced


async def test_duplicates_are_already_exists_and_change_nothing(
    gateway: RunningGateway, db: asyncpg.Connection
) -> None:
    before = await registry_state(db)
    store = gateway.tenants.store
    async with admin_as(gateway, "platform", x_rgw_brand="default") as stub:
        for call in (
            stub.CreateBrand(pb.CreateBrandRequest(slug="other", name="Again")),
            stub.CreateStore(pb.CreateStoreRequest(
                external_id=store.external_id, name="Again", latitude=1, longitude=1, time_zone="UTC")),
            stub.CreateTerminal(pb.CreateTerminalRequest(store_id=store.id, external_id="till-1")),
        ):  # fmt: skip
            assert await outcome(call) == grpc.StatusCode.ALREADY_EXISTS
    assert await registry_state(db) == before


# ---------------------------------------------------------------------------------------------------- the audit


async def test_each_change_is_one_audit_row_by_the_calling_client(
    gateway: RunningGateway, db: asyncpg.Connection
) -> None:
    first_id = await db.fetchval("SELECT coalesce(max(id), 0) FROM audit_log")
    async with admin_as(gateway, "admin") as stub:
        store = (
            await stub.CreateStore(
                pb.CreateStoreRequest(
                    external_id="s-2", name="Second", latitude=45.5, longitude=-73.6, time_zone="America/Toronto"
                )
            )
        ).store
        terminal = (await stub.CreateTerminal(pb.CreateTerminalRequest(store_id=store.id, external_id="t-1"))).terminal
        await stub.SetTerminalStatus(pb.SetTerminalStatusRequest(terminal_id=terminal.id, status=DISABLED))
        client = await stub.CreateClient(pb.CreateClientRequest(role=pb.ROLE_POS, label="till", store_id=store.id))
        await stub.RotateClientKey(pb.RotateClientKeyRequest(client_id=client.client.id))
        await stub.RevokeClient(pb.RevokeClientRequest(client_id=client.client.id))
        listed = await stub.ListAuditLog(pb.ListAuditLogRequest(limit=6))
    rows = await db.fetch("SELECT actor, action, entity_id FROM audit_log WHERE id > $1 ORDER BY id", first_id)
    actions = ["store.create", "terminal.create", "terminal.set_status", "client.create", "client.rotate_key",
               "client.revoke"]  # fmt: skip
    assert [r["action"] for r in rows] == actions
    assert {r["actor"] for r in rows} == {f"client:{gateway.tenants.clients['admin']}"}
    assert [e.action for e in listed.entries] == actions[::-1] and not listed.truncated
    created = json_format.MessageToDict(listed.entries[-1].after)
    assert created["external_id"] == "s-2" and created["time_zone"] == "America/Toronto"
    assert listed.entries[-1].HasField("after") and not listed.entries[-1].HasField("before")


# ------------------------------------------------------------------------------------ changes reach the gateway


async def test_a_created_client_works_at_once_and_a_revoked_one_is_refused(
    gateway: RunningGateway, issue: Issue
) -> None:
    issued = await issue(1)
    code = issued.codes[0]
    async with admin_as(gateway, "admin") as stub:
        made = await stub.CreateClient(pb.CreateClientRequest(role=pb.ROLE_POS, label="new till"))

        async def works() -> bool:
            return bool(await validate_status(gateway.target, made.api_key, code) == OK)

        await within(works, "the new client")
        async with authenticated_channel(gateway.target, made.api_key) as channel:
            redeemed = await rpb_grpc.RedemptionServiceStub(channel).Redeem(
                rpb.RedeemRequest(code=code, idempotency_key="k", store_id="store-1", terminal_id="till-1")
            )
        assert redeemed.outcome == rpb.OUTCOME_REDEEMED
        revoked = await stub.RevokeClient(pb.RevokeClientRequest(client_id=made.client.id))
        assert revoked.client.HasField("revoked_at")

        async def refused() -> bool:
            status = await validate_status(gateway.target, made.api_key, code)
            return bool(status == grpc.StatusCode.UNAUTHENTICATED)

        await within(refused, "the revocation")


async def test_rotation_gives_a_new_working_key_and_ends_the_old_one(gateway: RunningGateway, issue: Issue) -> None:
    issued = await issue(1)
    code = issued.codes[0]
    old_key = gateway.tenants.keys["pos"]
    async with admin_as(gateway, "admin") as stub:
        rotated = await stub.RotateClientKey(pb.RotateClientKeyRequest(
            client_id=gateway.tenants.clients["pos"], grace=duration_pb2.Duration(seconds=0)))  # fmt: skip
    assert rotated.api_key != old_key and rotated.key_id in rotated.api_key
    assert rotated.HasField("previous_keys_expire_at")

    async def settled() -> bool:
        new = await validate_status(gateway.target, rotated.api_key, code)
        old = await validate_status(gateway.target, old_key, code)
        return bool(new == OK and old == grpc.StatusCode.UNAUTHENTICATED)

    await within(settled, "the rotation")


async def test_a_change_is_announced_when_redis_comes_back(
    gateway: RunningGateway, issue: Issue, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stalls while the change commits: the call still answers (its one-time key must not be lost) and the
    servicer keeps announcing until Redis answers; then the new key works."""
    issued = await issue(1)
    pause_ms = 5000  # longer than the gateway's Redis timeout and its one retry (2 x 2 s): the announcement fails
    async with admin_as(gateway, "admin") as stub:
        await redis.execute_command("CLIENT", "PAUSE", pause_ms, "WRITE")  # type: ignore[no-untyped-call]
        paused_at = time.monotonic()
        made = await stub.CreateClient(pb.CreateClientRequest(role=pb.ROLE_POS, label="during a stall"), timeout=10)

    async def works() -> bool:
        return bool(await validate_status(gateway.target, made.api_key, issued.codes[0]) == OK)

    await within(works, "the stalled announcement", bound_s=pause_ms / 1000 + BOUND_S + 1)
    assert time.monotonic() - paused_at >= pause_ms / 1000
    assert any("not announced" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------- pages and limits


async def test_lists_page_through_everything_within_the_send_limit(
    gateway: RunningGateway, db: asyncpg.Connection
) -> None:
    """400 stores with long names are more than one reply may carry: pages stop short of the send limit."""
    for n in range(400):
        await admin_store.create_store(
            db, actor="tests", brand_id=1, external_id=f"bulk-{n:03d}", name="N" * 200, latitude=0, longitude=0,
            time_zone="America/Argentina/ComodRivadavia",
        )  # fmt: skip
    seen: list[int] = []
    pages = 0
    async with admin_as(gateway, "admin") as stub:
        token = ""
        while True:
            reply = await stub.ListStores(pb.ListStoresRequest(page_size=1000, page_token=token))
            seen += [s.id for s in reply.stores]
            pages += 1
            token = reply.next_page_token
            if not token:
                break
        small = await stub.ListStores(pb.ListStoresRequest(page_size=7))
        audit = await stub.ListAuditLog(pb.ListAuditLogRequest(limit=1000))
    assert pages > 1 and seen == sorted(set(seen)) and len(seen) == 401  # and the tenants' store-1
    assert len(small.stores) == 7 and small.next_page_token
    assert audit.truncated and 0 < len(audit.entries) < 400
    assert [e.id for e in audit.entries] == sorted((e.id for e in audit.entries), reverse=True)


# ---------------------------------------------------------------------------------------------------- no secrets


async def test_no_key_reaches_the_logs_or_the_audit(
    gateway: RunningGateway, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        async with admin_as(gateway, "admin") as stub:
            made = await stub.CreateClient(pb.CreateClientRequest(role=pb.ROLE_INTERNAL, label="canary"))
            rotated = await stub.RotateClientKey(pb.RotateClientKeyRequest(client_id=made.client.id))
            await stub.RevokeClient(pb.RevokeClientRequest(client_id=made.client.id))
            listed = await stub.ListAuditLog(pb.ListAuditLogRequest())
            clients = await stub.ListClients(pb.ListClientsRequest())
    secrets = [key.rsplit("_", 1)[1] for key in (made.api_key, rotated.api_key)]
    logged = "\n".join(r.getMessage() + str(r.args) + str(r.exc_info) for r in caplog.records)
    audit = " ".join(str(tuple(r)) for r in await db.fetch("SELECT * FROM audit_log"))
    hashes = [bytes(r["secret_hash"]).hex() for r in await db.fetch("SELECT secret_hash FROM api_keys")]
    for text in (logged, audit, str(listed), str(clients)):
        assert not any(secret in text for secret in secrets)
        assert not any(digest in text for digest in hashes)
