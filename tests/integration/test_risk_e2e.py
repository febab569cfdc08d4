"""Every risk outcome end to end: a real gateway, Redis and Postgres, brand 1's policy applied through the registry.

Each enforced rule declines with its reason (or, for a caller quota, RESOURCE_EXHAUSTED with RetryInfo and
QuotaFailure), leaves the code unredeemed, and is recorded in risk_events by the real ledger writer - with the
brand, campaign, store, terminal, client, rule, reason, location and mode 'enforce', and never the code. The same
rule in shadow mode admits and records mode 'shadow' (and counts in rgw_risk_decisions_total). Validate runs the
same checks and counts nothing; RedeemStream checks every item on its own."""

from __future__ import annotations

import copy
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from gateway import keys
from gateway.clock import ManualClock
from gateway.coderefs import KeyRing
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.validation import lookup_code
from tests.integration.conftest import Issue, Issued, RunningGateway
from tests.integration.risk_e2e_helpers import (
    AT_STORE_1,
    BEIJING,
    FAR_NORTH,
    STORE_1,
    Event,
    Ledger,
    Quota,
    add_store,
    announce,
    apply_policy,
    decisions,
    eventually,
    make_ledger,
    only,
    quota_of,
    redeem,
    redeemed,
    request,
    uses_left,
    validation,
)

RISK_DENIED = pb.OUTCOME_RISK_DENIED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
SECOND_MS = 1000


@pytest_asyncio.fixture(loop_scope="session")
async def ledger(redis: Redis, db: asyncpg.Connection, migrated: str, keyring: KeyRing) -> Ledger:
    return await make_ledger(redis, db, migrated, keyring)


# --------------------------------------------------------------------------------------------- caller quotas


@dataclass(frozen=True)
class QuotaCase:
    """Three attempts from `callers` ((store, terminal) each) against a limit of two on `scope`."""

    scope: str
    callers: tuple[tuple[str, str], ...]
    subject: str  # "{client}" stands for the internal client's id


QUOTAS = [
    QuotaCase("terminal", (("store-1", "till-1"),) * 3, "terminal:store-1/till-1"),
    QuotaCase("store", tuple(("store-1", f"till-s{n}") for n in range(3)), "store:store-1"),
    QuotaCase("client", tuple((f"store-c{n}", f"till-c{n}") for n in range(3)), "client:{client}"),
    QuotaCase("brand", tuple((f"store-b{n}", f"till-b{n}") for n in range(3)), "brand:-"),  # one subject
]


