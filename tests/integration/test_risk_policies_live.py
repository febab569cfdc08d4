"""Risk policies changing under a running gateway: a rule switched between shadow and enforce through AdminService
takes effect within seconds without a restart; the failure policy of a check whose data is unavailable (an
unregistered store, no customer device) declines when closed and admits when open; and bind_first registers an
unknown terminal at the store of its first redemption, after which it may name no other store."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from gateway.coderefs import KeyRing
from gateway.pb.redemption.v1 import admin_pb2, admin_pb2_grpc
from gateway.pb.redemption.v1 import redemption_pb2 as pb
from gateway.risk_facts import BIND_ACTOR
from tests.integration.conftest import Issue, RunningGateway
from tests.integration.risk_e2e_helpers import (
    AT_STORE_1,
    FAR_NORTH,
    Event,
    Ledger,
    add_store,
    announce,
    apply_policy,
    eventually,
    make_ledger,
    redeem,
    redeemed,
    validation,
)

SWITCH_BOUND_S = 10.0


@pytest_asyncio.fixture(loop_scope="session")
async def ledger(redis: Redis, db: asyncpg.Connection, migrated: str, keyring: KeyRing) -> Ledger:
    return await make_ledger(redis, db, migrated, keyring)


# ------------------------------------------------------------------------------------- shadow <-> enforce, live


async def _set_geofence(admin: admin_pb2_grpc.AdminServiceStub, mode: str) -> int:
    """Brand 1's policy with the store geofence in `mode`, through AdminService; the registry version it made."""
    document = json.dumps({"modes": {"store_geofence": mode}})
    stored = await admin.SetRiskPolicy(admin_pb2.SetRiskPolicyRequest(campaign_id=0, document_json=document))
    return int(stored.registry_version)


async def _until_validate_says(gateway: RunningGateway, code: str, outcome: pb.Outcome.ValueType) -> float:
    """Poll Validate from 300 km away until it answers `outcome`; the seconds that took (bounded)."""

    async def answered() -> bool:
        answer = await gateway.stub.Validate(validation(code, location=FAR_NORTH))
        return bool(answer.outcome == outcome)

    return await eventually(answered, f"Validate answering {pb.Outcome.Name(outcome)}", SWITCH_BOUND_S)


async def test_switching_a_rule_between_shadow_and_enforce_takes_effect_without_a_restart(
    gateway: RunningGateway, issue: Issue
) -> None:
    issued = await issue(3)
    server = gateway.gateway.server
    async with gateway.channel_as("admin") as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        shadow_version = await _set_geofence(admin, "shadow")

        async def shadow_held() -> bool:
            return gateway.gateway.registry.version >= shadow_version

        await eventually(shadow_held, "the shadow policy on the gateway", SWITCH_BOUND_S)
        await redeemed(gateway, issued.codes[0], location=FAR_NORTH)  # would have been declined: recorded only

        await _set_geofence(admin, "enforce")
        await _until_validate_says(gateway, issued.codes[1], pb.OUTCOME_RISK_DENIED)
        declined = await redeem(gateway, issued.codes[1], location=FAR_NORTH)

        await _set_geofence(admin, "shadow")
        await _until_validate_says(gateway, issued.codes[1], pb.OUTCOME_REDEEMABLE)
        await redeemed(gateway, issued.codes[1], location=FAR_NORTH)

    assert (declined.outcome, declined.reason) == (pb.OUTCOME_RISK_DENIED, "OUTSIDE_STORE_RADIUS")
    assert gateway.gateway.server is server  # the same server throughout: nothing restarted


# ------------------------------------------------------------------------------------------- failure policies

NO_STORE = {"store": "store-unregistered", "terminal": "till-u", "location": AT_STORE_1}
FAILURES = [
    pytest.param("store_geofence", "closed", NO_STORE, "RISK_DATA_UNAVAILABLE", id="no store, closed"),
    pytest.param("store_geofence", "open", NO_STORE, "", id="no store, open"),
    pytest.param("device_binding", "closed", {}, "DEVICE_REQUIRED", id="no device, binding closed"),
    pytest.param("device_binding", "open", {}, "", id="no device, binding open"),
    pytest.param("device_limit", "closed", {}, "DEVICE_REQUIRED", id="no device, limit closed"),
    pytest.param("device_limit", "open", {}, "", id="no device, limit open"),
]


