"""Authentication and tenant isolation through the real server stack: who may call what, for which brand."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from gateway import codes, keys
from gateway.clock import ManualClock
from gateway.grpc_api.client_auth import authenticated_channel
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.pb.redemption.v1 import redemption_pb2_grpc as pb_grpc
from gateway.tenancy import admin_store, notify
from tests.conftest import T0_MS
from tests.integration.conftest import DAY_MS, Issue, RunningGateway
from tests.integration.grpc_helpers import redeem_request, redis_snapshot

ALLOWED = {
    "pos": {"Redeem", "Validate", "GetCode"},
    "internal": {"Redeem", "Validate", "GetCode", "RedeemStream"},
    "admin": set(),
    "platform": {"Redeem", "Validate", "GetCode", "RedeemStream"},
}


async def _one(items: list[pb.RedeemRequest]) -> AsyncIterator[pb.RedeemStreamRequest]:
    yield pb.RedeemStreamRequest(batch_id="b", items=items)


async def call(stub: pb_grpc.RedemptionServiceStub, method: str, code: str) -> grpc.StatusCode:
    """The status one call of `method` ends with."""
    try:
        if method == "Redeem":
            await stub.Redeem(redeem_request(code, "k"), timeout=5)
        elif method == "Validate":
            await stub.Validate(pb.ValidateRequest(code=code, store_id="store-1", terminal_id="till-1"), timeout=5)
        elif method == "GetCode":
            await stub.GetCode(pb.GetCodeRequest(code=code), timeout=5)
        else:
            _ = [r async for r in stub.RedeemStream(_one([redeem_request(code, "k")]), timeout=5)]
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("role", ALLOWED)
async def test_role_by_rpc_matrix(gateway: RunningGateway, issue: Issue, role: str) -> None:
    issued = await issue(4)
    extra = {"x_rgw_brand": "1"} if role == "platform" else {}
    async with gateway.channel_as(role, **extra) as channel:
        stub = pb_grpc.RedemptionServiceStub(channel)
        for method, code in zip(("Redeem", "Validate", "GetCode", "RedeemStream"), issued.codes, strict=True):
            expected = grpc.StatusCode.OK if method in ALLOWED[role] else grpc.StatusCode.PERMISSION_DENIED
            assert await call(stub, method, code) == expected, (role, method)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "Bearer rgw_test_notakey",
        "Bearer " + "x" * 5000,
        "Bearer rgw_test_aaaaaaaaaaaa_" + "a" * 32,
    ],
)
async def test_missing_malformed_and_unknown_keys_are_unauthenticated(
    gateway: RunningGateway, issue: Issue, redis: Redis, header: str | None
) -> None:
    issued = await issue(1)
    before = await redis_snapshot(redis)
    metadata = () if header is None else (("authorization", header),)
    async with grpc.aio.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.RedemptionServiceStub(channel)
        for method in ("Redeem", "Validate", "GetCode"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await getattr(stub, method)(_request(method, issued.codes[0]), metadata=metadata, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await redis_snapshot(redis) == before


def _request(method: str, code: str) -> object:
    if method == "Redeem":
        return redeem_request(code, "k")
    if method == "Validate":
        return pb.ValidateRequest(code=code, store_id="s", terminal_id="t")
    return pb.GetCodeRequest(code=code)


async def test_an_unauthenticated_caller_learns_nothing_from_garbage(gateway: RunningGateway) -> None:
    async with grpc.aio.insecure_channel(gateway.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/redemption.v1.RedemptionService/Redeem")(b"\x0a\x01\xff", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_and_reflection_stay_open(gateway: RunningGateway) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(gateway.target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def _wait_for(predicate: object, what: str, bound_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < bound_s:
        if await predicate():  # type: ignore[operator]
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what} not within {bound_s}s")


async def test_a_revoked_key_is_refused_within_the_bound(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis
) -> None:
    issued = await issue(1)
    async with gateway.channel_as("pos") as channel:
        stub = pb_grpc.RedemptionServiceStub(channel)
        assert await call(stub, "Validate", issued.codes[0]) == grpc.StatusCode.OK
        revoked = await admin_store.revoke_client(
            db, actor="tests", brand_id=1, client_id=gateway.tenants.clients["pos"]
        )
        await notify.publish(redis, revoked.version)

        async def refused() -> bool:
            return bool(await call(stub, "Validate", issued.codes[0]) == grpc.StatusCode.UNAUTHENTICATED)

        assert await _wait_for(refused, "revocation", 2.0) < 2.0


@pytest.mark.parametrize(("grace", "old_works"), [(timedelta(hours=1), True), (timedelta(0), False)])
async def test_a_rotated_out_key_works_only_during_its_grace(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis, grace: timedelta, old_works: bool
) -> None:
    issued = await issue(1)
    rotated = await admin_store.rotate_client_key(
        db, actor="tests", brand_id=1, client_id=gateway.tenants.clients["pos"], grace=grace, env="test"
    )
    await notify.publish(redis, rotated.version)
    async with authenticated_channel(gateway.target, rotated.value.plaintext) as new, gateway.channel_as("pos") as old:
        new_stub, old_stub = pb_grpc.RedemptionServiceStub(new), pb_grpc.RedemptionServiceStub(old)

        async def settled() -> bool:
            old_status = await call(old_stub, "Validate", issued.codes[0])
            expected = grpc.StatusCode.OK if old_works else grpc.StatusCode.UNAUTHENTICATED
            new_status = await call(new_stub, "Validate", issued.codes[0])
            return bool(old_status == expected and new_status == grpc.StatusCode.OK)

        await _wait_for(settled, "the rotation", 2.0)


@pytest.mark.parametrize("state", ["valid", "used", "expired"])
async def test_another_brands_code_looks_never_issued(
    gateway: RunningGateway, issue: Issue, redis: Redis, clock: ManualClock, state: str
) -> None:
    issued = await issue(2, valid_until_ms=T0_MS + DAY_MS)
    code = issued.codes[0]
    stranger = codes.generate(codes.Route(issued.campaign.id, 0))
    if state == "used":
        await gateway.stub.Redeem(redeem_request(code, "mine"))
    if state == "expired":
        clock.value = T0_MS + 2 * DAY_MS
        mine = await gateway.stub.Validate(pb.ValidateRequest(code=code, store_id="s", terminal_id="t"))
        assert mine.outcome == pb.OUTCOME_EXPIRED  # expired for its own brand; unknown for another
    before = await redis_snapshot(redis)
    async with gateway.channel_as("other_internal") as channel:
        stub = pb_grpc.RedemptionServiceStub(channel)
        theirs = await stub.Redeem(redeem_request(code, "x"))
        unknown = await stub.Redeem(redeem_request(stranger, "x"))
        assert theirs == unknown and theirs.outcome == pb.OUTCOME_NOT_FOUND
        v_theirs = await stub.Validate(pb.ValidateRequest(code=code, store_id="s", terminal_id="t"))
        v_unknown = await stub.Validate(pb.ValidateRequest(code=stranger, store_id="s", terminal_id="t"))
        assert v_theirs == v_unknown
        for raw in (code, stranger):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetCode(pb.GetCodeRequest(code=raw))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        streamed = [
            r async for r in stub.RedeemStream(_one([redeem_request(code, "y"), redeem_request(stranger, "y")]))
        ]
        first, second = streamed[0].results
        assert first == second and first.response.outcome == pb.OUTCOME_NOT_FOUND
    assert await redis_snapshot(redis) == before
    assert await redis.xlen(keys.outbox_key(issued.campaign.id, 0)) == (1 if state == "used" else 0)


async def test_a_store_bound_key_redeems_only_for_its_store(
    gateway: RunningGateway, issue: Issue, redis: Redis
) -> None:
    issued = await issue(2)
    async with gateway.channel_as("store_pos") as store_channel, gateway.channel_as("terminal_pos") as till_channel:
        store_stub, till_stub = (
            pb_grpc.RedemptionServiceStub(store_channel),
            pb_grpc.RedemptionServiceStub(till_channel),
        )
        elsewhere = [
            (store_stub, redeem_request(issued.codes[0], "a", store="store-2")),
            (till_stub, redeem_request(issued.codes[0], "b", store="store-1", terminal="till-2")),
        ]
        for stub, request in elsewhere:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Redeem(request)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert await redis.xlen(keys.outbox_key(issued.campaign.id, 0)) == 0
        ok = await store_stub.Redeem(redeem_request(issued.codes[0], "c", store="store-1", terminal="till-7"))
        till = await till_stub.Redeem(redeem_request(issued.codes[1], "d", store="store-1", terminal="till-1"))
        assert ok.outcome == till.outcome == pb.OUTCOME_REDEEMED


async def test_a_platform_client_acts_for_the_brand_it_names(gateway: RunningGateway, issue: Issue) -> None:
    issued = await issue(1)
    for brand, outcome in (
        ("1", pb.OUTCOME_REDEEMABLE),
        ("default", pb.OUTCOME_REDEEMABLE),
        ("other", pb.OUTCOME_NOT_FOUND),
    ):
        async with gateway.channel_as("platform", x_rgw_brand=brand) as channel:
            reply = await pb_grpc.RedemptionServiceStub(channel).Validate(
                pb.ValidateRequest(code=issued.codes[0], store_id="s", terminal_id="t")
            )
        assert reply.outcome == outcome, brand
    for brand in ("", "nope", "999"):
        async with gateway.channel_as("platform", x_rgw_brand=brand) as channel:
            status = await call(pb_grpc.RedemptionServiceStub(channel), "Validate", issued.codes[0])
        assert status == grpc.StatusCode.INVALID_ARGUMENT, brand


async def test_identity_reaches_the_use_record_the_event_and_the_idempotency_scope(
    gateway: RunningGateway, issue: Issue, redis: Redis
) -> None:
    issued = await issue(1, uses_per_code=3)
    first = await gateway.stub.Redeem(redeem_request(issued.codes[0], "same-key"))
    async with gateway.channel_as("pos") as channel:  # another client, same terminal and key: its own scope
        second = await pb_grpc.RedemptionServiceStub(channel).Redeem(redeem_request(issued.codes[0], "same-key"))
    assert not second.replayed and second.use_number == first.use_number + 1
    from tests.integration.grpc_helpers import outbox_events

    events = await outbox_events(redis, issued.campaign.id)
    clients = [gateway.tenants.clients[name] for name in ("internal", "pos")]
    assert [(e["client"], e["brand"], e["caller"]) for e in events] == [(c, "1", f"{c}/till-1") for c in clients]


async def test_no_key_reaches_the_logs(gateway: RunningGateway, issue: Issue, caplog: pytest.LogCaptureFixture) -> None:
    """A canary key: sent valid, revoked-looking and malformed; it must appear in no log line of the stack."""
    issued = await issue(1)
    canary = gateway.tenants.keys["pos"]
    secret = canary.rsplit("_", 1)[1]
    with caplog.at_level(logging.DEBUG):
        async with authenticated_channel(gateway.target, canary) as channel:
            await call(pb_grpc.RedemptionServiceStub(channel), "RedeemStream", issued.codes[0])  # PERMISSION_DENIED
            await call(pb_grpc.RedemptionServiceStub(channel), "Redeem", issued.codes[0])
        async with authenticated_channel(gateway.target, canary[:-1] + "x") as channel:
            await call(pb_grpc.RedemptionServiceStub(channel), "Redeem", issued.codes[0])
        async with authenticated_channel(gateway.target, "junk_" + canary) as channel:
            await call(pb_grpc.RedemptionServiceStub(channel), "Redeem", issued.codes[0])
    text = "\n".join(r.getMessage() + str(r.args) + str(r.exc_info) for r in caplog.records)
    assert secret not in text and canary[:-1] not in text


async def test_a_key_bound_to_a_disabled_store_is_refused(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis
) -> None:
    issued = await issue(1)
    disabled = await admin_store.set_store_status(
        db, actor="tests", brand_id=1, store_id=gateway.tenants.store.id, status="disabled"
    )
    await notify.publish(redis, disabled.version)
    async with gateway.channel_as("store_pos") as channel:
        stub = pb_grpc.RedemptionServiceStub(channel)

        async def refused() -> bool:
            return bool(await call(stub, "Validate", issued.codes[0]) == grpc.StatusCode.PERMISSION_DENIED)

        await _wait_for(refused, "the disabled store", 2.0)