async def _exhausted(call: Awaitable[object]) -> Quota:
    """Await a call that must fail RESOURCE_EXHAUSTED; the quota details it carried."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.code() == EXHAUSTED
    return quota_of(refused.value)


async def _two_admitted(gateway: RunningGateway, issued: Issued, case: QuotaCase, clock: ManualClock) -> None:
    for n in range(2):
        store, terminal = case.callers[n]
        await redeemed(gateway, issued.codes[n], store=store, terminal=terminal)
        clock.advance(SECOND_MS)


@pytest.mark.parametrize("case", QUOTAS, ids=lambda c: c.scope)
async def test_a_caller_over_its_quota_is_resource_exhausted_with_retry_and_quota_details(
    case: QuotaCase, gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis,
    clock: ManualClock, ledger: Ledger,
) -> None:  # fmt: skip
    issued = await issue(3)
    await apply_policy(gateway, db, redis, only(limits={case.scope: {"limit": 2, "window_s": 60}}))
    await _two_admitted(gateway, issued, case, clock)
    store, terminal = case.callers[2]
    third = request(issued.codes[2], store=store, terminal=terminal)
    counted = decisions("rate_limit", "RATE_LIMITED", "enforce")

    refused = await _exhausted(gateway.stub.Redeem(third))

    client = gateway.tenants.clients["internal"]
    subject = case.subject.format(client=client)
    # the first attempt (at T0) leaves the window 60 s after it; the third is made 2 s after the first
    assert refused == Quota("RATE_LIMITED", subject, 58_000)
    assert await uses_left(gateway, issued.codes[2]) == 1
    assert decisions("rate_limit", "RATE_LIMITED", "enforce") == counted + 1
    assert await ledger.events(*issued.codes) == [
        Event(issued.campaign.id, store, terminal, client, "rate_limit", "RATE_LIMITED", "enforce", scope=subject)
    ]
    clock.advance(58_000)  # exactly when RetryInfo said: admitted again, the same request redeems
    assert (await gateway.stub.Redeem(third)).outcome == pb.OUTCOME_REDEEMED


@pytest.mark.parametrize("case", QUOTAS, ids=lambda c: c.scope)
async def test_a_quota_in_shadow_mode_admits_and_records(
    case: QuotaCase, gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis,
    clock: ManualClock, ledger: Ledger,
) -> None:  # fmt: skip
    issued = await issue(3)
    document = only(limits={case.scope: {"limit": 2, "window_s": 60}}, modes={"rate_limit": "shadow"})
    await apply_policy(gateway, db, redis, document)
    await _two_admitted(gateway, issued, case, clock)
    store, terminal = case.callers[2]
    counted = decisions("rate_limit", "RATE_LIMITED", "shadow")

    await redeemed(gateway, issued.codes[2], store=store, terminal=terminal)

    client = gateway.tenants.clients["internal"]
    subject = case.subject.format(client=client)
    assert decisions("rate_limit", "RATE_LIMITED", "shadow") == counted + 1
    assert await ledger.events(*issued.codes) == [
        Event(issued.campaign.id, store, terminal, client, "rate_limit", "RATE_LIMITED", "shadow", scope=subject)
    ]


# ------------------------------------------------------------------------------------------- business declines

# A campaign's regions around Beijing, none near store-1 (Shanghai): a polygon ([lon, lat], with a hole) and a
# circle.
BEIJING_REGIONS: list[dict[str, Any]] = [
    {"polygon": {
        "exterior": [[116.0, 39.6], [116.9, 39.6], [116.9, 40.2], [116.0, 40.2]],
        "holes": [[[116.38, 39.89], [116.42, 39.89], [116.42, 39.92], [116.38, 39.92]]],
    }},
    {"circle": {"lat": 40.07, "lon": 116.6, "radius_m": 5000}},
]  # fmt: skip
INACCURATE = pb.Location(latitude=AT_STORE_1.latitude, longitude=AT_STORE_1.longitude, accuracy_m=5000.0)


@dataclass(frozen=True)
class Case:
    """One decline: `policy` is brand 1's document without the rule's mode (the test sets it: enforce or shadow);
    `prime` are redemptions that must succeed first (request fields, "code" the issued code's index); then the clock
    moves by `advance_ms` and `attempt` (request fields) presents code `code`."""

    rule: str
    reason: str
    attempt: dict[str, Any]
    policy: dict[str, Any] = field(default_factory=dict)
    prime: tuple[dict[str, Any], ...] = ()
    code: int = 1
    uses: int = 1
    regions: list[dict[str, Any]] | None = None  # a campaign-level document's regions
    advance_ms: int = 0
    retry_ms: int = 0
    scope: str = ""  # "{ref}" stands for the code's keyed-hash prefix

    def document(self, mode: str) -> dict[str, Any]:
        """The brand document with the rule in `mode`."""
        doc = copy.deepcopy(self.policy)
        doc.setdefault("modes", {})[self.rule] = mode
        return doc


CASES = [
    Case("device_velocity", "DEVICE_VELOCITY", {"customer_device_id": "phone-v"},
         policy=only(limits={"device": {"limit": 1, "window_s": 3600}}),
         prime=({"code": 0, "customer_device_id": "phone-v"},), advance_ms=SECOND_MS, retry_ms=3_599_000,
         scope="device:phone-v"),
    Case("code_velocity", "CODE_VELOCITY", {}, policy=only(limits={"code": {"limit": 2, "window_s": 60}}),
         prime=({"code": 0}, {"code": 0}), code=0, uses=3, advance_ms=SECOND_MS, retry_ms=59_000,
         scope="code:{ref}"),
    Case("terminal_store", "TERMINAL_STORE_MISMATCH", {"store": "store-2"}),  # till-1 is registered at store-1
    Case("terminal_store", "UNKNOWN_TERMINAL", {"terminal": "till-unregistered"},
         policy={"terminals": {"unknown": "deny"}}),
    Case("store_geofence", "OUTSIDE_STORE_RADIUS", {"location": FAR_NORTH}),
    Case("campaign_region", "OUTSIDE_CAMPAIGN_REGION", {"location": AT_STORE_1}, regions=BEIJING_REGIONS),
    Case("store_geofence", "LOCATION_REQUIRED", {}),
    Case("store_geofence", "LOCATION_TOO_INACCURATE", {"location": INACCURATE}),
    Case("impossible_travel", "IMPOSSIBLE_TRAVEL",
         {"store": "store-bj", "terminal": "till-bj", "customer_device_id": "phone-t", "location": BEIJING},
         prime=({"code": 0, "customer_device_id": "phone-t", "location": AT_STORE_1},), advance_ms=60_000),
    Case("device_binding", "DEVICE_MISMATCH", {"customer_device_id": "phone-b"},
         prime=({"code": 0, "customer_device_id": "phone-a"},), code=0, uses=2),
    Case("device_binding", "DEVICE_REQUIRED", {}),
    Case("device_limit", "DEVICE_LIMIT", {"customer_device_id": "phone-d"}, policy={"device_limit": {"uses": 1}},
         prime=({"code": 0, "customer_device_id": "phone-d"},)),
    Case("store_geofence", "RISK_DATA_UNAVAILABLE", {"store": "store-x", "terminal": "till-x", "location": AT_STORE_1}),
]  # fmt: skip


@dataclass
class Attempt:
    """A case set up on the running gateway, its declined-or-shadowed attempt not yet made."""

    issued: Issued
    code: str
    uses_before: int
    expected: Event


async def _set_up(
    case: Case, mode: str, gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis,
    clock: ManualClock, keyring: KeyRing,
) -> Attempt:  # fmt: skip
    """Issue the codes, register store-2, apply the policies, prime, move the clock: the attempt is next."""
    issued = await issue(2, uses_per_code=case.uses)
    await add_store(db, "store-2", at=(31.20, 121.50))
    await announce(gateway, db, redis)
    await apply_policy(gateway, db, redis, case.document(mode))
    if case.regions is not None:
        await apply_policy(gateway, db, redis, {"regions": case.regions}, campaign_id=issued.campaign.id)
    for fields in case.prime:
        primed = dict(fields)
        await redeemed(gateway, issued.codes[primed.pop("code")], **primed)
    clock.advance(case.advance_ms)
    code = issued.codes[case.code]
    fields = case.attempt
    expected = Event(
        issued.campaign.id, fields.get("store", "store-1"), fields.get("terminal", "till-1"),
        gateway.tenants.clients["internal"], case.rule, case.reason, mode, fields.get("location"),
        fields.get("customer_device_id", ""), case.scope.format(ref=lookup_code(code, keyring).refs[0].ref[:12]),
    )  # fmt: skip
    return Attempt(issued, code, await uses_left(gateway, code), expected)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.reason)
async def test_an_enforced_rule_declines_leaves_the_code_unused_and_records_the_denial(
    case: Case, gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis, clock: ManualClock,
    keyring: KeyRing, ledger: Ledger,
) -> None:  # fmt: skip
    attempt = await _set_up(case, "enforce", gateway, issue, db, redis, clock, keyring)
    counted = decisions(case.rule, case.reason, "enforce")

    response = await redeem(gateway, attempt.code, **case.attempt)

    assert (response.outcome, response.reason) == (RISK_DENIED, case.reason)
    assert response.retry_after.ToMilliseconds() == case.retry_ms
    assert response.redemption_id == "" and not response.replayed
    assert await uses_left(gateway, attempt.code) == attempt.uses_before
    assert decisions(case.rule, case.reason, "enforce") == counted + 1
    assert await ledger.events(*attempt.issued.codes) == [attempt.expected]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.reason)
async def test_the_same_rule_in_shadow_mode_admits_and_records_what_it_would_have_denied(
    case: Case, gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis, clock: ManualClock,
    keyring: KeyRing, ledger: Ledger,
) -> None:  # fmt: skip
    attempt = await _set_up(case, "shadow", gateway, issue, db, redis, clock, keyring)
    counted = decisions(case.rule, case.reason, "shadow")

    await redeemed(gateway, attempt.code, **case.attempt)

    assert await uses_left(gateway, attempt.code) == attempt.uses_before - 1
    assert decisions(case.rule, case.reason, "shadow") == counted + 1
    assert await ledger.events(*attempt.issued.codes) == [attempt.expected]


async def test_the_place_rules_admit_a_request_inside_the_store_radius_and_the_regions(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis, ledger: Ledger
) -> None:
    """The geofence cases above are not declined for any location: inside, both rules admit and record nothing."""
    issued = await issue(2)
    modes = {"store_geofence": "enforce", "campaign_region": "enforce"}
    await apply_policy(gateway, db, redis, {"modes": modes})
    around_store_1 = {"circle": {"lat": STORE_1[0], "lon": STORE_1[1], "radius_m": 10_000}}
    await apply_policy(
        gateway, db, redis, {"regions": [*BEIJING_REGIONS, around_store_1]}, campaign_id=issued.campaign.id
    )

    await redeemed(gateway, issued.codes[0], location=AT_STORE_1)
    two_km_away = pb.Location(latitude=STORE_1[0] + 0.018, longitude=STORE_1[1], accuracy_m=15.0)
    declined = await redeem(gateway, issued.codes[1], location=two_km_away)  # in the region, not the store radius

    assert (declined.outcome, declined.reason) == (RISK_DENIED, "OUTSIDE_STORE_RADIUS")
    assert [(e.rule, e.reason) for e in await ledger.events(*issued.codes)] == [
        ("store_geofence", "OUTSIDE_STORE_RADIUS")
    ]


# -------------------------------------------------------------------------------------- Validate, RedeemStream


async def test_validate_runs_the_checks_but_counts_nothing(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis, ledger: Ledger
) -> None:
    issued = await issue(3)
    await apply_policy(gateway, db, redis, only(limits={"terminal": {"limit": 2, "window_s": 60}}))

    answers = [await gateway.stub.Validate(validation(issued.codes[0])) for _ in range(5)]
    await redeemed(gateway, issued.codes[0])
    await redeemed(gateway, issued.codes[1])

    assert {(a.outcome, a.reason) for a in answers} == {(pb.OUTCOME_REDEEMABLE, "REDEEMABLE")}
    # the limit of two holds for Validate too, once two were counted
    validated = await _exhausted(gateway.stub.Validate(validation(issued.codes[2])))
    refused = await _exhausted(gateway.stub.Redeem(request(issued.codes[2])))
    assert validated.subject == refused.subject == "terminal:store-1/till-1"
    assert await uses_left(gateway, issued.codes[2]) == 1
    kinds = [(e.rule, e.kind) for e in await ledger.events(*issued.codes)]
    assert kinds == [("rate_limit", "validate"), ("rate_limit", "redeem")]


async def test_validate_declines_as_redeem_would_and_records_it_as_a_validate(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis, ledger: Ledger
) -> None:
    issued = await issue(1)
    await apply_policy(gateway, db, redis, {"modes": {"store_geofence": "enforce"}})

    answer = await gateway.stub.Validate(validation(issued.codes[0], location=FAR_NORTH))
    inside = await gateway.stub.Validate(validation(issued.codes[0], location=AT_STORE_1))

    assert (answer.outcome, answer.reason) == (RISK_DENIED, "OUTSIDE_STORE_RADIUS")
    assert (inside.outcome, inside.reason) == (pb.OUTCOME_REDEEMABLE, "REDEEMABLE")
    assert await uses_left(gateway, issued.codes[0]) == 1
    client = gateway.tenants.clients["internal"]
    assert await ledger.events(*issued.codes) == [
        Event(issued.campaign.id, "store-1", "till-1", client, "store_geofence", "OUTSIDE_STORE_RADIUS", "enforce",
              FAR_NORTH, kind="validate")
    ]  # fmt: skip


async def test_redeem_stream_applies_every_check_to_every_item(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis, clock: ManualClock,
    ledger: Ledger,
) -> None:  # fmt: skip
    issued = await issue(4)
    document = only(limits={"terminal": {"limit": 1, "window_s": 60}}, modes={"store_geofence": "enforce"})
    await apply_policy(gateway, db, redis, document)
    await redeemed(gateway, issued.codes[3], terminal="till-c", location=AT_STORE_1)  # till-c's one use this minute
    clock.advance(SECOND_MS)
    items = [
        request(issued.codes[0], terminal="till-a", location=AT_STORE_1),
        request(issued.codes[1], terminal="till-b", location=FAR_NORTH),
        request(issued.codes[2], terminal="till-c", location=AT_STORE_1),
    ]

    call = gateway.stub.RedeemStream(iter([pb.RedeemStreamRequest(batch_id="mixed", items=items)]))
    (reply,) = [reply async for reply in call]

    admitted, declined, throttled = reply.results
    assert (admitted.response.outcome, admitted.response.reason) == (pb.OUTCOME_REDEEMED, "REDEEMED")
    assert (declined.response.outcome, declined.response.reason) == (RISK_DENIED, "OUTSIDE_STORE_RADIUS")
    assert not throttled.HasField("response")
    error = throttled.error
    assert (error.code, error.reason, error.quota_subject) == (8, "RATE_LIMITED", "terminal:store-1/till-c")
    assert error.retry_after.ToMilliseconds() == 59_000
    assert [await uses_left(gateway, code) for code in issued.codes[:3]] == [0, 1, 1]
    client = gateway.tenants.clients["internal"]
    assert await ledger.events(*issued.codes) == [
        Event(issued.campaign.id, "store-1", "till-b", client, "store_geofence", "OUTSIDE_STORE_RADIUS", "enforce",
              FAR_NORTH),
        Event(issued.campaign.id, "store-1", "till-c", client, "rate_limit", "RATE_LIMITED", "enforce", AT_STORE_1,
              scope="terminal:store-1/till-c"),
    ]  # fmt: skip


async def test_risk_events_reach_the_ledger_after_redis_lost_the_outbox_directory(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis, ledger: Ledger
) -> None:
    issued = await issue(1)
    await apply_policy(gateway, db, redis, {"modes": {"store_geofence": "enforce"}})
    await redis.delete(keys.OUTBOXES)  # as after a Redis data loss: rebuild-redis lists only the campaigns' outboxes
    declined = await redeem(gateway, issued.codes[0], location=FAR_NORTH)
    assert declined.reason == "OUTSIDE_STORE_RADIUS"

    async def recorded() -> bool:
        return bool(await ledger.events(*issued.codes))

    await eventually(recorded, "the denial in risk_events", 3.0)  # the gateway's upkeep runs every second