@pytest.mark.parametrize(("rule", "failure", "fields", "reason"), FAILURES)
async def test_a_check_without_its_data_follows_its_failure_policy(
    rule: str, failure: str, fields: dict[str, Any], reason: str, gateway: RunningGateway, issue: Issue,
    db: asyncpg.Connection, redis: Redis, ledger: Ledger,
) -> None:  # fmt: skip
    issued = await issue(1)
    document = {"modes": {rule: "enforce"}, "failure": {rule: failure}, "device_limit": {"uses": 1}}
    await apply_policy(gateway, db, redis, document)

    response = await redeem(gateway, issued.codes[0], **fields)

    recorded = await ledger.events(*issued.codes)
    if reason:  # closed: declined, recorded
        assert (response.outcome, response.reason) == (pb.OUTCOME_RISK_DENIED, reason)
        client = gateway.tenants.clients["internal"]
        store, terminal = fields.get("store", "store-1"), fields.get("terminal", "till-1")
        location = fields.get("location")
        assert recorded == [Event(issued.campaign.id, store, terminal, client, rule, reason, "enforce", location)]
    else:  # open: the check is skipped, nothing to record
        assert (response.outcome, response.reason) == (pb.OUTCOME_REDEEMED, "REDEEMED")
        assert recorded == []


# ------------------------------------------------------------------------------------------------- bind_first


async def _bound_store(db: asyncpg.Connection, terminal: str) -> str | None:
    """The external id of the store brand 1's terminal is registered at in Postgres, None when it is not."""
    found: str | None = await db.fetchval(
        """SELECT s.external_id FROM terminals t JOIN stores s ON s.id = t.store_id
           WHERE t.brand_id = 1 AND t.external_id = $1""",
        terminal,
    )
    return found


async def test_bind_first_registers_an_unknown_terminal_at_the_store_of_its_first_redemption(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis
) -> None:
    issued = await issue(4)
    await add_store(db, "store-2", at=(31.20, 121.50))
    await apply_policy(gateway, db, redis, {"terminals": {"unknown": "bind_first"}})
    # A Validate binds nothing: till-v stays unknown, so its first redemption (at store-2) binds it there.
    checked = await gateway.stub.Validate(validation(issued.codes[3], terminal="till-v"))
    assert checked.outcome == pb.OUTCOME_REDEEMABLE
    await redeemed(gateway, issued.codes[3], store="store-2", terminal="till-v")

    await redeemed(gateway, issued.codes[0], terminal="till-new")

    async def registered() -> bool:
        return await _bound_store(db, "till-new") == "store-1"

    await eventually(registered, "till-new registered at store-1")  # the gateway's upkeep runs every second
    assert await _bound_store(db, "till-v") == "store-2"
    bound = await db.fetchval("SELECT count(*) FROM audit_log WHERE action = 'terminal.create' AND actor = $1",
                              BIND_ACTOR)  # fmt: skip
    assert bound == 2  # till-v and till-new, audited as the gateway's bindings
    await announce(gateway, db, redis)  # the registry now answers for it, not the gateway's pending binding
    mismatch = await redeem(gateway, issued.codes[1], store="store-2", terminal="till-new")
    assert (mismatch.outcome, mismatch.reason) == (pb.OUTCOME_RISK_DENIED, "TERMINAL_STORE_MISMATCH")
    await redeemed(gateway, issued.codes[1], terminal="till-new")


async def test_bind_first_at_an_unregistered_store_binds_nothing(
    gateway: RunningGateway, issue: Issue, db: asyncpg.Connection, redis: Redis
) -> None:
    """A first redemption at a store the registry does not know cannot register the terminal there: the terminal
    stays unknown, so its later first redemption at a registered store binds it there."""
    issued = await issue(2)
    await apply_policy(gateway, db, redis, {"terminals": {"unknown": "bind_first"}})
    await redeemed(gateway, issued.codes[0], store="store-unregistered", terminal="till-z")

    await redeemed(gateway, issued.codes[1], terminal="till-z")
